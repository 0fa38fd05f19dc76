"""Programmatic hallucination evaluation against exact scene facts (ShapesWorld).

Scorers (all pure functions, usable on their own):

* ``parse_yes_no(text)``      POPE's rule: first sentence; a "no"/"not" word -> "no", else "yes".
* ``parse_choice(text)``      the option letter A-D of a multiple-choice answer, or None.
* ``extract_claims(text)``    the facts an answer asserts, in ShapesWorld's closed grammar.
* ``check_claim(claim, scene)`` / ``check_answer(response, spec, scene)``
                              is each claim true; is the answer correct; does it hallucinate.
* ``pope_metrics(preds, labels)``   accuracy, precision, recall, F1, yes-ratio ("yes" = positive).
* ``chair(responses, scenes)``      CHAIR_i (hallucinated share of mentioned objects) and CHAIR_s
                              (share of responses with at least one hallucinated object).
* ``mmhal_score(records)``    per-category score and hallucination rate.
* ``rm_accuracy(triples)``    pairwise RM accuracy overall and on hallucination-flagged pairs.

``run_eval(generate_fn, data_root)`` runs every eval set in ``data_root/eval`` with any model
(``generate_fn(items) -> responses``); ``blind_answers(sft_records)`` is such a "model" that never
sees the image (what chance means for these questions); ``format_table`` prints models side by side.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Iterable, Optional

from .shapes import (
    BACKGROUNDS,
    COLORS,
    PLURALS,
    POSITIONS,
    SHAPES,
    SIZES,
    YESNO_TYPES,
    Scene,
    answer,
    load_scenes,
)

# ---- answer parsing ---------------------------------------------------------------------------


def parse_yes_no(text: str) -> str:
    """POPE's parser: keep the first sentence; "no" or "not" among its words -> "no", else "yes"."""
    first = text.split(".")[0].replace(",", " ")
    words = [w.strip("!?;:\"'()").lower() for w in first.split()]
    return "no" if ("no" in words or "not" in words) else "yes"


def parse_choice(text: str) -> Optional[str]:
    """ "B", "B.", "B. red", "(B) red", "The answer is B." -> "B"; None when no option letter is
    given. A bare letter followed by a word is not an option ("A red circle." starts with an article)."""
    m = re.match(r"\s*(?:\(([A-D])\)|([A-D])(?:[.):,]|\s*$))", text)
    if m:
        return m.group(1) or m.group(2)
    m = re.search(r"\b(?:answer|option) is \(?([A-D])\b", text)
    return m.group(1) if m else None


def _alt(words: Iterable[str]) -> str:
    # Longest first, so "top left" wins over "top" and "crosses" over "cross".
    return "(" + "|".join(sorted(map(re.escape, words), key=len, reverse=True)) + ")"


_C, _S, _Z, _B = _alt(COLORS), _alt(SHAPES), _alt(SIZES), _alt(BACKGROUNDS)
_P = _alt(POSITIONS.values())
_NOUN_TO_SHAPE = {
    **{s: s for s in SHAPES},
    **{p: s for s, p in PLURALS.items()},
    "shape": None,
    "shapes": None,
}
_N = _alt(_NOUN_TO_SHAPE)

