"""Hallucination metrics for any data: POPE / multiple-choice parsing, POPE, CHAIR, MMHal-style and
reward-model accuracy, and the side-by-side table. Pure functions over plain values."""

from __future__ import annotations

import re
from typing import Hashable, Iterable, Optional


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


def chair_metrics(mentioned: Iterable[list[Hashable]], present: Iterable[set]) -> dict:
    """CHAIR from each response's unique mentioned objects and its image's present objects: a mention
    not present is hallucinated. CHAIR_i = hallucinated mentions / mentions; CHAIR_s = responses
    with >=1 / responses; coverage = share of present objects mentioned (silence cannot score well)."""
    n = n_m = n_h = n_s = covered = total = 0
    for objs, there in zip(mentioned, present, strict=True):
        bad = [o for o in objs if o not in there]
        n += 1
        n_m += len(objs)
        n_h += len(bad)
        n_s += bool(bad)
        covered += len(there & set(objs))
        total += len(there)
    return {
        "chair_i": n_h / n_m if n_m else 0.0,
        "chair_s": n_s / n if n else 0.0,
        "coverage": covered / total if total else 0.0,
        "n": n,
        "n_mentions": n_m,
    }


def mmhal_score(records: list[dict]) -> dict:
    """records: dicts with "category", "correct", "hallucination".
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


def rm_accuracy_by(triples: Iterable, groups: Iterable[Optional[Hashable]]) -> dict:
    """``rm_accuracy`` per group: ``groups`` gives each triple's group (e.g. its question type), row
    for row; None = in no group. Groups without pairs do not appear."""
    by: dict = {}
    for t, g in zip(triples, groups, strict=True):
        if g is not None:
            by.setdefault(g, []).append(t)
    return {g: rm_accuracy(ts) for g, ts in sorted(by.items())}


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
    ("RM accuracy, other images' facts", ("rm", "accuracy_other_scenes_facts")),
]


def _get(d: dict, path: tuple):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def format_table(results_by_model: dict[str, dict], rows: Optional[list[tuple[str, tuple]]] = None) -> str:
    """Side-by-side table: one column per model, one row per headline metric ("-" = not run).
    RM accuracy is read from ``results["rm"]`` (an ``rm_accuracy`` dict the caller adds). ``rows``:
    (label, key path) pairs instead of the ShapesWorld headline rows."""
    rows = _ROWS if rows is None else rows
    names = list(results_by_model)
    w0 = max(len(r[0]) for r in rows)
    ws = [max(8, len(n)) for n in names]
    lines = ["  ".join([" " * w0] + [n.rjust(w) for n, w in zip(names, ws)])]
    lines.append("-" * len(lines[0]))
    for label, path in rows:
        cells = []
        for n, w in zip(names, ws):
            v = _get(results_by_model[n], path)
            cells.append(("-" if v is None else f"{v:.3f}").rjust(w))
        lines.append("  ".join([label.ljust(w0)] + cells))
    return "\n".join(lines)
