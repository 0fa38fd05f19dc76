"""Scoring any model against ShapesWorld's facts: ``run_eval(generate_fn, data_root)`` runs every
eval set in ``data_root/eval`` (``generate_fn(items) -> responses``) and scores POPE, MMHal-style
(``grammar.check_answer``) and CHAIR; ``blind_answers(sft_records)`` is a "model" that never sees the
image (what chance means for these questions)."""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Iterable, Optional

from factrl.trainers.metrics import chair_metrics, format_table, mmhal_score, parse_yes_no, pope_metrics

from .dataset import EVAL_SETS, load_scenes
from .grammar import check_answer, mentioned_objects
from .scenes import Scene


def chair(responses: list[str], scenes: list[Scene]) -> dict:
    """CHAIR on descriptions (``metrics.chair_metrics``): a mention is a (color, shape) object a response
    names; it is hallucinated when the scene has no object of that colour and shape."""
    return chair_metrics([mentioned_objects(t) for t in responses],
                         [{(o.color, o.shape) for o in s.objects} for s in scenes])


def blind_answers(sft_records: Iterable[dict]) -> Callable[[list[dict]], list[str]]:
    """A generate_fn that never looks at the image: to each question, the answer the SFT data gives
    most often to that same question text ("" if it never asks it). A model must beat this to be
    using the image - e.g. "What is at the top?" is right 2 times in 3 with "There is nothing at
    the top.", and POPE's always-"yes" already has F1 0.67."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for rec in sft_records:
        conv = rec.get("conversations", [])
        for h, g in zip(conv[0::2], conv[1::2]):
            counts[h["value"].replace("<image>", "").strip()][g["value"]] += 1
    best = {q: c.most_common(1)[0][0] for q, c in counts.items()}
    return lambda items: [best.get(it["question"].strip(), "") for it in items]


def checker_reward(data_root, ppo_prompts_file: str, vague: float) -> Callable:
    """``ppo.reward_source=checker``: train_ppo's ``reward_fn(prompts, responses) -> [B]``, each response
    scored against its scene's facts (``grammar.check_answer``): +1 correct, -1 hallucinated,
    ``vague`` otherwise. Every PPO record must carry its question's ``spec`` (ShapesWorld writes it);
    checked here, before PPO starts."""
    import torch

    from factrl.trainers.data import DataError

    root = Path(data_root)
    if not (root / "scenes.json").is_file():
        raise DataError(root / "scenes.json", msg="not found: ppo.reward_source=checker scores against "
                        "ShapesWorld's facts (the embedded world's data)")
    scenes = load_scenes(root / "scenes.json")
    path = root / ppo_prompts_file
    specs = {}
    for i, rec in enumerate(json.loads(path.read_text())):
        if not isinstance(rec.get("spec"), dict):
            raise DataError(path, i, "spec", "missing: ppo.reward_source=checker needs each prompt's question spec")
        if rec.get("image") not in scenes:
            raise DataError(path, i, "image", f"{rec.get('image')!r} is not a scene of scenes.json")
        specs[str(rec.get("id", i))] = (scenes[rec["image"]], rec["spec"])

    def reward_fn(prompts: list, responses: list[str]) -> torch.Tensor:
        out = []
        for p, text in zip(prompts, responses):
            c = check_answer(text, specs[p.id][1], specs[p.id][0])
            out.append(1.0 if c["correct"] else -1.0 if c["hallucination"] else vague)
        return torch.tensor(out)

    return reward_fn


_PASS_KEYS = ("id", "image", "question", "category", "spec")  # what generate_fn sees (no answers)


def run_eval(
    generate_fn: Callable[[list[dict]], list[str]],
    data_root,
    max_items: Optional[int] = None,
    progress: bool = True,
    batch_size: int = 16,
    eval_dir: str = "eval",
    out_path=None,
    only: Optional[Iterable[str]] = None,
) -> dict:
    """Generate answers for every eval set under ``data_root/eval_dir`` and score them.

    generate_fn(items) -> list[str]: items are dicts with "id", "image" (file name relative to the
    images folder), "question" (plain text; the caller renders and tokenizes), "category", "spec";
    called with at most ``batch_size`` items; identical (image, question) pairs are asked once.
    max_items caps each eval set; ``only`` names the ones to run (default: all of ``EVAL_SETS``).
    Returns the results dict (also written to ``out_path`` as JSON).
    """
    root = Path(data_root)
    if not (root / "scenes.json").is_file():
        raise FileNotFoundError(
            f"{root}/scenes.json not found: run_eval scores against ShapesWorld facts "
            "(write a dataset with shapesworld.dataset.write_dataset)"
        )
    scenes = load_scenes(root / "scenes.json")
    wanted = EVAL_SETS if only is None else list(only)
    unknown = sorted(set(wanted) - set(EVAL_SETS))
    if unknown:
        raise ValueError(f"unknown eval sets {unknown} (known: {', '.join(EVAL_SETS)})")
    sets: dict[str, list[dict]] = {}
    for name in wanted:
        p = root / eval_dir / f"{name}.json"
        if p.is_file():
            with open(p) as f:
                sets[name] = json.load(f)[: max_items if max_items else None]
    queries: dict[tuple[str, str], dict] = {}
    for items in sets.values():
        for it in items:
            queries.setdefault((it["image"], it["question"]), {k: it[k] for k in _PASS_KEYS if k in it})
    keys = list(queries)
    responses: dict[tuple[str, str], str] = {}
    batches = range(0, len(keys), batch_size)
    if progress:
        try:
            from tqdm import tqdm

            batches = tqdm(batches, desc="eval", unit="batch", file=sys.stderr)
        except ImportError:  # pragma: no cover
            pass
    for i in batches:
        chunk = keys[i : i + batch_size]
        outs = generate_fn([dict(queries[k]) for k in chunk])
        if len(outs) != len(chunk):
            raise ValueError(f"generate_fn returned {len(outs)} responses for {len(chunk)} items")
        responses.update({k: str(o) for k, o in zip(chunk, outs)})

    res: dict = {"pope": {}, "n_generated": len(keys), "samples": []}
    for split in ("random", "popular", "adversarial"):
        items = sets.get(f"pope_{split}")
        if items:
            preds = [parse_yes_no(responses[(it["image"], it["question"])]) for it in items]
            res["pope"][split] = pope_metrics(preds, [it["label"] for it in items])
    if sets.get("mmhal"):
        recs, words = [], 0
        for it in sets["mmhal"]:
            r = responses[(it["image"], it["question"])]
            words += len(r.split())
            c = check_answer(r, it["spec"], scenes[it["image"]])
            recs.append({"category": it["category"], **c})
            if len(res["samples"]) < 8:
                res["samples"].append(
                    {
                        "question": it["question"],
                        "response": r,
                        "correct": c["correct"],
                        "hallucination": c["hallucination"],
                    }
                )
        res["mmhal"] = mmhal_score(recs)
        res["mmhal"]["response_words"] = words / len(recs)  # mean answer length: does RLHF make answers longer?
        res["hallucination_rate"] = res["mmhal"]["hallucination_rate"]
    if sets.get("chair"):
        rs = [responses[(it["image"], it["question"])] for it in sets["chair"]]
        res["chair"] = chair(rs, [scenes[it["image"]] for it in sets["chair"]])
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(res, indent=1, default=str) + "\n")
    if progress:
        print(format_table({"model": res}), file=sys.stderr)
    return res


def rated_pairs(items: list[dict], samples: list[list[str]], scenes: dict[str, Scene], per_item: int = 4,
                seed: int = 0) -> tuple[list[dict], float]:
    """Preference records (the RM files' format) from a policy's own samples, rated by the checker:
    for each item, up to ``per_item`` pairs (faithful sample, hallucinated sample), distinct texts,
    the faithful one preferred, in random order — as the paper's human raters compare two of the SFT
    model's own responses. ``items`` are eval items (image, question, spec), ``samples[i]`` the
    responses drawn for ``items[i]``. Each record also carries ``false_kinds``: the kinds of the
    rejected sample's false claims (not text). Returns (records, share of all samples that are faithful)."""
    import random

    from .dataset import _conversation

    rng = random.Random(seed)
    out, n_faithful, n = [], 0, 0
    for it, texts in zip(items, samples):
        scene = scenes[it["image"]]
        checked = {t: check_answer(t, it["spec"], scene) for t in dict.fromkeys(texts)}
        n_faithful += sum(not checked[t]["hallucination"] for t in texts)
        n += len(texts)
        good = [t for t, c in checked.items() if not c["hallucination"]]
        bad = [t for t, c in checked.items() if c["hallucination"]]
        combos = [(g, b) for g in good for b in bad]
        for g, b in rng.sample(combos, min(per_item, len(combos))):
            pref = rng.choice((1, 2))
            out.append({"id": f"{it['id']}-rated{len(out)}", "image": it["image"],
                        "conversations": _conversation([(it["question"], g)]),
                        "output_1": {"value": g if pref == 1 else b}, "output_2": {"value": b if pref == 1 else g},
                        "preference": pref, "hallucination": True, "question_type": it.get("category", ""),
                        "false_kinds": sorted({c[0] for c in checked[b]["false_claims"]})})
    return out, n_faithful / max(1, n)
