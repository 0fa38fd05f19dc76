"""``factrl experiment`` (``make experiment``): vanilla RLHF against Fact-RLHF over seeds, from one SFT.

The question the paper asks of its reward model: does reading the image's facts make the RLHF
policy hallucinate less? Both arms start from the same SFT model and differ only in
``rm.fact_augmented`` / ``ppo.fact_augmented``; each seed re-runs both RM + PPO pairs.

  1. SFT once, under ``<out>/sft`` (``<out>`` = ``experiment.out_dir``, which replaces run.out_dir)
  2. the SFT model (and the image-blind baseline) on the held-out sets, once: greedy decoding
     does not depend on the seed
  3. per seed, per arm (vanilla, fact), under ``<out>/seed<s>/<arm>``: the RM, then PPO (held-out
     eval every ``ppo.eval_every`` steps), both on the shared SFT base; then the policy on the
     held-out sets and the arm's RM on the held-out preference pairs
  4. ``results.json`` (every number per arm and seed, and the PPO curves), ``table.md`` (mean ± std
     over seeds, also printed) and ``experiment.png``

Run again, it skips every trained stage whose done marker exists and reads back every evaluation
newer than what it evaluated (made with the same eval and data config).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Iterable, Optional

from factrl.trainers.config import Config, load_config, write_atomic
from factrl.trainers.embedded import prepare
from factrl.trainers.eval_stage import dig, evaluate_models, headline
from factrl.trainers.logs import read_metrics
from factrl.trainers.pipeline import run_stage, train_ppo_evaluated
from factrl.trainers.run import RunLayout, resolve_device

ARMS = ("vanilla", "fact")
COLUMNS = (("sft", "SFT"), ("vanilla", "vanilla-RLHF"), ("fact", "Fact-RLHF"))
# (label, eval_stage.headline key); RM rows: the arm's own RM (the SFT column has none)
ROWS = [
    ("hallucination rate (MMHal) ↓", "hallucination_rate"),
    ("MMHal score ↑", "mmhal_score"),
    ("POPE F1 random ↑", "pope_f1_random"),
    ("POPE F1 popular ↑", "pope_f1_popular"),
    ("POPE F1 adversarial ↑", "pope_f1_adversarial"),
    ("POPE accuracy adversarial ↑", "pope_accuracy_adversarial"),
    ("POPE yes-ratio (adv.)", "pope_yes_ratio_adversarial"),
    ("CHAIR_i ↓", "chair_i"),
    ("CHAIR_s ↓", "chair_s"),
    ("CHAIR coverage ↑", "chair_coverage"),
    ("answer length on MMHal (words)", "mmhal_response_words"),
    ("RM held-out accuracy ↑", "rm_accuracy"),
    ("RM held-out accuracy (halluc. pairs) ↑", "rm_accuracy_hallucination"),
    ("RM held-out accuracy, other images' facts", "rm_accuracy_other_scenes_facts"),
]
CURVE_KEYS = ("reward", "reward/rm", "kl", "eval/hallucination_rate", "eval/mmhal_score",
              "eval/pope_f1_adversarial", "eval/pope_yes_ratio_adversarial")


def arm_config(cfg: Config, out: Path, seed: int, arm: str) -> Config:
    """The config of one arm and seed: its own run directory, the shared SFT base, its own RM."""
    c = copy.deepcopy(cfg)
    layout = RunLayout(out / f"seed{seed}" / arm)
    c.run.seed, c.run.out_dir = seed, str(layout.root)
    c.rm.base = c.ppo.base = str(RunLayout(out).sft_final)
    c.ppo.reward_adapter = str(layout.reward_adapter)
    c.rm.fact_augmented = c.ppo.fact_augmented = arm == "fact"
    return c


def run_experiment(cfg: Config) -> dict:
    from factrl.trainers.rm import train_rm
    from factrl.trainers.sft import train_sft

    t0 = time.time()
    out = Path(cfg.experiment.out_dir)
    seeds = list(cfg.experiment.seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"experiment.seeds={seeds}: expected distinct seeds")

    # 1. SFT once (the tiny base and ShapesWorld first, for the embedded default)
    shared = copy.deepcopy(cfg)
    shared.run.out_dir = str(out)
    shared.rm.base = shared.ppo.base = shared.ppo.reward_adapter = ""  # this run's own sft/final, no RM
    prepare(shared)
    run_stage(shared, "sft", train_sft)
    sft_done = RunLayout(out).done("sft")

    # 2. SFT and the blind baseline on the held-out sets, once
    base = _evaluate(shared, ("sft", "blind"), sft_done, "")
    results = {"seeds": seeds, "sft": base["sft"], "blind": base.get("blind"), "arms": {a: {} for a in ARMS},
               "rm_question_types": list(cfg.rm.question_types)}

    # 3. per seed and arm: RM, PPO with the held-out eval hook, the policy (and the RM) evaluated
    for seed in seeds:
        for arm in ARMS:
            c = arm_config(cfg, out, seed, arm)
            label = f"seed{seed}/{arm} "
            run_stage(c, "rm", train_rm, label)
            run_stage(c, "ppo", train_ppo_evaluated, label)
            layout = RunLayout(Path(c.run.out_dir))
            res = _evaluate(c, ("ppo",), layout.done("ppo"), label)["ppo"]
            results["arms"][arm][str(seed)] = {
                "eval": res, "curve": ppo_curve(layout.stage("ppo") / "metrics.jsonl"),
                "rm_train_accuracy": rm_train_accuracy(layout.stage("rm") / "metrics.jsonl")}
        # 3b. both RMs on pairs of the SFT model's and each policy's own samples, rated by the checker
        if cfg.experiment.rated_items > 0:
            results.setdefault("rated", {})[str(seed)] = rated_accuracy(cfg, out, seed)

    # 4. results, tables, plot
    results["summary"] = summarize(results)
    results["acceptance"] = acceptance(results["summary"])
    write_atomic(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    table = format_tables(results)
    print(table)
    write_atomic(out / "table.md", table + "\n")
    png = plot_experiment(results, out / "experiment.png")
    means = {key: {col: _mean(results["summary"]["rows"][key][col]) for col, _ in COLUMNS}
             for key in ("hallucination_rate", "mmhal_score", "pope_f1_adversarial", "chair_i", "rm_accuracy")}
    return {"experiment": "done", "seconds": round(time.time() - t0, 1), "seeds": seeds,
            "results": str(out / "results.json"), "table": str(out / "table.md"),
            "plot": None if png is None else str(png), "mean": means,
            "accepted": all(c["passed"] for c in results["acceptance"])}


def _evaluate(cfg: Config, columns: tuple, after: Path, label: str) -> dict:
    """``evaluate_models(cfg, columns)``, or its saved results when every column's file is newer than
    ``after`` (the done marker of what it evaluates) and the eval and data configs are unchanged."""
    out = RunLayout(Path(cfg.run.out_dir)).stage("eval")
    files = {c: out / f"{c}.json" for c in columns}
    saved = out / "config.yaml"
    if saved.is_file() and all(f.is_file() and f.stat().st_mtime >= after.stat().st_mtime for f in files.values()):
        old = load_config(str(saved), validate=False)
        if (old.eval, old.data) == (cfg.eval, cfg.data):
            print(f"[factrl] {label}eval: {out} exists, reading it back (delete it to re-evaluate)")
            return {c: json.loads(f.read_text()) for c, f in files.items()}
    print(f"[factrl] === {label}eval ({', '.join(columns)}) ===")
    return evaluate_models(cfg, columns)


def rm_train_accuracy(metrics: Path, tail: float = 0.1) -> Optional[float]:
    """The RM's pairwise accuracy on its own training batches over the last ``tail`` of its steps
    (does it fit its pairs?); None without logged accuracies."""
    accs = [r["acc"] for r in read_metrics(metrics) if isinstance(r.get("acc"), (int, float))]
    if not accs:
        return None
    last = accs[-max(1, int(len(accs) * tail)):]
    return sum(last) / len(last)


SOURCES = ("sft", *ARMS)  # whose samples the RMs are judged on: the SFT model's, each arm's policy's


def rated_accuracy(cfg: Config, out: Path, seed: int) -> dict:
    """Each arm's RM on (faithful, hallucinated) pairs of the SFT model's and of both policies' own
    samples (``experiment.rated_items`` held-out prompts of ``ppo.question_types``, ``rated_samples``
    each at ``ppo.temperature``), rated by ShapesWorld's checker: where PPO takes a policy, is its RM
    still right? (The held-out preference pairs are planted lies, not what a policy writes.)
    {source: {"faithful": share of faithful samples, "pairs": n, "vanilla": acc, "fact": acc,
    "by_kind": {false-claim kind: {"pairs", "vanilla", "fact"}}}}; written to
    ``<out>/seed<s>/rated/`` with the pairs, and read back while newer than both arms' PPO."""
    import torch

    from factrl.model.io import load_adapter
    from factrl.trainers.data import load_captions, load_preferences
    from factrl.trainers.eval_stage import make_generate_fn
    from factrl.trainers.rm import Reading, check_reading, score_pairs
    from factrl.trainers.setup import load_assets
    from factrl.trainers.shapesworld.dataset import load_scenes
    from factrl.trainers.shapesworld.scoring import rated_pairs

    e = cfg.experiment
    d = out / f"seed{seed}" / "rated"
    layouts = {arm: RunLayout(out / f"seed{seed}" / arm) for arm in ARMS}
    saved = d / "result.json"
    newest = max(lay.done("ppo").stat().st_mtime for lay in layouts.values())
    if saved.is_file() and saved.stat().st_mtime >= newest:
        got = json.loads(saved.read_text())
        if got.get("settings") == [e.rated_items, e.rated_samples, cfg.ppo.temperature]:
            print(f"[factrl] seed{seed} rated pairs: {saved} exists, reading it back")
            return got["result"]
    print(f"[factrl] === seed{seed} RMs on the policies' own samples ===")
    c = arm_config(cfg, out, seed, "fact")
    root = Path(c.data.root)
    types = set(c.ppo.question_types)
    sets = [json.loads((root / c.data.eval_dir / f"{name}.json").read_text()) for name in ("mmhal", "chair")]
    items = [it for s in sets for it in s if not types or it.get("category") in types][:e.rated_items]
    device = resolve_device(c.run.device)
    a = load_assets(c, Path(c.ppo.base), quantize=c.model.quantize, device=device)
    model, tok = a.model, a.tokenizer
    model.eval()
    for arm, lay in layouts.items():
        load_adapter(model, lay.policy_adapter, f"policy_{arm}", trainable=False)
    gen = torch.Generator(device=device).manual_seed(seed)
    scenes = load_scenes(root / "scenes.json")
    repeated = [it for it in items for _ in range(e.rated_samples)]
    files, records, faithful = {}, {}, {}
    for src in SOURCES:
        sample = make_generate_fn(model, tok, a.images, a.num_image_tokens, None if src == "sft" else f"policy_{src}",
                                  c.ppo.max_response_len, device, c.data.system_prompt,
                                  temperature=c.ppo.temperature, generator=gen)
        n = c.ppo.rollout_chunk_size  # sequences generated at once, as in PPO's rollouts
        texts = [t for k in range(0, len(repeated), n) for t in sample(repeated[k:k + n])]
        per_item = [texts[i * e.rated_samples:(i + 1) * e.rated_samples] for i in range(len(items))]
        records[src], faithful[src] = rated_pairs(items, per_item, scenes, seed=seed)
        files[src] = d / f"{src}_pairs.json"
        write_atomic(files[src], json.dumps(records[src], indent=1) + "\n")
    captions = load_captions(root / c.data.captions_file)
    right: dict = {}  # (arm, source) -> {pair id: the RM prefers the faithful sample}
    reading = Reading.of(c.rm)
    for arm, lay in layouts.items():
        check_reading(lay.reward_adapter, reading)
        load_adapter(model, lay.reward_adapter, "reward", trainable=False)
        for src, f in files.items():
            pairs = load_preferences(f, tok, a.num_image_tokens, c.data.max_seq_len, captions, arm == "fact",
                                     template=c.data.fact_template, image_folder=str(root / c.data.image_folder),
                                     system=c.data.system_prompt, seed=seed, shuffle_captions=c.data.shuffle_captions)
            triples = score_pairs(model, pairs, c.eval.batch_size, tok.pad_token_id, a.images, device, reading)
            right[arm, src] = {p.id: rc > rr for p, (rc, rr, _) in zip(pairs, triples)}
    acc = lambda arm, src, ids: (sum(right[arm, src][i] for i in ids) / len(ids)) if ids else None  # noqa: E731
    result = {}
    for src in SOURCES:
        recs = [r for r in records[src] if all(r["id"] in right[arm, src] for arm in ARMS)]
        kinds = sorted({k for r in recs for k in r["false_kinds"] or ["answer"]})
        of = {k: [r["id"] for r in recs if k in (r["false_kinds"] or ["answer"])] for k in kinds}
        ids = [r["id"] for r in recs]
        result[src] = {"faithful": faithful[src], "pairs": len(ids), **{arm: acc(arm, src, ids) for arm in ARMS},
                       "by_kind": {k: {"pairs": len(v), **{arm: acc(arm, src, v) for arm in ARMS}}
                                   for k, v in of.items()}}
    write_atomic(saved, json.dumps({"settings": [e.rated_items, e.rated_samples, cfg.ppo.temperature],
                                    "result": result}, indent=1) + "\n")
    return result


