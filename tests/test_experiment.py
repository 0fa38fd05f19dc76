"""`factrl experiment`: the aggregation and tables on hand-made results, the RM's per-type join,
the held-out eval hook inside PPO (called when asked, logged, and changing nothing), and a tiny
end-to-end run that a second invocation skips."""

import json
import random
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from micro import MICRO_MODEL, ppo_config, train_sft_rm

from factrl.trainers import experiment as E
from factrl.trainers.config import load_config
from factrl.trainers.metrics import rm_accuracy, rm_accuracy_by


# ---- aggregation on hand-made results -----------------------------------------------------------------
def _eval(halluc, cats=None, rm=None, words=5.0):
    """A run_eval-shaped result (only what the experiment reads)."""
    res = {"hallucination_rate": halluc,
           "mmhal": {"score": 1 - halluc, "hallucination_rate": halluc, "response_words": words,
                     "per_category": {c: {"hallucination_rate": v, "score": 0.0, "n": 4}
                                      for c, v in (cats or {}).items()}},
           "pope": {s: {"f1": 0.5, "accuracy": 0.5, "yes_ratio": 0.5} for s in ("random", "popular", "adversarial")},
           "chair": {"chair_i": 0.1, "chair_s": 0.2, "coverage": 0.9}}
    if rm is not None:
        res["rm"] = rm
    return res


def _rm(acc, per_type):
    return {"accuracy": acc, "accuracy_hallucination": acc, "per_question_type": per_type}


def _results():
    t = lambda a, n, ah, nh: {"accuracy": a, "n": n, "accuracy_hallucination": ah, "n_hallucination": nh}  # noqa: E731
    return {
        "seeds": [0, 1],
        "sft": _eval(0.7, {"counting": 0.5, "spatial": 1.0}, words=6.0),
        "arms": {
            "vanilla": {
                "0": {"eval": _eval(0.4, {"counting": 0.25}, _rm(0.6, {"counting": t(0.5, 4, 1.0, 2)})), "curve": [
                    {"step": 0, "eval/hallucination_rate": 0.7}, {"step": 1, "reward": 0.1, "reward/rm": 0.2},
                    {"step": 2, "reward": 0.3, "reward/rm": 0.4, "eval/hallucination_rate": 0.5}]},
                "1": {"eval": _eval(0.6, {"counting": 0.75}, _rm(0.8, {"counting": t(0.75, 4, None, 0)})),
                      "curve": [{"step": 1, "reward": 0.2, "reward/rm": 0.1}]},
            },
            "fact": {
                "0": {"eval": _eval(0.2, {"counting": 0.0}, _rm(0.9, {"counting": t(1.0, 4, 1.0, 2),
                                                                      "choice": t(0.5, 2, 0.5, 2)})), "curve": []},
                "1": {"eval": _eval(0.3, {"counting": 0.5}, _rm(0.7, {"counting": t(0.5, 3, 0.0, 1),
                                                                      "choice": t(1.0, 2, 1.0, 2)})), "curve": []},
            },
        },
    }


def test_mean_std_is_the_sample_std_and_skips_missing_values():
    assert E.mean_std([0.4, 0.6]) == pytest.approx({"mean": 0.5, "std": 0.02 ** 0.5, "n": 2})
    assert E.mean_std([1.0, None, 3.0]) == pytest.approx({"mean": 2.0, "std": 2 ** 0.5, "n": 2})
    assert E.mean_std([0.3]) == {"mean": 0.3, "std": 0.0, "n": 1}
    assert E.mean_std([None, None]) is None