# (pattern, claim builder). Patterns run over the lower-cased response with re.finditer, so a
# claim is found wherever it sits (descriptions chain many). None of them can match inside another
# claim's words (e.g. "is large" never matches "is larger": the \b fails).
_PATTERNS: list[tuple[re.Pattern, Callable]] = [
    (re.compile(rf"\bthe {_S} is {_C}\b"), lambda m: ("color_of", m[1], m[2])),
    (re.compile(rf"\bthe {_C} {_S} is {_Z}\b"), lambda m: ("size", m[1], m[2], m[3])),
    (re.compile(rf"\bthe {_C} {_S} is at the {_P}\b"), lambda m: ("at", m[1], m[2], m[3])),
    (
        re.compile(rf"\bthere (?:is|are) (\d+) (?:{_C} )?{_N}\b"),
        lambda m: ("count", m[2], _NOUN_TO_SHAPE[m[3]], int(m[1])),
    ),
    (re.compile(r"\bbackground with (\d+) (?:shapes|shape)\b"), lambda m: ("count", None, None, int(m[1]))),
    (re.compile(rf"\bthere is no (?:{_C} )?{_S}\b"), lambda m: ("count", m[1], m[2], 0)),
    (re.compile(rf"\bthere is nothing at the {_P}\b"), lambda m: ("empty", m[1])),
    (re.compile(rf"\b(?:{_Z} )?(?:{_C} )?{_S} at the {_P}\b"), lambda m: ("obj", m[1], m[2], m[3], m[4])),
    (re.compile(rf"\bthe background is {_B}\b"), lambda m: ("background", m[1])),
    (re.compile(rf"\ban? {_B} background\b"), lambda m: ("background", m[1])),
    (
        re.compile(rf"\bthe {_C} {_S} is larger than the {_C} {_S}\b"),
        lambda m: ("larger", (m[1], m[2]), (m[3], m[4])),
    ),
    (
        re.compile(rf"\bthe {_C} {_S} and the {_C} {_S} are the same size\b"),
        lambda m: ("same_size",) + tuple(sorted([(m[1], m[2]), (m[3], m[4])])),
    ),
]


def extract_claims(text: str) -> list[tuple]:
    """Every fact ``text`` asserts, as tuples (see ``check_claim``), in order, deduplicated."""
    t = " ".join(text.lower().split())
    found: list[tuple[int, tuple]] = []
    for pat, build in _PATTERNS:
        found += [(m.start(), build(m)) for m in pat.finditer(t)]
    out: list[tuple] = []
    for _, c in sorted(found, key=lambda x: x[0]):
        if c not in out:
            out.append(c)
    return out


def check_claim(claim: tuple, scene: Scene) -> bool:
    kind = claim[0]
    if kind == "color_of":
        return bool(scene.find(color=claim[2], shape=claim[1]))
    if kind == "size":
        return bool(scene.find(color=claim[1], shape=claim[2], size=claim[3]))
    if kind == "at":
        return bool(scene.find(color=claim[1], shape=claim[2], pos=claim[3]))
    if kind == "count":
        return len(scene.find(color=claim[1], shape=claim[2])) == claim[3]
    if kind == "empty":
        return not scene.find(pos=claim[1])
    if kind == "obj":
        return bool(scene.find(size=claim[1], color=claim[2], shape=claim[3], pos=claim[4]))
    if kind == "background":
        return scene.background == claim[1]
    if kind in ("larger", "same_size"):
        a, b = scene.find(*claim[1]), scene.find(*claim[2])
        if not a or not b:
            return False
        if kind == "larger":
            return a[0].size == "large" and b[0].size == "small"
        return a[0].size == b[0].size
    raise ValueError(f"unknown claim {claim!r}")


def check_answer(response: str, spec: dict, scene: Scene) -> dict:
    """Score one response to the question ``spec`` about ``scene``.

    hallucination: the response asserts something false about the image (a false claim, or the
    wrong yes/no / option). correct: no hallucination and it gives the faithful answer (for open
    questions: every claim of the canonical answer is among the response's claims).
    """
    claims = extract_claims(response)
    false = [c for c in claims if not check_claim(c, scene)]
    t = spec["type"]
    if t in YESNO_TYPES:
        right = parse_yes_no(response) == answer(spec, scene)[:-1].lower()
        halluc = bool(false) or not right
        correct = not halluc
    elif t == "choice":
        letter = parse_choice(response)
        halluc = bool(false) or (letter is not None and letter != spec["answer"])
        correct = not halluc and letter == spec["answer"]
    else:
        ref = extract_claims(answer(spec, scene))
        halluc = bool(false)
        correct = not halluc and bool(ref) and all(c in claims for c in ref)
    return {
        "correct": bool(correct),
        "hallucination": bool(halluc),
        "n_claims": len(claims),
        "false_claims": false,
    }


# ---- metrics ----------------------------------------------------------------------------------