def ppo_curve(metrics: Path) -> list[dict]:
    """The PPO rows' reward and held-out eval numbers, step by step (step 0: the eval before training)."""
    rows = [{"step": r["step"], **{k: r[k] for k in CURVE_KEYS if isinstance(r.get(k), (int, float))}}
            for r in read_metrics(metrics)]
    return [r for r in rows if len(r) > 1]


# ---- aggregation: pure functions over results.json ----------------------------------------------------
def mean_std(values: Iterable) -> Optional[dict]:
    """{"mean", "std", "n"} of the numbers among ``values`` (None skipped); std is the sample std
    (n − 1 in the denominator), 0 for one number; None when there is no number."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return {"mean": m, "std": sd, "n": len(xs)}


def _mean(v) -> Optional[float]:
    return v["mean"] if isinstance(v, dict) else v


def summarize(results: dict) -> dict:
    """Mean ± std over seeds of every table entry: ``rows`` {key: {sft: value, arm: mean_std}},
    ``categories`` {MMHal category: same, of the hallucination rate}, ``rm_types`` {question type:
    {arm: {accuracy, accuracy_hallucination: mean_std, n, n_hallucination: mean pairs}}}."""
    evals = {arm: [run["eval"] for run in runs.values()] for arm, runs in results["arms"].items()}
    sft = headline(results["sft"])
    rows = {key: {"sft": sft[key], **{arm: mean_std(headline(r)[key] for r in rs) for arm, rs in evals.items()}}
            for _, key in ROWS}
    cat_rate = lambda r, c: dig(r, "mmhal", "per_category", c, "hallucination_rate")  # noqa: E731
    cats = sorted({c for r in [results["sft"], *(r for rs in evals.values() for r in rs)]
                   for c in (dig(r, "mmhal", "per_category") or {})})
    categories = {c: {"sft": cat_rate(results["sft"], c), "n": dig(results["sft"], "mmhal", "per_category", c, "n"),
                      **{arm: mean_std(cat_rate(r, c) for r in rs) for arm, rs in evals.items()}} for c in cats}
    types = sorted({t for rs in evals.values() for r in rs for t in dig(r, "rm", "per_question_type") or {}})
    rm_types = {t: {arm: _rm_type(rs, t) for arm, rs in evals.items()} for t in types}
    lies = sorted({k for rs in evals.values() for r in rs for k in dig(r, "rm", "per_lie_kind") or {}})
    rm_lies = {k: {arm: _rm_type(rs, k, "per_lie_kind") for arm, rs in evals.items()} for k in lies}
    rm_train = {arm: mean_std(run.get("rm_train_accuracy") for run in runs.values())
                for arm, runs in results["arms"].items()}
    rated = list((results.get("rated") or {}).values())
    on_samples = {src: {"faithful": mean_std(dig(r, src, "faithful") for r in rated),
                        "pairs": _mean(mean_std(dig(r, src, "pairs") for r in rated)),
                        **{arm: mean_std(dig(r, src, arm) for r in rated) for arm in ARMS}}
                  for src in SOURCES if any(src in r for r in rated)}
    if rated:  # per seed, the RM's accuracy averaged over whose samples (SFT, each policy)
        on_samples["mean"] = {arm: mean_std(_mean(mean_std(dig(r, src, arm) for src in SOURCES)) for r in rated)
                              for arm in ARMS}
    trained = results.get("rm_question_types") or []
    rm_trained = {arm: mean_std(_pooled_hallucination(r, trained) for r in rs) for arm, rs in evals.items()} \
        if trained else None
    return {"rows": rows, "categories": categories, "rm_types": rm_types, "rm_lies": rm_lies, "rm_train": rm_train,
            "rated": on_samples, "rm_trained": rm_trained, "rm_question_types": trained}


def _pooled_hallucination(ev: dict, types: list) -> Optional[float]:
    """An RM's accuracy on the held-out hallucination pairs of the question ``types`` (pooled)."""
    per = [dig(ev, "rm", "per_question_type", t) or {} for t in types]
    n = sum(p.get("n_hallucination") or 0 for p in per)
    return sum((p.get("accuracy_hallucination") or 0.0) * (p.get("n_hallucination") or 0) for p in per) / n \
        if n else None


