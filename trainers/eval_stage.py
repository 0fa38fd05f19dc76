"""``factrl eval``: the SFT model and the PPO policy side by side on the held-out sets.

Both run on the same NF4 base PPO used (SFT = adapters off, PPO = the ``policy`` adapter), so
the table isolates what RLHF changed. A third column, ``blind``, answers every question with the
SFT data's most frequent answer to it without looking at the image: the chance level a model must
beat. Also the reward model's pairwise accuracy on held-out preference pairs. Scoring is
programmatic against the ShapesWorld facts (trainers/shapesworld/scoring.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from factrl.trainers.config import Config
from factrl.trainers.data import pad, pad_mask, render_query
from factrl.trainers.metrics import format_table, rm_accuracy
from factrl.trainers.setup import load_assets, stage_base
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
    """The reward model's pairwise accuracy on the held-out preference pairs ({} without an RM)."""
    from factrl.trainers.rm import ROLE, load_pairs, score_pairs

    if ROLE not in model.adapter_state.names:
        return {}
    _, held = load_pairs(cfg, a, cfg.rm.fact_augmented, held_only=True)
    return rm_accuracy(score_pairs(model, held, cfg.eval.batch_size, a.tokenizer.pad_token_id, a.images, device))


def evaluate_stages(cfg: Config) -> dict:
    from factrl.model.io import load_adapter

    stage = Stage(cfg, "eval")
    device, layout, out = stage.device, stage.layout, stage.out
    a = load_assets(cfg, stage_base(cfg, layout, cfg.ppo.base), quantize=cfg.model.quantize, device=device)
    model = a.model.eval()
    rm_dir = Path(cfg.ppo.reward_adapter or layout.reward_adapter)
    policy_dir = layout.policy_adapter
    if rm_dir.is_dir():
        load_adapter(model, rm_dir, "reward", trainable=False)
    columns = {"sft": None}
    if policy_dir.is_dir():
        load_adapter(model, policy_dir, "policy", trainable=False)
        columns["ppo"] = "policy"
    rm = rm_eval(model, a, cfg, device)
    gens = {name: make_generate_fn(model, a.tokenizer, a.images, a.num_image_tokens, adapter,
                                   cfg.eval.max_new_tokens, device) for name, adapter in columns.items()}
    sft_file = a.data_root / cfg.data.sft_file
    if sft_file.is_file():  # the blind baseline needs the SFT answers; an eval-only data root has none
        with open(sft_file) as f:
            gens["blind"] = blind_answers(json.load(f))
    results = {}
    for name, gen in gens.items():
        res = run_eval(gen, a.data_root, max_items=cfg.eval.max_items or None, progress=cfg.run.progress,
                       batch_size=cfg.eval.batch_size, eval_dir=cfg.data.eval_dir, out_path=out / f"{name}.json")
        if rm and name != "blind":
            res["rm"] = rm
        results[name] = res
    table = format_table(results)
    print(table)
    (out / "table.txt").write_text(table + "\n")
    summary = {name: headline(r) for name, r in results.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def headline(r: dict) -> dict:
    """The few numbers the pipeline's last JSON line carries."""
    g = lambda *p: _get(r, p)  # noqa: E731
    return {"hallucination_rate": g("hallucination_rate"), "mmhal_score": g("mmhal", "score"),
            "pope_accuracy_random": g("pope", "random", "accuracy"),
            "pope_accuracy_adversarial": g("pope", "adversarial", "accuracy"),
            "pope_f1_random": g("pope", "random", "f1"), "pope_f1_popular": g("pope", "popular", "f1"),
            "pope_f1_adversarial": g("pope", "adversarial", "f1"), "chair_i": g("chair", "chair_i"),
            "chair_s": g("chair", "chair_s"), "rm_accuracy": g("rm", "accuracy"),
            "rm_accuracy_hallucination": g("rm", "accuracy_hallucination")}


def _get(d, path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d