def _yn(x) -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    x = str(x).strip().lower()
    if x not in ("yes", "no"):
        raise ValueError(f"expected 'yes'/'no', got {x!r}")
    return x


def pope_metrics(preds: list, labels: list) -> dict:
    """POPE metrics with "yes" as the positive class. preds/labels: "yes"/"no" (or bools)."""
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    p = [_yn(x) for x in preds]
    y = [_yn(x) for x in labels]
    tp = sum(a == "yes" and b == "yes" for a, b in zip(p, y))
    fp = sum(a == "yes" and b == "no" for a, b in zip(p, y))
    tn = sum(a == "no" and b == "no" for a, b in zip(p, y))
    fn = sum(a == "no" and b == "yes" for a, b in zip(p, y))
    n = len(p)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": prec,
        "recall": rec,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


_MENTION = re.compile(
    rf"\b{_C} ({'|'.join(sorted(list(SHAPES) + list(PLURALS.values()), key=len, reverse=True))})\b"
)


def mentioned_objects(text: str) -> list[tuple[str, str]]:
    """Unique (color, shape) objects a text mentions, in order (CHAIR's unit)."""
    out: list[tuple[str, str]] = []
    for m in _MENTION.finditer(text.lower()):
        obj = (m[1], _NOUN_TO_SHAPE[m[2]])
        if obj not in out:
            out.append(obj)
    return out


def chair(responses: list[str], scenes: list[Scene]) -> dict:
    """CHAIR on descriptions. A mention is a (color, shape) object named in a response (unique per
    response); it is hallucinated when the scene has no object of that colour and shape.
    CHAIR_i = hallucinated mentions / mentions; CHAIR_s = responses with >=1 / responses;
    coverage = share of scene objects mentioned (recall, so silence cannot score well)."""
    n_m = n_h = n_s = covered = total = 0
    for text, scene in zip(responses, scenes, strict=True):
        objs = mentioned_objects(text)
        bad = [o for o in objs if not scene.find(color=o[0], shape=o[1])]
        n_m += len(objs)
        n_h += len(bad)
        n_s += bool(bad)
        present = {(o.color, o.shape) for o in scene.objects}
        covered += len(present & set(objs))
        total += len(present)
    n = len(responses)
    return {
        "chair_i": n_h / n_m if n_m else 0.0,
        "chair_s": n_s / n if n else 0.0,
        "coverage": covered / total if total else 0.0,
        "n": n,
        "n_mentions": n_m,
    }


def mmhal_score(records: list[dict]) -> dict:
    """records: dicts with "category", "correct", "hallucination" (from check_answer).
    Item score: 1 correct, 0.5 no hallucination but not the answer (vague/incomplete), 0
    hallucination. Returns overall and per-category score and hallucination rate."""

    def agg(rs):
        n = len(rs)
        score = sum(1.0 if r["correct"] else (0.0 if r["hallucination"] else 0.5) for r in rs)
        return {
            "score": score / n if n else 0.0,
            "hallucination_rate": sum(bool(r["hallucination"]) for r in rs) / n if n else 0.0,
            "n": n,
        }

    cats: dict[str, list] = {}
    for r in records:
        cats.setdefault(r["category"], []).append(r)
    out = agg(records)
    out["per_category"] = {c: agg(rs) for c, rs in sorted(cats.items())}
    return out


def rm_accuracy(triples: Iterable) -> dict:
    """triples: (r_chosen, r_rejected, hallucination) with hallucination True/False/None(-1 unknown).
    A pair counts as right when r_chosen > r_rejected (ties are wrong)."""
    tot, hal, non = [0, 0], [0, 0], [0, 0]
    for rc, rr, h in triples:
        ok = float(rc) > float(rr)
        flag = None if h is None or (not isinstance(h, bool) and int(h) == -1) else bool(h)
        for acc, use in ((tot, True), (hal, flag is True), (non, flag is False)):
            if use:
                acc[0] += ok
                acc[1] += 1
    f = lambda a: a[0] / a[1] if a[1] else None
    return {
        "accuracy": f(tot),
        "n": tot[1],
        "accuracy_hallucination": f(hal),
        "n_hallucination": hal[1],
        "accuracy_non_hallucination": f(non),
        "n_non_hallucination": non[1],
    }