def acceptance(summary: dict) -> list[dict]:
    """The issue's acceptance checks on a summary (``summarize``), each {"check", "value", "passed"}:
    Fact-RLHF's hallucination rate below SFT's by more than twice its std over seeds and below
    vanilla-RLHF's by more than twice the larger of the two arms' stds; its POPE F1 (adversarial) and
    MMHal score at least SFT's (the score guards against abstention: answering "." to everything never
    hallucinates, and ShapesWorld's checker-reward PPO found exactly that); the fact RM above the vanilla
    one on held-out hallucination pairs by twice the larger std. ``passed`` is None where a number is
    missing or there is a single seed (no spread to compare with)."""
    rows = summary["rows"]
    fact, van = rows["hallucination_rate"]["fact"], rows["hallucination_rate"]["vanilla"]
    sft = rows["hallucination_rate"]["sft"]
    out = []

    def check(name, value, margin, ok):
        spread = None if margin is None else 2 * margin
        out.append({"check": name, "value": value, "margin": spread,
                    "passed": None if value is None or spread is None else bool(ok(value, spread))})

    def sd(*vs):  # the larger std, None with one seed or a missing arm
        if any(not isinstance(v, dict) or v["n"] < 2 for v in vs):
            return None
        return max(v["std"] for v in vs)

    def diff(a, b):
        return None if a is None or b is None else _mean(a) - _mean(b)

    check("hallucination rate: SFT − Fact-RLHF > 2 std", diff(sft, fact), sd(fact), lambda v, m: v > m)
    check("hallucination rate: vanilla-RLHF − Fact-RLHF > 2 std", diff(van, fact), sd(fact, van), lambda v, m: v > m)
    for key, name in (("pope_f1_adversarial", "POPE F1 adversarial"), ("mmhal_score", "MMHal score")):
        check(f"{name}: Fact-RLHF − SFT ≥ 0", diff(rows[key]["fact"], rows[key]["sft"]), 0.0, lambda v, m: v >= 0)
    rf, rv = rows["rm_accuracy_hallucination"]["fact"], rows["rm_accuracy_hallucination"]["vanilla"]
    check("RM accuracy on hallucination pairs: fact − vanilla > 2 std", diff(rf, rv), sd(rf, rv), lambda v, m: v > m)
    tr = summary.get("rm_trained")
    if tr:  # the same on the question types the RMs were trained on (rm.question_types): the others
        # are pairs neither RM saw a type of
        types = ", ".join(summary.get("rm_question_types") or [])
        check(f"RM accuracy on hallucination pairs of its question types ({types}): fact − vanilla > 2 std",
              diff(tr["fact"], tr["vanilla"]), sd(tr["fact"], tr["vanilla"]), lambda v, m: v > m)
    on = (summary.get("rated") or {}).get("mean")
    if on:
        check("RM accuracy on the policies' own samples: fact − vanilla > 2 std", diff(on["fact"], on["vanilla"]),
              sd(on["fact"], on["vanilla"]), lambda v, m: v > m)
    fits = [v for v in (summary.get("rm_train") or {}).values() if v is not None]
    if fits:  # does each RM fit its training pairs: its worst seed's accuracy over its last 10% of steps
        worst = min(v["mean"] - (v["std"] if v["n"] > 1 else 0.0) for v in fits)
        out.append({"check": f"both RMs fit their pairs: train accuracy (mean − std) ≥ {RM_FIT}", "value": worst,
                    "margin": None, "passed": worst >= RM_FIT})
    return out