def test_summary_and_tables_on_hand_made_results(tmp_path):
    r = _results()
    s = E.summarize(r)
    h = s["rows"]["hallucination_rate"]
    assert h["sft"] == 0.7  # one model: a value, not a mean
    assert h["vanilla"] == pytest.approx({"mean": 0.5, "std": 0.02 ** 0.5, "n": 2})
    assert h["fact"] == pytest.approx({"mean": 0.25, "std": 0.005 ** 0.5, "n": 2})
    assert s["rows"]["rm_accuracy"]["sft"] is None and s["rows"]["rm_accuracy"]["fact"]["mean"] == pytest.approx(0.8)
    assert s["rows"]["mmhal_response_words"]["sft"] == 6.0
    # per MMHal category: a category only SFT was asked has no arm numbers
    assert s["categories"]["counting"]["vanilla"]["mean"] == pytest.approx(0.5)
    assert s["categories"]["spatial"]["sft"] == 1.0 and s["categories"]["spatial"]["fact"] is None
    # per question type: accuracies over seeds, a type the vanilla RM never saw has no vanilla entry
    ct = s["rm_types"]["counting"]
    assert ct["vanilla"]["accuracy"]["mean"] == pytest.approx(0.625) and ct["fact"]["n"] == pytest.approx(3.5)
    assert ct["vanilla"]["accuracy_hallucination"] == {"mean": 1.0, "std": 0.0, "n": 1}  # seed 1 had none
    assert s["rm_types"]["choice"]["vanilla"]["accuracy"] is None

    md = E.format_tables({**r, "summary": s})
    row = lambda label: next(line for line in md.splitlines() if line.startswith(f"| {label}"))  # noqa: E731
    assert row("hallucination rate").split(" | ")[1:] == ["0.700", "0.500 ± 0.141", "0.250 ± 0.071 |"]
    assert row("RM held-out accuracy ↑").split(" | ")[1] == "-"
    assert row("spatial").split(" | ")[1:] == ["4", "1.000", "-", "- |"]
    assert "| choice | 2 | - | 0.750 ± 0.354 |" in md
    assert "| counting | 4 / 3.5 | 0.625 ± 0.177 | 0.750 ± 0.354 |" in md  # the pair counts differ per arm
    assert md.count("| question type |") == 2  # overall, then the hallucination pairs only

    # the acceptance checks, worked by hand: SFT − fact 0.45 > 2 × 0.071; vanilla − fact 0.25 is not
    # > 2 × 0.141 (the larger std); POPE F1 equal (0 ≥ 0); MMHal score 0.75 − 0.3; RM 0.8 − 0.7 < 0.283
    got = [(round(c["value"], 3), None if c["margin"] is None else round(c["margin"], 3), c["passed"])
           for c in E.acceptance(s)]
    assert got == [(0.45, 0.141, True), (0.25, 0.283, False), (0.0, 0.0, True), (0.45, 0.0, True),
                   (0.1, 0.283, False)]
    assert "| hallucination rate: vanilla-RLHF − Fact-RLHF > 2 std | 0.250 | 0.283 | **no** |" in md
    one = E.summarize({**r, "arms": {a: {"0": runs["0"]} for a, runs in r["arms"].items()}})
    assert [c["passed"] for c in E.acceptance(one)] == [None, None, True, True, None]  # one seed: no spread

    png = E.plot_experiment(r, tmp_path / "experiment.png")
    assert png is not None and png.stat().st_size > 10_000