# ---- the blind baseline -----------------------------------------------------------------------


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


# ---- the runner -------------------------------------------------------------------------------

EVAL_SETS = ["pope_random", "pope_popular", "pope_adversarial", "mmhal", "chair"]
_PASS_KEYS = ("id", "image", "question", "category", "spec")  # what generate_fn sees (no answers)


def run_eval(
    generate_fn: Callable[[list[dict]], list[str]],
    data_root,
    max_items: Optional[int] = None,
    progress: bool = True,
    batch_size: int = 16,
    eval_dir: str = "eval",
    out_path=None,
) -> dict:
    """Generate answers for every eval set under ``data_root/eval_dir`` and score them.

    generate_fn(items) -> list[str]: items are dicts with "id", "image" (file name relative to the
    images folder), "question" (plain text; the caller renders and tokenizes), "category", "spec";
    called with at most ``batch_size`` items; identical (image, question) pairs are asked once.
    max_items caps each eval set. Returns the results dict (also written to ``out_path`` as JSON).
    """
    root = Path(data_root)
    if not (root / "scenes.json").is_file():
        raise FileNotFoundError(
            f"{root}/scenes.json not found: run_eval scores against ShapesWorld facts "
            "(write a dataset with shapes.write_dataset)"
        )
    scenes = load_scenes(root / "scenes.json")
    sets: dict[str, list[dict]] = {}
    for name in EVAL_SETS:
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
        recs = []
        for it in sets["mmhal"]:
            r = responses[(it["image"], it["question"])]
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


_ROWS = [
    ("hallucination rate (MMHal) ↓", ("hallucination_rate",)),
    ("MMHal score ↑", ("mmhal", "score")),
    ("POPE accuracy random ↑", ("pope", "random", "accuracy")),
    ("POPE accuracy adversarial ↑", ("pope", "adversarial", "accuracy")),
    ("POPE F1 random ↑", ("pope", "random", "f1")),
    ("POPE F1 popular ↑", ("pope", "popular", "f1")),
    ("POPE F1 adversarial ↑", ("pope", "adversarial", "f1")),
    ("POPE yes-ratio (adv.)", ("pope", "adversarial", "yes_ratio")),
    ("CHAIR_i ↓", ("chair", "chair_i")),
    ("CHAIR_s ↓", ("chair", "chair_s")),
    ("CHAIR coverage ↑", ("chair", "coverage")),
    ("RM accuracy ↑", ("rm", "accuracy")),
    ("RM accuracy (halluc. pairs) ↑", ("rm", "accuracy_hallucination")),
]


def _get(d: dict, path: tuple):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def format_table(results_by_model: dict[str, dict]) -> str:
    """Side-by-side table: one column per model, one row per headline metric ("-" = not run).
    RM accuracy is read from ``results["rm"]`` (an ``rm_accuracy`` dict the caller adds)."""
    names = list(results_by_model)
    w0 = max(len(r[0]) for r in _ROWS)
    ws = [max(8, len(n)) for n in names]
    lines = ["  ".join([" " * w0] + [n.rjust(w) for n, w in zip(names, ws)])]
    lines.append("-" * len(lines[0]))
    for label, path in _ROWS:
        cells = []
        for n, w in zip(names, ws):
            v = _get(results_by_model[n], path)
            cells.append(("-" if v is None else f"{v:.3f}").rjust(w))
        lines.append("  ".join([label.ljust(w0)] + cells))
    return "\n".join(lines)


__all__ = [
    "parse_yes_no",
    "parse_choice",
    "extract_claims",
    "check_claim",
    "check_answer",
    "pope_metrics",
    "mentioned_objects",
    "chair",
    "mmhal_score",
    "rm_accuracy",
    "blind_answers",
    "run_eval",
    "format_table",
    "EVAL_SETS",
]