RM_FIT = 0.8  # an RM "fits" its pairs when it orders this share of its own training batches right


def _rm_type(evals: list[dict], qtype: str, key: str = "per_question_type") -> dict:
    """One arm's RM on one question type (one group of ``key``) over seeds: accuracies as mean_std, pair
    counts as means (a fact RM prompt is longer, so it may drop more pairs as too long than a vanilla one)."""
    acc = [dig(r, "rm", key, qtype) or {} for r in evals]
    return {"accuracy": mean_std(a.get("accuracy") for a in acc),
            "accuracy_hallucination": mean_std(a.get("accuracy_hallucination") for a in acc),
            "n": _mean(mean_std(a.get("n") for a in acc)),
            "n_hallucination": _mean(mean_std(a.get("n_hallucination") for a in acc))}


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):
        return f"{v['mean']:.3f} ± {v['std']:.3f}" if v["n"] > 1 else f"{v['mean']:.3f}"
    return f"{v:.3f}"


def _md(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def format_tables(results: dict) -> str:
    """The experiment's tables in markdown (``results`` as ``run_experiment`` builds it)."""
    s = results.get("summary") or summarize(results)
    seeds = ", ".join(str(x) for x in results["seeds"])
    count = lambda v: "-" if v is None else f"{v:g}"  # noqa: E731  a mean over seeds may be fractional
    lines = ["## Held-out ShapesWorld: SFT vs vanilla RLHF vs Fact-RLHF", "",
             f"Mean ± sample std over seeds {seeds}. SFT is one model decoded greedily (no seed); "
             "RM rows: each arm's own reward model on the held-out preference pairs.", ""]
    lines += _md([""] + [name for _, name in COLUMNS],
                 [[label] + [_cell(s["rows"][key][col]) for col, _ in COLUMNS] for label, key in ROWS])
    checks = acceptance(s)
    verdict = {True: "yes", False: "**no**", None: "- (needs 2+ seeds)"}
    lines += ["", "## The issue's acceptance checks", ""]
    lines += _md(["check", "value", "needed", "met"],
                 [[c["check"], _cell(c["value"]), "-" if c["margin"] is None else f"{c['margin']:.3f}",
                   verdict[c["passed"]]] for c in checks])
    if s.get("rm_train"):
        lines += ["", "## The RMs' fit: accuracy on their own training batches, last 10% of steps ↑", ""]
        lines += _md(["", "vanilla RM", "fact RM"], [["train accuracy"] + [_cell(s["rm_train"].get(a)) for a in ARMS]])
    if s.get("rated"):
        names = {"sft": "SFT", **dict(COLUMNS), "mean": "mean over the three"}
        lines += ["", "## The RMs on the policies' own samples ↑", "",
                  "Pairs (faithful, hallucinated) of one prompt's samples at the rollout temperature, rated by "
                  "ShapesWorld's checker; each arm's RM, same seed.", ""]
        lines += _md(["whose samples", "faithful share", "pairs", "vanilla RM", "fact RM"],
                     [[names[src], _cell(v.get("faithful")), count(v.get("pairs"))] + [_cell(v.get(a)) for a in ARMS]
                      for src, v in s["rated"].items()])
    lines += ["", "## Hallucination rate by MMHal category ↓", ""]
    lines += _md(["category", "items"] + [name for _, name in COLUMNS],
                 [[c, count(v["n"])] + [_cell(v[col]) for col, _ in COLUMNS] for c, v in s["categories"].items()])
    trained = s.get("rm_question_types") or []
    lies = {k: v for k, v in (s.get("rm_lies") or {}).items() if not trained or k.split(": ")[0] in trained}
    lie_note = ("Question types the RMs were trained on" + (f" ({', '.join(trained)})" if trained else "")
                + "; habit: the SFT data's own invented object, unhelpful: nothing false, less said.")
    for groups, key, title, n, head, note in (
            (s["rm_types"], "accuracy", "RM held-out pairwise accuracy by question type ↑", "n", "question type", ""),
            (s["rm_types"], "accuracy_hallucination", "The same on hallucination pairs only ↑", "n_hallucination",
             "question type", ""),
            (lies, "accuracy", "RM held-out accuracy by what the rejected output gets wrong ↑", "n",
             "question type: lie", lie_note)):
        rows = []
        for t, v in groups.items():
            got = [v.get(arm) or {} for arm in ARMS]
            if not any(g.get(n) for g in got):  # no pairs of this group (in this subset): omitted
                continue
            pairs = " / ".join(dict.fromkeys(count(g[n]) for g in got if g.get(n)))  # one number if they agree
            rows.append([t, pairs] + [_cell(g.get(key)) for g in got])
        if rows:
            lines += ["", f"## {title}", ""] + ([note, ""] if note else [])
            lines += _md([head, "pairs (vanilla / fact)", "vanilla RM", "fact RM"], rows)
    return "\n".join(lines)


def plot_experiment(results: dict, png: Path) -> Optional[Path]:
    """Top: headline metrics per column, each seed a dot, mean ± std as an error bar. Bottom: the PPO
    reward, RM score and held-out hallucination rate over steps, one line per seed and arm; and
    the RM's held-out accuracy per arm. None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colors = {"sft": "tab:gray", "vanilla": "tab:blue", "fact": "tab:orange"}
    names = dict(COLUMNS)
    top = [("hallucination_rate", "hallucination rate (MMHal) ↓"), ("mmhal_score", "MMHal score ↑"),
           ("pope_f1_adversarial", "POPE F1 adversarial ↑"), ("chair_i", "CHAIR_i ↓")]
    curves = [("reward", "PPO reward (total)"), ("reward/rm", "PPO reward: RM score"),
              ("eval/hallucination_rate", "held-out hallucination rate ↓")]
    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))

    def dots(ax, key, title):
        per = {"sft": [headline(results["sft"])[key]],
               **{arm: [headline(run["eval"])[key] for run in runs.values()]
                  for arm, runs in results["arms"].items()}}
        for x, (col, _) in enumerate(COLUMNS):
            ys = [y for y in per.get(col, []) if y is not None]
            if not ys:
                continue
            jitter = [x + 0.06 * (i - (len(ys) - 1) / 2) for i in range(len(ys))]
            ax.scatter(jitter, ys, color=colors[col], alpha=0.7, zorder=3)
            if len(ys) > 1:
                ms = mean_std(ys)
                ax.errorbar([x + 0.25], [ms["mean"]], yerr=[ms["std"]], fmt="D", color="black", capsize=4, zorder=4)
        ax.set_xticks(range(len(COLUMNS)), [name for _, name in COLUMNS])
        ax.set_xlim(-0.5, len(COLUMNS) - 0.5)
        ax.set_title(title)

    for ax, (key, title) in zip(axes[0], top):
        dots(ax, key, title)
    styles = ["-", "--", ":", "-."]
    for ax, (key, title) in zip(axes[1], curves):
        for arm, runs in results["arms"].items():
            for i, (seed, run) in enumerate(runs.items()):
                pts = [(r["step"], r[key]) for r in run["curve"] if key in r]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[i % len(styles)], color=colors[arm],
                            marker="." if key.startswith("eval/") else None, label=f"{names[arm]} seed {seed}")
        ax.set_title(title)
        ax.set_xlabel("PPO step")
    axes[1][0].legend(fontsize=7)
    if results.get("rated"):  # both RMs on each source's own samples, every seed a dot
        ax = axes[1][3]
        for x, (src, name) in enumerate(COLUMNS):
            for j, arm in enumerate(ARMS):
                ys = [r[src][arm] for r in results["rated"].values() if r.get(src, {}).get(arm) is not None]
                ax.scatter([x + (j - 0.5) * 0.3] * len(ys), ys, color=colors[arm], alpha=0.7,
                           label=f"{arm} RM" if x == 0 else None)
        ax.set_xticks(range(len(COLUMNS)), [f"{name}'s" for _, name in COLUMNS])
        ax.set_title("RM accuracy on the policies' own samples ↑")
        ax.legend(fontsize=7)
    else:
        dots(axes[1][3], "rm_accuracy", "RM held-out accuracy ↑ (the arm's RM)")
    fig.suptitle(f"vanilla RLHF vs Fact-RLHF, seeds {', '.join(str(s) for s in results['seeds'])}")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png