def test_rm_accuracy_on_the_question_types_it_trained_on_pooled_and_checked_by_hand():
    """rm.question_types set: each seed's RM accuracy on the held-out hallucination pairs of those types,
    pooled by pair count, mean ± std over seeds, and an acceptance check on it (fact − vanilla)."""
    r = {**_results(), "rm_question_types": ["counting", "choice"]}
    s = E.summarize(r)
    # fact: seed 0 (1.0×2 + 0.5×2)/4 = 0.75, seed 1 (0.0×1 + 1.0×2)/3 = 2/3; vanilla: seed 0 1.0 (no
    # choice pairs), seed 1 none (0 counting hallucination pairs) -> one value, no spread
    assert s["rm_trained"]["fact"] == pytest.approx({"mean": (0.75 + 2 / 3) / 2, "std": (0.75 - 2 / 3) / 2 ** 0.5,
                                                     "n": 2})
    assert s["rm_trained"]["vanilla"] == {"mean": 1.0, "std": 0.0, "n": 1}
    c = [c for c in E.acceptance(s) if "of its question types (counting, choice)" in c["check"]]
    assert len(c) == 1 and c[0]["value"] == pytest.approx((0.75 + 2 / 3) / 2 - 1.0) and c[0]["passed"] is None
    r["arms"]["vanilla"]["1"]["eval"]["rm"]["per_question_type"]["counting"] = \
        {"accuracy": 0.5, "n": 4, "accuracy_hallucination": 0.5, "n_hallucination": 2}
    c = [c for c in E.acceptance(E.summarize(r)) if "of its question types" in c["check"]][0]
    # vanilla 1.0, 0.5: mean 0.75, std 0.354 > fact's: 0.708 − 0.75 < 0, not above 2 × 0.354
    assert c["margin"] == pytest.approx(2 * 0.5 / 2 ** 0.5) and c["passed"] is False
    assert E.summarize(_results())["rm_trained"] is None  # rm.question_types empty: all types
    # the per-lie table lists the trained types' lies only
    t = lambda a, n: {"accuracy": a, "n": n}  # noqa: E731
    for arm, (x, y) in (("vanilla", (1.0, 0.5)), ("fact", (1.0, 1.0))):
        for seed, acc in (("0", x), ("1", y)):
            r["arms"][arm][seed]["eval"]["rm"]["per_lie_kind"] = {"counting: habit": t(1.0, 4),
                                                                  "counting: wrong_count": t(acc, 2),
                                                                  "spatial: wrong_relation": t(0.5, 3)}
    md = E.format_tables({**r, "summary": E.summarize(r)})
    assert "| counting: wrong_count | 2 | 0.750 ± 0.354 | 1.000 ± 0.000 |" in md
    assert "| counting: habit | 4 | 1.000 ± 0.000 | 1.000 ± 0.000 |" in md and "spatial: wrong_relation" not in md


def test_rated_pairs_and_rm_fit_in_the_summary_tables_and_acceptance_worked_by_hand(tmp_path):
    """Each seed's RMs on the policies' own samples: per source mean ± std over seeds, the mean over the
    three sources per seed, an acceptance check on it; each RM's fit on its training batches."""
    r = _results()
    for arm, accs in (("vanilla", (0.9, 0.7)), ("fact", (0.95, 0.85))):
        for seed, a in zip(("0", "1"), accs):
            r["arms"][arm][seed]["rm_train_accuracy"] = a
    src = lambda f, p, v, fa: {"faithful": f, "pairs": p, "vanilla": v, "fact": fa, "by_kind": {}}  # noqa: E731
    r["rated"] = {
        "0": {"sft": src(0.2, 10, 0.8, 0.9), "vanilla": src(0.1, 4, 0.2, 0.9), "fact": src(0.5, 6, 0.5, 0.6)},
        "1": {"sft": src(0.3, 20, 0.9, 0.9), "vanilla": src(0.1, 8, 0.4, 1.0), "fact": src(0.4, 6, None, 0.8)}}
    s = E.summarize(r)
    assert s["rated"]["sft"]["faithful"]["mean"] == pytest.approx(0.25) and s["rated"]["sft"]["pairs"] == 15
    assert s["rated"]["fact"]["vanilla"] == {"mean": 0.5, "std": 0.0, "n": 1}  # seed 1 scored none
    # per seed, over the sources scored: vanilla (0.8+0.2+0.5)/3 = 0.5, (0.9+0.4)/2 = 0.65; fact 0.8, 0.9
    assert s["rated"]["mean"]["vanilla"] == pytest.approx({"mean": 0.575, "std": 0.01125 ** 0.5, "n": 2})
    assert s["rated"]["mean"]["fact"] == pytest.approx({"mean": 0.85, "std": 0.005 ** 0.5, "n": 2})
    assert s["rm_train"]["vanilla"] == pytest.approx({"mean": 0.8, "std": 0.02 ** 0.5, "n": 2})
    checks = {c["check"]: c for c in E.acceptance(s)}
    on = checks["RM accuracy on the policies' own samples: fact − vanilla > 2 std"]
    assert on["value"] == pytest.approx(0.275) and on["margin"] == pytest.approx(2 * 0.01125 ** 0.5)
    assert on["passed"] is True  # 0.275 > 0.212 (twice the larger std, vanilla's)
    fit = checks[f"both RMs fit their pairs: train accuracy (mean − std) ≥ {E.RM_FIT}"]
    assert fit["value"] == pytest.approx(0.8 - 0.02 ** 0.5) and fit["passed"] is False  # vanilla 0.659 < 0.8
    md = E.format_tables({**r, "summary": s})
    assert "| SFT | 0.250 ± 0.071 | 15 | 0.850 ± 0.071 | 0.900 ± 0.000 |" in md
    assert "| mean over the three | - | - | 0.575 ± 0.106 | 0.850 ± 0.071 |" in md
    assert "| train accuracy | 0.800 ± 0.141 | 0.900 ± 0.071 |" in md
    png = E.plot_experiment(r, tmp_path / "experiment.png")  # the rated panel replaces the held-out one
    assert png is not None and png.stat().st_size > 10_000


