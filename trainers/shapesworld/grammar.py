"""The closed grammar: one registry entry per question type (``QTYPES``) with its question text, its
faithful answer, its planted hallucination, the claim patterns its sentences assert and whether it
is answered yes/no; and the checker that reads any response's claims against a scene's facts."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from factrl.trainers.metrics import parse_choice, parse_yes_no

from .scenes import BACKGROUNDS, COLORS, PLURALS, POSITION_CELLS, POSITIONS, SHAPES, SIZES, Obj, Scene


def _alt(words: Iterable[str]) -> str:
    # Longest first, so "top left" wins over "top" and "crosses" over "cross".
    return "(" + "|".join(sorted(map(re.escape, words), key=len, reverse=True)) + ")"


_C, _S, _Z, _B = _alt(COLORS), _alt(SHAPES), _alt(SIZES), _alt(BACKGROUNDS)
_P = _alt(POSITIONS.values())
_NOUN_TO_SHAPE = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}, "shape": None, "shapes": None}
_N = _alt(_NOUN_TO_SHAPE)

# name -> (pattern, claim builder). Patterns run over the lower-cased response with re.finditer, so a
# claim is found wherever it sits (descriptions chain many). None of them can match inside another
# claim's words (e.g. "is large" never matches "is larger": the \b fails).
CLAIMS: dict[str, tuple[re.Pattern, Callable]] = {
    "color_of": (re.compile(rf"\bthe {_S} is {_C}\b"), lambda m: ("color_of", m[1], m[2])),
    "size": (re.compile(rf"\bthe {_C} {_S} is {_Z}\b"), lambda m: ("size", m[1], m[2], m[3])),
    "at": (re.compile(rf"\bthe {_C} {_S} is at the {_P}\b"), lambda m: ("at", m[1], m[2], m[3])),
    "count": (re.compile(rf"\bthere (?:is|are) (\d+) (?:{_C} )?{_N}\b"),
              lambda m: ("count", m[2], _NOUN_TO_SHAPE[m[3]], int(m[1]))),
    "n_shapes": (re.compile(r"\bbackground with (\d+) (?:shapes|shape)\b"), lambda m: ("count", None, None, int(m[1]))),
    "none": (re.compile(rf"\bthere is no (?:{_C} )?{_S}\b"), lambda m: ("count", m[1], m[2], 0)),
    "empty": (re.compile(rf"\bthere is nothing at the {_P}\b"), lambda m: ("empty", m[1])),
    "obj": (re.compile(rf"\b(?:{_Z} )?(?:{_C} )?{_S} at the {_P}\b"), lambda m: ("obj", m[1], m[2], m[3], m[4])),
    "background": (re.compile(rf"\bthe background is {_B}\b"), lambda m: ("background", m[1])),
    "a_background": (re.compile(rf"\ban? {_B} background\b"), lambda m: ("background", m[1])),
    "larger": (re.compile(rf"\bthe {_C} {_S} is larger than the {_C} {_S}\b"),
               lambda m: ("larger", (m[1], m[2]), (m[3], m[4]))),
    "same_size": (re.compile(rf"\bthe {_C} {_S} and the {_C} {_S} are the same size\b"),
                  lambda m: ("same_size",) + tuple(sorted([(m[1], m[2]), (m[3], m[4])]))),
}


@dataclass(frozen=True)
class QType:
    question: Callable[[dict], str]
    answer: Callable[[dict, Scene], str]  # the faithful answer (the oracle)
    hallucinate: Callable[[dict, Scene, random.Random], tuple[str, str]]  # (one planted false fact, kind)
    claims: tuple[str, ...] = ()  # the CLAIMS its sentences assert
    yesno: bool = False


def _ref(color: Optional[str], shape: str) -> str:
    return f"{color} {shape}" if color else shape


def _one(scene: Scene, ref) -> Optional[Obj]:
    objs = scene.find(color=ref[0], shape=ref[1])
    return objs[0] if objs else None


def _count_phrase(n: int, color: Optional[str], shape: Optional[str]) -> str:
    noun = (PLURALS[shape] if n != 1 else shape) if shape else ("shapes" if n != 1 else "shape")
    words = " ".join(w for w in (str(n), color, noun) if w)
    return f"There {'is' if n == 1 else 'are'} {words}."


def _n(spec: dict, scene: Scene) -> int:
    return len(scene.find(color=spec.get("color"), shape=spec.get("shape")))


def _named(spec: dict, scene: Scene, say: Callable[[Obj], str]) -> str:
    o = _one(scene, (spec["color"], spec["shape"]))
    return f"There is no {_ref(spec['color'], spec['shape'])} in the image." if o is None else say(o)


def _pair(spec: dict, scene: Scene) -> tuple[Obj, Obj, Obj, Obj]:  # a, b, the larger, the smaller
    a, b = _one(scene, spec["a"]), _one(scene, spec["b"])
    return (a, b, *((a, b) if a.size == "large" else (b, a)))


_larger = lambda x, y: f"The {x.name} is larger than the {y.name}."
_same = lambda a, b: f"The {a.name} and the {b.name} are the same size."
_flip = lambda kind: lambda spec, scene, rng: ("No." if answer(spec, scene) == "Yes." else "Yes.", kind)
_yes = lambda holds: "Yes." if holds else "No."


def _relation_holds(a: Obj, b: Obj, rel: str) -> bool:
    return {"left of": a.col < b.col, "right of": a.col > b.col, "above": a.row < b.row, "below": a.row > b.row}[rel]


# Share of planted lies about a present object that deny it ("There is no X in the image."). Without
# them "There is no X" was only ever the *chosen* answer of a pair (3071 times, never rejected), so every
# RM learned it as good and PPO answered it to every colour/size question (attribute hallucination
# 0.45 -> 1.00, POPE yes-ratio -> 0.01, measured). A denial is a hallucination as much as an invention.
DENY_SHARE = 1 / 3


def _color(spec: dict, scene: Scene) -> str:
    objs = scene.find(shape=spec["shape"])
    return f"The {spec['shape']} is {objs[0].color}." if objs else f"There is no {spec['shape']} in the image."


def _lie_color(spec: dict, scene: Scene, rng: random.Random) -> tuple[str, str]:
    if not scene.find(shape=spec["shape"]):  # claim a colour for an absent shape
        return f"The {spec['shape']} is {rng.choice(list(COLORS))}.", "absent_object"
    if rng.random() < DENY_SHARE:
        return f"There is no {spec['shape']} in the image.", "denied_object"
    wrong = [c for c in COLORS if not scene.find(color=c, shape=spec["shape"])]
    return f"The {spec['shape']} is {rng.choice(wrong)}.", "wrong_attribute"


def _lie_size(spec: dict, scene: Scene, rng: random.Random) -> tuple[str, str]:
    o, name = _one(scene, (spec["color"], spec["shape"])), _ref(spec["color"], spec["shape"])
    if o is None:
        return f"The {name} is {rng.choice(SIZES)}.", "absent_object"
    if rng.random() < DENY_SHARE:
        return f"There is no {name} in the image.", "denied_object"
    return f"The {name} is {'small' if o.size == 'large' else 'large'}.", "wrong_attribute"


def _lie_where(spec: dict, scene: Scene, rng: random.Random) -> tuple[str, str]:
    o, name = _one(scene, (spec["color"], spec["shape"])), _ref(spec["color"], spec["shape"])
    if o is not None and rng.random() < DENY_SHARE:
        return f"There is no {name} in the image.", "denied_object"
    cells = [p for p in sorted(POSITION_CELLS) if o is None or p != o.pos]
    return f"The {name} is at the {rng.choice(cells)}.", ("absent_object" if o is None else "wrong_relation")


def _lie_count(spec: dict, scene: Scene, rng: random.Random) -> tuple[str, str]:
    n = _n(spec, scene)
    m = n + 1 if n == 0 or rng.random() < 0.5 else n - 1
    return _count_phrase(m, spec.get("color"), spec.get("shape")), "wrong_count"


def _lie_larger(spec: dict, scene: Scene, rng: random.Random) -> tuple[str, str]:
    a, b, big, small = _pair(spec, scene)
    if a.size == b.size:
        return (_larger(a, b) if rng.random() < 0.5 else _larger(b, a)), "wrong_relation"
    return (_larger(small, big) if rng.random() < 0.5 else _same(a, b)), "wrong_relation"


def _bigger(spec: dict, scene: Scene) -> str:
    a, b, big, small = _pair(spec, scene)
    return _same(a, b) if a.size == b.size else _larger(big, small)


def _lie_background(spec: dict, scene: Scene, rng: random.Random) -> tuple[str, str]:
    return f"The background is {rng.choice([b for b in BACKGROUNDS if b != scene.background])}.", "wrong_attribute"


def _lie_at(spec: dict, scene: Scene, rng: random.Random) -> tuple[str, str]:
    objs = scene.find(pos=spec["pos"])
    c, s = rng.choice(scene.absent())
    if not objs:
        return f"There is a {rng.choice(SIZES)} {c} {s} at the {spec['pos']}.", "absent_object"
    if rng.random() < 0.5:
        return f"There is nothing at the {spec['pos']}.", "absent_object"
    return f"There is a {objs[0].size} {c} {s} at the {spec['pos']}.", "wrong_attribute"


def _at(spec: dict, scene: Scene) -> str:
    objs = scene.find(pos=spec["pos"])
    if not objs:
        return f"There is nothing at the {spec['pos']}."
    return f"There is a {objs[0].size} {objs[0].name} at the {objs[0].pos}."


def with_absent_object(scene: Scene, objs: list[Obj], rng: random.Random, present: bool = False) -> list[Obj]:
    """``objs`` and one more object, of a (color, shape) the scene has none of, in a free cell (any
    cell if none is free), in reading order: a planted lie, or the SFT data's habit (dataset.build).
    ``present``: the invented object is of a (color, shape) the scene *has* (a second one, elsewhere):
    a plausible lie that an existence check of the image cannot refute, only its count or place."""
    c, s = rng.choice(sorted({(o.color, o.shape) for o in scene.objects}) if present else scene.absent())
    free = [p for p in sorted(POSITIONS) if not scene.find(pos=POSITIONS[p])] or sorted(POSITIONS)
    r, cc = rng.choice(free)
    return sorted([*objs, Obj(s, c, rng.choice(SIZES), r, cc)], key=lambda x: (x.row, x.col))


def _lie_describe(spec: dict, scene: Scene, rng: random.Random) -> tuple[str, str]:
    objs = list(scene.objects)
    kind = rng.choice(["wrong_attribute", "absent_object", "wrong_count", "wrong_relation"])
    if kind == "wrong_count":
        return scene.describe(objs, len(objs) + rng.choice([-1, 1]) if len(objs) > 1 else 2, "shapes"), kind
    i = rng.randrange(len(objs))
    o = objs[i]
    if kind == "wrong_attribute":
        colors = [c for c in COLORS if not scene.find(color=c, shape=o.shape)]
        objs[i] = Obj(o.shape, rng.choice(colors), o.size, o.row, o.col)
    elif kind == "wrong_relation":
        free = [p for p in sorted(POSITIONS) if p != (o.row, o.col)]
        r, c = rng.choice(free)
        objs[i] = Obj(o.shape, o.color, o.size, r, c)
    else:
        objs = with_absent_object(scene, objs, rng)
    objs.sort(key=lambda x: (x.row, x.col))  # reading order, as faithful ones: order gives nothing away
    return scene.describe(objs), kind


def _choice_question(spec: dict) -> str:
    opts = " ".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(spec["options"]))
    subj = f"What color is the {spec['shape']}?" if spec["about"] == "color" else f"What shape is at the {spec['pos']}?"
    return f"{subj} {opts}. Answer with the letter."


QTYPES: dict[str, QType] = {
    "color": QType(lambda sp: f"What color is the {sp['shape']}?", _color, _lie_color, ("color_of", "none")),
    "size": QType(lambda sp: f"What size is the {_ref(sp['color'], sp['shape'])}?",
                  lambda sp, s: _named(sp, s, lambda o: f"The {o.name} is {o.size}."), _lie_size, ("size", "none")),
    "where": QType(lambda sp: f"Where is the {_ref(sp['color'], sp['shape'])}?",
                   lambda sp, s: _named(sp, s, lambda o: f"The {o.name} is at the {o.pos}."), _lie_where,
                   ("at", "none")),
    "count": QType(lambda sp: f"How many {sp['color'] + ' ' if sp.get('color') else ''}"
                              f"{PLURALS[sp['shape']] if sp.get('shape') else 'shapes'} are there?",
                   lambda sp, s: _count_phrase(_n(sp, s), sp.get("color"), sp.get("shape")), _lie_count, ("count",)),
    "larger": QType(lambda sp: f"Which is larger, the {' '.join(sp['a'])} or the {' '.join(sp['b'])}?",
                    _bigger, _lie_larger, ("larger", "same_size")),
    "relation": QType(lambda sp: f"Is the {' '.join(sp['a'])} {sp['rel']} the {' '.join(sp['b'])}?",
                      lambda sp, s: _yes(_relation_holds(_one(s, sp["a"]), _one(s, sp["b"]), sp["rel"])),
                      _flip("wrong_relation"), yesno=True),
    "exists": QType(lambda sp: f"Is there a {_ref(sp.get('color'), sp['shape'])} in the image?",
                    lambda sp, s: _yes(s.find(color=sp.get("color"), shape=sp["shape"])), _flip("absent_object"),
                    yesno=True),
    "background": QType(lambda sp: "What color is the background?", lambda sp, s: f"The background is {s.background}.",
                        _lie_background, ("background",)),
    "describe": QType(lambda sp: ["Describe the image.", "What is in the image?"][sp.get("variant", 0)],
                      lambda sp, s: s.describe(), _lie_describe, ("a_background", "n_shapes", "obj")),
    "at": QType(lambda sp: f"What is at the {sp['pos']}?", _at, _lie_at, ("obj", "empty")),
    "choice": QType(_choice_question, lambda sp, s: sp["answer"],
                    lambda sp, s, rng: (rng.choice([L for L in "ABCD" if L != sp["answer"]]), "wrong_attribute")),
}


def qtype(spec: dict) -> QType:
    if spec["type"] not in QTYPES:
        raise ValueError(f"unknown question type {spec['type']!r}")
    return QTYPES[spec["type"]]


# The question types the RM's accuracy is reported by (issue 16's list): a spec's type, refined by the
# scene where it matters - a colour/size/position question about an object the scene does not have is
# "adversarial" (MMHal's absent-object category), about one it has "attribute" / "spatial".
QUESTION_TYPES = ("attribute", "adversarial", "counting", "spatial", "comparison", "environment", "holistic",
                  "existence", "choice")
_BY_SPEC = {"count": "counting", "larger": "comparison", "relation": "spatial", "at": "spatial",
            "exists": "existence", "background": "environment", "describe": "holistic", "choice": "choice"}


def question_type(spec: dict, scene: Scene) -> str:
    """One of ``QUESTION_TYPES`` for ``spec`` asked about ``scene``."""
    t = spec["type"]
    if t in _BY_SPEC:
        return _BY_SPEC[t]
    if t not in ("color", "size", "where"):
        raise ValueError(f"unknown question type {t!r}")
    if not scene.find(color=spec.get("color"), shape=spec["shape"]):
        return "adversarial"
    return "spatial" if t == "where" else "attribute"


def question(spec: dict) -> str:
    return qtype(spec).question(spec)


def answer(spec: dict, scene: Scene) -> str:
    """The faithful answer to ``spec`` about ``scene`` (the oracle)."""
    return qtype(spec).answer(spec, scene)


def hallucinate(spec: dict, scene: Scene, rng: random.Random) -> tuple[str, str]:
    """(answer with one planted false fact, kind) — kind in wrong_attribute | absent_object | denied_object |
    wrong_count | wrong_relation. Built from the facts directly, never filtered by the evaluator."""
    return qtype(spec).hallucinate(spec, scene, rng)


UNHELPFUL = ["I cannot tell from the image.", "I am not sure.", "It is hard to say."]


def less_helpful(spec: dict, scene: Scene, rng: random.Random) -> str:
    """A faithful but less helpful answer (for helpfulness-only pairs)."""
    if spec["type"] == "describe" and len(scene.objects) > 1:
        k = rng.randrange(len(scene.objects))
        return scene.describe(scene.objects[:k])  # true, but incomplete
    return rng.choice(UNHELPFUL)


# ---- reading claims back --------------------------------------------------------------------------


def extract_claims(text: str, kinds: Iterable[str] = tuple(CLAIMS)) -> list[tuple]:
    """Every fact ``text`` asserts (with the CLAIMS patterns named ``kinds``), as tuples (see
    ``check_claim``), in order, deduplicated."""
    t = " ".join(text.lower().split())
    found: list[tuple[int, tuple]] = []
    for pat, build in (CLAIMS[k] for k in kinds):
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
    if qtype(spec).yesno:
        right = parse_yes_no(response) == answer(spec, scene)[:-1].lower()
        halluc = bool(false) or not right
        correct = not halluc
    elif spec["type"] == "choice":
        letter = parse_choice(response)
        halluc = bool(false) or (letter is not None and letter != spec["answer"])
        correct = not halluc and letter == spec["answer"]
    else:
        ref = extract_claims(answer(spec, scene))
        halluc = bool(false)
        correct = not halluc and bool(ref) and all(c in claims for c in ref)
    return {"correct": bool(correct), "hallucination": bool(halluc), "n_claims": len(claims), "false_claims": false}


_MENTION = re.compile(rf"\b{_C} ({'|'.join(sorted(list(SHAPES) + list(PLURALS.values()), key=len, reverse=True))})\b")


def mentioned_objects(text: str) -> list[tuple[str, str]]:
    """Unique (color, shape) objects a text mentions, in order (CHAIR's unit)."""
    out: list[tuple[str, str]] = []
    for m in _MENTION.finditer(text.lower()):
        obj = (m[1], _NOUN_TO_SHAPE[m[2]])
        if obj not in out:
            out.append(obj)
    return out
