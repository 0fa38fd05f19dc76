"""``factrl eval``: the SFT model and the PPO policy side by side on the held-out sets.

Both run on the same NF4 base PPO used (SFT = adapters off, PPO = the ``policy`` adapter), so
the table isolates what RLHF changed. A third column, ``blind``, answers every question with the
SFT data's most frequent answer to it without looking at the image: the chance level a model must
beat. Also the reward model's pairwise accuracy on held-out preference pairs (overall, on the
hallucination pairs, per question type). Scoring is programmatic against the ShapesWorld facts
(trainers/shapesworld/scoring.py). ``ppo_eval_fn`` is the same scoring on a few held-out items,
as the hook ``train_ppo`` calls during training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch

from factrl.trainers.config import Config
from factrl.trainers.data import _record_id, pad, pad_mask, render_query
from factrl.trainers.metrics import format_table, rm_accuracy, rm_accuracy_by
from factrl.trainers.run import RunLayout
from factrl.trainers.setup import Assets, load_assets, stage_base
from factrl.trainers.shapesworld.scoring import blind_answers, run_eval
from factrl.trainers.stage import Stage


def make_generate_fn(model, tok, images, num_image_tokens: int, adapter, max_new_tokens: int, device):
    """items → greedy answers, with ``adapter`` active (None = the base)."""

    @torch.no_grad()
    def generate(items: list[dict]) -> list[str]:
        queries = [render_query(tok, it["question"], num_image_tokens, has_image=bool(it.get("image")))
                   for it in items]
        ids = pad(queries, tok.pad_token_id, left=True).to(device)
        mask = pad_mask(queries, left=True).to(device)
        px = [images(it["image"]) for it in items if it.get("image")]
        feats = model.encode_images(torch.stack(px).to(device)) if px else None
        with model.adapter(adapter):
            g = model.generate(ids, mask, image_features=feats, max_new_tokens=max_new_tokens, greedy=True,
                               suppress_ids=(model.image_token_id, tok.pad_token_id))
        return [tok.decode(g.tokens[i, :int(g.lengths[i])].tolist(), skip_special_tokens=True).strip()
                for i in range(len(items))]

    return generate


def rm_eval(model, a, cfg: Config, device) -> dict:
    """The reward model's pairwise accuracy on the held-out preference pairs ({} without an RM),
    and ``per_question_type`` when the records carry a ``question_type``."""
    from factrl.trainers.rm import ROLE, load_pairs, score_pairs

    if ROLE not in model.adapter_state.names:
        return {}
    _, held = load_pairs(cfg, a, cfg.rm.fact_augmented, held_only=True)
    triples = score_pairs(model, held, cfg.eval.batch_size, a.tokenizer.pad_token_id, a.images, device)
    res = rm_accuracy(triples)
    types = question_types(cfg, a.data_root)
    if types:  # scored pairs are in load order; pairs dropped as too long are simply absent
        res["per_question_type"] = rm_accuracy_by(triples, [types.get(e.id) for e in held])
    return res


def question_types(cfg: Config, root: Path) -> dict[str, str]:
    """{record id: question_type} of the file the held-out pairs come from (as ``rm.load_pairs``)."""
    name = cfg.data.preference_eval_file
    path = root / (name if name and (root / name).is_file() else cfg.data.preference_file)
    with open(path) as f:
        records = json.load(f)
    return {_record_id(r, path, i): str(r["question_type"]) for i, r in enumerate(records)
            if isinstance(r, dict) and r.get("question_type") is not None}


COLUMNS = ("sft", "ppo", "blind")


def evaluate_stages(cfg: Config, columns=COLUMNS) -> dict:
    """``factrl eval``: the ``columns`` (of sft, ppo, blind) side by side; the headline numbers."""
    results = evaluate_models(cfg, columns)
    table = format_table(results)
    print(table)
    out = RunLayout(Path(cfg.run.out_dir)).stage("eval")
    (out / "table.txt").write_text(table + "\n")
    summary = {name: headline(r) for name, r in results.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def evaluate_models(cfg: Config, columns=COLUMNS) -> dict:
    """{column: full results} for the ``columns`` that exist (ppo needs a policy adapter, blind the
    SFT data); each also written to ``<run.out_dir>/eval/<column>.json``, RM accuracy included."""
    from factrl.model.io import load_adapter

    unknown = sorted(set(columns) - set(COLUMNS))
    if unknown:
        raise ValueError(f"unknown eval columns {unknown} (known: {', '.join(COLUMNS)})")
    sets = sorted((Path(cfg.data.root) / cfg.data.eval_dir).glob("*.json"))
    if not sets:  # an all-"-" table that exits 0 would look like a result
        from factrl.trainers.data import DataError

        raise DataError(Path(cfg.data.root) / cfg.data.eval_dir, msg="no eval sets (*.json) there: nothing to "
                        "evaluate (data.root / data.eval_dir; ShapesWorld writes POPE, MMHal and CHAIR sets)")
    stage = Stage(cfg, "eval", trains=False)
    device, layout, out = stage.device, stage.layout, stage.out
    a = load_assets(cfg, stage_base(cfg, layout, cfg.ppo.base), quantize=cfg.model.quantize, device=device)
    model = a.model.eval()
    rm_dir = Path(cfg.ppo.reward_adapter or layout.reward_adapter)
    policy_dir = layout.policy_adapter
    if rm_dir.is_dir():
        load_adapter(model, rm_dir, "reward", trainable=False)
    adapters = {"sft": None} if "sft" in columns else {}
    if "ppo" in columns and policy_dir.is_dir():
        load_adapter(model, policy_dir, "policy", trainable=False)
        adapters["ppo"] = "policy"
    rm = rm_eval(model, a, cfg, device) if adapters else {}
    gens = {name: make_generate_fn(model, a.tokenizer, a.images, a.num_image_tokens, adapter,
                                   cfg.eval.max_new_tokens, device) for name, adapter in adapters.items()}
    sft_file = a.data_root / cfg.data.sft_file
    if "blind" in columns and sft_file.is_file():  # the blind baseline needs the SFT answers
        with open(sft_file) as f:
            gens["blind"] = blind_answers(json.load(f))
    if not gens:
        raise ValueError(f"nothing to evaluate: none of the columns {', '.join(columns)} exists in {cfg.run.out_dir}")
    results = {}
    for name, gen in gens.items():
        res = run_eval(gen, a.data_root, max_items=cfg.eval.max_items or None, progress=cfg.run.progress,
                       batch_size=cfg.eval.batch_size, eval_dir=cfg.data.eval_dir)
        if rm and name != "blind":
            res["rm"] = rm
        (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        results[name] = res
    return results


def ppo_eval_fn(cfg: Config) -> Optional[Callable[[Assets, int], dict]]:
    """The hook ``train_ppo`` calls every ``ppo.eval_every`` steps (None when 0) with its own assets:
    the policy's greedy answers to the first ``ppo.eval_items`` items of MMHal and POPE adversarial,
    scored."""
    if cfg.ppo.eval_every <= 0:
        return None

    def eval_fn(a: Assets, step: int) -> dict:
        gen = make_generate_fn(a.model, a.tokenizer, a.images, a.num_image_tokens, "policy",
                               cfg.eval.max_new_tokens, a.model.embed_tokens.weight.device)
        res = run_eval(gen, a.data_root, max_items=cfg.ppo.eval_items, progress=False,
                       batch_size=cfg.eval.batch_size, eval_dir=cfg.data.eval_dir,
                       only=("mmhal", "pope_adversarial"))
        h = headline(res)
        keys = ("hallucination_rate", "mmhal_score", "pope_f1_adversarial", "pope_yes_ratio_adversarial")
        return {k: h[k] for k in keys if h[k] is not None}

    return eval_fn


def headline(r: dict) -> dict:
    """The few numbers the pipeline's last JSON line carries."""
    g = lambda *p: dig(r, *p)  # noqa: E731
    return {"hallucination_rate": g("hallucination_rate"), "mmhal_score": g("mmhal", "score"),
            "pope_accuracy_random": g("pope", "random", "accuracy"),
            "pope_accuracy_adversarial": g("pope", "adversarial", "accuracy"),
            "pope_f1_random": g("pope", "random", "f1"), "pope_f1_popular": g("pope", "popular", "f1"),
            "pope_f1_adversarial": g("pope", "adversarial", "f1"),
            "pope_yes_ratio_adversarial": g("pope", "adversarial", "yes_ratio"), "chair_i": g("chair", "chair_i"),
            "chair_s": g("chair", "chair_s"), "chair_coverage": g("chair", "coverage"),
            "mmhal_response_words": g("mmhal", "response_words"), "rm_accuracy": g("rm", "accuracy"),
            "rm_accuracy_hallucination": g("rm", "accuracy_hallucination")}


def dig(d, *path):
    """``d[k1][k2]...`` along ``path``, None where a key is missing (results may lack a set)."""
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d