def test_rated_pairs_put_a_faithful_sample_above_a_hallucinated_one_of_the_same_prompt():
    from factrl.trainers.shapesworld.scenes import Obj, Scene
    from factrl.trainers.shapesworld.scoring import rated_pairs

    scene = Scene("s", "s.png", "white", [Obj("circle", "red", "small", 0, 0), Obj("star", "blue", "large", 1, 1)])
    item = {"id": "s-chair", "image": "s.png", "question": "Describe the image.",
            "spec": {"type": "describe", "variant": 0}, "category": "holistic"}
    true = scene.describe()
    over = "A white background with 3 shapes: small red circle at the top left, large blue star at the center, " \
           "small red circle at the bottom."
    wrong = "A white background with 2 shapes: small red circle at the top left, large blue star at the right."
    recs, faithful = rated_pairs([item, item], [[true, over, true, wrong], [over, wrong]], {"s.png": scene},
                                 per_item=4)
    assert faithful == pytest.approx(2 / 6)  # every sample counts, duplicates too
    # one prompt with one faithful text (duplicates count once) and two hallucinated ones; none for the other
    assert len(recs) == 2
    for r in recs:
        chosen = r["output_1" if r["preference"] == 1 else "output_2"]["value"]
        rejected = r["output_2" if r["preference"] == 1 else "output_1"]["value"]
        assert chosen == true and rejected in (over, wrong) and r["hallucination"]
        assert r["false_kinds"] == (["count", "obj"] if rejected == over else ["obj"])
    assert {r["output_1"]["value"] for r in recs} | {r["output_2"]["value"] for r in recs} == {true, over, wrong}
    assert len(rated_pairs([item], [[true, over, wrong]], {"s.png": scene}, per_item=1)[0]) == 1


def test_rm_accuracy_by_question_type_joins_on_id(tmp_path, monkeypatch):
    """rm_eval: held-out pairs (in load order, one dropped as too long) joined to their records'
    question_type by id; ids default to the record index, as the loaders do."""
    import factrl.trainers.rm as R
    from factrl.trainers import eval_stage

    recs = [{"id": "a", "question_type": "counting", "lie_kind": "wrong_count"},
            {"id": "b", "question_type": "spatial"}, {"question_type": "counting", "lie_kind": "unhelpful"},
            {"id": "d"},
            {"id": "e", "question_type": "spatial", "lie_kind": "wrong_relation"}]
    (tmp_path / "preference_eval.json").write_text(json.dumps(recs))
    cfg = load_config("tiny", [f"data.root={tmp_path}"])
    assert eval_stage.held_out_fields(cfg, tmp_path)["question_type"] == {"a": "counting", "b": "spatial",
                                                                          "2": "counting", "e": "spatial"}
    held = [SimpleNamespace(id=i) for i in ("e", "a", "2", "d")]  # "b" was dropped; "d" has no type
    triples = [(1.0, 0.0, True), (0.0, 1.0, False), (2.0, 1.0, True), (1.0, 0.0, None)]
    other = [SimpleNamespace(id=i) for i in ("e", "a", "2", "d")]  # the same pairs, other images' facts
    monkeypatch.setattr(R, "load_pairs", lambda *a, other_scenes=False, **k: ([], other if other_scenes else held))
    monkeypatch.setattr(R, "score_pairs", lambda m, pairs, *a, **k: triples if pairs is held else
                        [(0.0, 1.0, True), (0.0, 1.0, False), (0.0, 1.0, True), (1.0, 0.0, None)])
    model = SimpleNamespace(adapter_state=SimpleNamespace(names={"reward"}))
    a = SimpleNamespace(data_root=tmp_path, tokenizer=SimpleNamespace(pad_token_id=0), images=None)
    res = eval_stage.rm_eval(model, a, cfg, "cpu")
    assert res["accuracy"] == 0.75 and res["n"] == 4  # overall, as before
    assert res["accuracy_other_scenes_facts"] == 0.25  # the fact RM is also scored with other images' facts
    vanilla = eval_stage.rm_eval(model, a, load_config("tiny", [f"data.root={tmp_path}", "rm.fact_augmented=false"]),
                                 "cpu")
    assert "accuracy_other_scenes_facts" not in vanilla and vanilla["accuracy"] == 0.75  # it reads no facts
    assert res["per_question_type"] == {"counting": rm_accuracy(triples[1:3]), "spatial": rm_accuracy(triples[:1])}
    assert res["per_question_type"]["counting"]["accuracy"] == 0.5
    # the same pairs by question type and lie (a record without either is in no group)
    assert res["per_lie_kind"] == {"counting: unhelpful": rm_accuracy(triples[2:3]),
                                   "counting: wrong_count": rm_accuracy(triples[1:2]),
                                   "spatial: wrong_relation": rm_accuracy(triples[:1])}
    assert rm_accuracy_by(triples, [None] * 4) == {}


# ---- the held-out eval hook inside PPO ------------------------------------------------------------------
MICRO = [*MICRO_MODEL, "data.shapes_n=48", "sft.max_steps=6", "rm.max_steps=3", "rm.eval_every=0",
         "ppo.rollout_batch_size=16", "ppo.rollout_chunk_size=16", "ppo.step_batch_size=8", "ppo.batch_size=8",
         "ppo.max_response_len=6", "ppo.total_steps=2", "eval.max_items=8", "eval.max_new_tokens=8",
         "ppo.eval_items=8", "ppo.eval_every=1", "experiment.rated_items=12", "experiment.rated_samples=4"]


@pytest.fixture(scope="module")
def sft_rm(tmp_path_factory):
    return train_sft_rm(tmp_path_factory.mktemp("exp"), MICRO)


def _ppo_cfg(root, out, *extra):
    return ppo_config(root, MICRO, out, *extra)


def test_eval_hook_runs_at_its_steps_is_logged_and_changes_nothing(sft_rm, tmp_path):
    from factrl.trainers.eval_stage import ppo_eval_fn
    from factrl.trainers.logs import read_metrics
    from factrl.trainers.ppo import train_ppo

    on = _ppo_cfg(sft_rm, tmp_path / "on", "ppo.total_steps=3", "ppo.eval_every=2")
    real = ppo_eval_fn(on)
    assert ppo_eval_fn(_ppo_cfg(sft_rm, tmp_path / "x", "ppo.eval_every=0")) is None
    calls = []

    def hook(a, step):
        model = a.model
        calls.append((step, model.training, model.adapter_state.active, torch.is_grad_enabled()))
        rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
        out = real(a, step)
        # greedy generation and scoring read no global RNG ...
        assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
        assert np.array_equal(np.random.get_state()[1], rng[2])
        # ... and a hook that does is undone by train_ppo: the PPO run below is unchanged anyway
        random.random(), torch.rand(3), np.random.rand()
        return out

    train_ppo(on, eval_fn=hook)
    train_ppo(_ppo_cfg(sft_rm, tmp_path / "off", "ppo.total_steps=3"))  # eval_every is on, but no hook
    assert calls == [(0, False, "policy", False), (2, False, "policy", False), (3, False, "policy", False)]

    rows_on = read_metrics(tmp_path / "on" / "ppo" / "metrics.jsonl")
    rows_off = read_metrics(tmp_path / "off" / "ppo" / "metrics.jsonl")
    keys = tuple(f"eval/{k}" for k in ("hallucination_rate", "mmhal_score", "pope_f1_adversarial",
                                       "pope_yes_ratio_adversarial"))
    assert [r["step"] for r in rows_on] == [0, 1, 2, 3] and [r["step"] for r in rows_off] == [1, 2, 3]
    assert set(rows_on[0]) == {"step", "time/eval", *keys}  # the policy before any update
    assert [all(k in r for k in keys) for r in rows_on[1:]] == [False, True, True]
    assert all(0.0 <= rows_on[2][k] <= 1.0 for k in keys)
    assert not any(k.startswith("eval/") for r in rows_off for k in r)
    same = ("reward", "reward/rm", "kl", "policy_loss", "value_loss", "entropy", "response_len", "grad_norm")
    assert [{k: r[k] for k in same} for r in rows_on[1:]] == [{k: r[k] for k in same} for r in rows_off]
    assert (tmp_path / "on" / "ppo" / "curves.png").is_file()


def test_eval_hook_on_a_pope_split_logs_jsonl_tensorboard_and_curves(sft_rm, tmp_path):
    """eval.ppo_set=pope_adversarial: the hook scores that split of official-format POPE files (here
    ShapesWorld's export) every eval_every steps; at each eval the POPE path and the built-in
    ShapesWorld scorer, asked the same items of the same policy, give the same numbers."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from factrl.trainers.eval_stage import ppo_eval_fn
    from factrl.trainers.logs import read_metrics
    from factrl.trainers.ppo import train_ppo

    data = sft_rm / "data"
    pope = ["eval.ppo_set=pope_adversarial", f"eval.pope.folder={data}/eval/pope",
            "eval.pope.file_pattern=pope_{split}.jsonl", f"eval.pope.image_folder={data}/images", "eval.pope.suffix="]
    # one question at a time in both: the same prompt shapes, so the same greedy answers to compare
    cfg = _ppo_cfg(sft_rm, tmp_path / "pope", "ppo.total_steps=1", "ppo.eval_every=1", "eval.batch_size=1", *pope)
    official = ppo_eval_fn(cfg)
    builtin = ppo_eval_fn(_ppo_cfg(sft_rm, tmp_path / "x", "ppo.eval_every=1", "eval.batch_size=1"))
    both = lambda a, step: {**builtin(a, step), **{f"official/{k}": v for k, v in official(a, step).items()}}  # noqa: E731
    train_ppo(cfg, eval_fn=both)
    rows = read_metrics(tmp_path / "pope" / "ppo" / "metrics.jsonl")
    keys = [f"eval/official/pope_{k}_adversarial" for k in ("accuracy", "f1", "yes_ratio")]
    assert [r["step"] for r in rows if all(k in r for k in keys)] == [0, 1]
    for r in rows:
        if keys[1] in r:
            assert r["eval/official/pope_f1_adversarial"] == r["eval/pope_f1_adversarial"]
            assert r["eval/official/pope_yes_ratio_adversarial"] == r["eval/pope_yes_ratio_adversarial"]
    tb = EventAccumulator(str(tmp_path / "pope" / "ppo" / "tb"))
    tb.Reload()
    assert [e.step for e in tb.Scalars(keys[1])] == [0, 1]
    assert (tmp_path / "pope" / "ppo" / "curves.png").is_file()
    with pytest.raises(ValueError, match="eval.ppo_set"):
        ppo_eval_fn(_ppo_cfg(sft_rm, tmp_path / "y", "eval.ppo_set=pope_everything"))


# ---- end to end -------------------------------------------------------------------------------------------
def test_experiment_end_to_end_then_skips_what_it_trained(tmp_path):
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "factrl.trainers.cli", "experiment", *MICRO, f"data.root={tmp_path}/data",
           f"experiment.out_dir={out}", "experiment.seeds=[3,4]"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["experiment"] == "done" and last["seeds"] == [3, 4]
    res = json.loads((out / "results.json").read_text())
    assert set(res["arms"]) == {"vanilla", "fact"} and all(set(v) == {"3", "4"} for v in res["arms"].values())
    for arm in ("vanilla", "fact"):
        for seed in (3, 4):
            run = res["arms"][arm][str(seed)]
            # ShapesWorld's records carry no question_type, so no per-type table here (the join is
            # test_rm_accuracy_by_question_type_joins_on_id's)
            assert 0.0 <= run["eval"]["hallucination_rate"] <= 1.0 and 0.0 <= run["eval"]["rm"]["accuracy"] <= 1.0
            assert [p["step"] for p in run["curve"] if "eval/hallucination_rate" in p] == [0, 1, 2]
            saved = load_config(str(out / f"seed{seed}" / arm / "ppo" / "config.yaml"))
            assert saved.run.seed == seed and saved.ppo.base == str(out / "sft" / "final")
            assert saved.ppo.fact_augmented == saved.rm.fact_augmented == (arm == "fact")
            rm_cfg = load_config(str(out / f"seed{seed}" / arm / "rm" / "config.yaml"))
            assert rm_cfg.rm.fact_augmented == (arm == "fact")
    assert not (out / "seed3" / "vanilla" / "sft").exists() and (out / "sft" / "final" / "config.json").is_file()
    # both RMs judged on the SFT's and each policy's own samples, rated by the checker
    for seed in ("3", "4"):
        rated = res["rated"][seed]
        assert set(rated) == {"sft", "vanilla", "fact"}
        for src, v in rated.items():
            assert 0.0 <= v["faithful"] <= 1.0
            pairs = json.loads((out / f"seed{seed}" / "rated" / f"{src}_pairs.json").read_text())
            assert v["pairs"] == len(pairs) and all(p["hallucination"] for p in pairs)
            if pairs:
                assert all(0.0 <= v[arm] <= 1.0 for arm in ("vanilla", "fact"))
    for arm in ("vanilla", "fact"):
        assert all(0.0 <= run["rm_train_accuracy"] <= 1.0 for run in res["arms"][arm].values())
    table = (out / "table.md").read_text()
    for label in ("hallucination rate (MMHal)", "by MMHal category", "by question type", "Fact-RLHF",
                  "own samples", "own training batches"):
        assert label in table
    assert (out / "experiment.png").stat().st_size > 10_000

    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.count("exists, skipping") == 1 + 2 * 2 * 2  # SFT, then RM and PPO per seed and arm
    # the SFT's and each arm's evaluation, and each seed's rated pairs
    assert r2.stdout.count("reading it back") == 1 + 2 * 2 + 2 and "=== " not in r2.stdout
    assert json.loads((out / "results.json").read_text()) == res
