"""ShapesWorld: a synthetic image world whose every scene carries its exact facts.

A scene is 1-5 coloured shapes on a 3x3 grid (so "left of" / "above" are never ambiguous) over a
plain background. From the facts we write a dataset in exactly the LLaVA-RLHF file formats
(see ``trainers/data.py``): SFT conversations, preference pairs (faithful vs planted
hallucination, or faithful vs less helpful), ``image_to_caption.json`` (with ``aok_`` keys for the
multiple-choice ground truth), PPO prompts with ``caption_type``/``length_bonus``, held-out eval
sets (POPE, MMHal-style, CHAIR) and PNG images. Everything is deterministic in ``seed``.

Texts use a small closed grammar so ``trainers/evaluate.py`` parses every answer exactly:

    "The circle is red."                      color of the (only) circle
    "The red circle is large."                size
    "The red circle is at the top left."      position (grid cell names: POSITIONS)
    "There are 3 shapes." / "There is 1 red circle." / "There are 0 stars."   counts
    "There is no star in the image."          absence
    "There is a small red circle at the top." / "There is nothing at the center."
    "The red circle is larger than the blue star." / "The red circle and the blue star are the same size."
    "The background is white."
    "A white background with 2 shapes: large red circle at the top left, small blue star at the center."
    "Yes." / "No." / "B"

Each question is described by a ``spec`` dict (``{"type": "color", "shape": "circle"}``);
``answer(spec, scene)`` renders the canonical (faithful) answer from the facts, and the evaluator
checks any response against the same facts.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw

from factrl.trainers.config import write_atomic

# ---- the closed world -------------------------------------------------------------------------

# Saturated, well-separated hues: recognisable at 48x48 after a tiny CLIP tower.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 25, 25),
    "green": (30, 170, 50),
    "blue": (35, 70, 235),
    "yellow": (245, 215, 0),
    "purple": (150, 45, 205),
    "orange": (250, 130, 0),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}
SHAPES = ["circle", "square", "triangle", "star", "cross"]
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
SIZES = ["small", "large"]
# Grid cell (row, col) -> name. Rows top..bottom, cols left..right.
POSITIONS = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}
POSITION_CELLS = {v: k for k, v in POSITIONS.items()}
RELATIONS = ["left of", "right of", "above", "below"]

# Non-uniform priors so POPE's "popular" split (most frequent absent objects) means something.
_SHAPE_W = [0.30, 0.25, 0.20, 0.15, 0.10]
_COLOR_W = [0.25, 0.20, 0.18, 0.15, 0.12, 0.10]
_NOBJ_W = {1: 0.15, 2: 0.25, 3: 0.25, 4: 0.20, 5: 0.15}
_BG_W = {"white": 0.6, "gray": 0.2, "black": 0.2}

SYSTEM_FREE_FACTS = [  # text-only SFT records: the world's vocabulary, no image
    ("What shapes can appear in the images?", "Circles, squares, triangles, stars and crosses."),
    ("What colors can the shapes have?", "Red, green, blue, yellow, purple and orange."),
    ("How many shapes can an image have?", "An image has 1 to 5 shapes."),
]


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    row: int
    col: int

    @property
    def name(self) -> str:  # "red circle"
        return f"{self.color} {self.shape}"

    @property
    def pos(self) -> str:  # "top left"
        return POSITIONS[(self.row, self.col)]


@dataclass
class Scene:
    """The exact facts of one image."""

    id: str
    image: str  # file name inside images/
    background: str
    objects: list[Obj] = field(default_factory=list)
    split: str = "train"

    # -- queries
    def find(
        self,
        color: Optional[str] = None,
        shape: Optional[str] = None,
        size: Optional[str] = None,
        pos: Optional[str] = None,
    ) -> list[Obj]:
        return [
            o
            for o in self.objects
            if (color is None or o.color == color)
            and (shape is None or o.shape == shape)
            and (size is None or o.size == size)
            and (pos is None or o.pos == pos)
        ]

    def signature(self) -> tuple:
        return (
            self.background,
            tuple(sorted((o.shape, o.color, o.size, o.row, o.col) for o in self.objects)),
        )

    # -- texts
    def describe(self, objects: Optional[list[Obj]] = None) -> str:
        objs = self.objects if objects is None else objects
        n = len(self.objects)
        head = f"A {self.background} background with {n} shape{'s' if n != 1 else ''}"
        if not objs:
            return head + "."
        return head + ": " + ", ".join(f"{o.size} {o.name} at the {o.pos}" for o in objs) + "."

    def to_captions(self) -> list[str]:
        """Captions, one fact per line (what the fact-augmented RM reads)."""
        n = len(self.objects)
        are, s = ("are", "s") if n != 1 else ("is", "")
        caps = [f"There {are} {n} shape{s} on a {self.background} background."]
        caps += [f"There is a {o.size} {o.name} at the {o.pos}." for o in self.objects]
        return caps

    # -- (de)serialisation
    def to_dict(self) -> dict:
        d = asdict(self)
        d["objects"] = [asdict(o) for o in self.objects]
        return d

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        return Scene(
            id=d["id"],
            image=d["image"],
            background=d["background"],
            objects=[Obj(**o) for o in d["objects"]],
            split=d.get("split", "train"),
        )


def random_scene(rng: random.Random, scene_id: str, image: str, split: str = "train") -> Scene:
    n = rng.choices(list(_NOBJ_W), weights=list(_NOBJ_W.values()))[0]
    # Reading order (top-left to bottom-right): a description is then a function of the image,
    # not of a hidden random order, so a perfect model can reach zero loss on it.
    cells = sorted(rng.sample(sorted(POSITIONS), n))
    objs: list[Obj] = []
    used: list[tuple[str, str]] = []
    for r, c in cells:
        while True:  # (color, shape) unique within a scene so "the red circle" always refers
            shape = rng.choices(SHAPES, weights=_SHAPE_W)[0]
            color = rng.choices(list(COLORS), weights=_COLOR_W)[0]
            if (color, shape) not in used:
                break
        used.append((color, shape))
        objs.append(Obj(shape=shape, color=color, size=rng.choice(SIZES), row=r, col=c))
    bg = rng.choices(list(_BG_W), weights=list(_BG_W.values()))[0]
    return Scene(id=scene_id, image=image, background=bg, objects=objs, split=split)


# ---- per-patch targets (pretraining the tiny vision tower) -------------------------------------

# Attributes: class 0 = the patch's grid cell is empty, then one class per value. "cell": which of
# the 9 world cells the patch lies in (CLIP patch features carry position; ours must too).
PATCH_LABELS = {"color": len(COLORS) + 1, "shape": len(SHAPES) + 1, "size": len(SIZES) + 1, "cell": 9}


def patch_labels(scene: Scene, grid: int) -> dict[str, list[int]]:
    """For each of the ``grid x grid`` patches (row-major), the attributes of the object in the
    3x3 world cell the patch lies in, and that cell's index (``grid`` a multiple of 3: patches
    never straddle cells)."""
    if grid % 3:
        raise ValueError(f"patch grid {grid}x{grid} does not tile the 3x3 world grid")
    k = grid // 3
    cell = [(r // k) * 3 + c // k for r in range(grid) for c in range(grid)]
    attrs = {o.row * 3 + o.col: (list(COLORS).index(o.color) + 1, SHAPES.index(o.shape) + 1, SIZES.index(o.size) + 1)
             for o in scene.objects}
    per_patch = [attrs.get(c, (0, 0, 0)) for c in cell]
    return {"cell": cell, **{name: [a[j] for a in per_patch] for j, name in enumerate(("color", "shape", "size"))}}


# ---- rendering --------------------------------------------------------------------------------

_SUPERSAMPLE = 4  # draw at 4x then box-filter down: anti-aliased, still deterministic


def render(scene: Scene, image_size: int = 48) -> Image.Image:
    S = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (S, S), BACKGROUNDS[scene.background])
    d = ImageDraw.Draw(img)
    cell = S / 3
    for o in scene.objects:
        cx, cy = (o.col + 0.5) * cell, (o.row + 0.5) * cell
        r = cell * (0.46 if o.size == "large" else 0.30)
        fill = COLORS[o.color]
        if o.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            h = r * 0.85
            d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif o.shape == "triangle":
            d.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
        elif o.shape == "star":
            pts = []
            for k in range(10):
                rad = r if k % 2 == 0 else r * 0.45
                a = -math.pi / 2 + k * math.pi / 5
                pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
            d.polygon(pts, fill=fill)
        elif o.shape == "cross":
            t = r * 0.36
            d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
            d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
        else:  # pragma: no cover - closed vocabulary
            raise ValueError(o.shape)
    return img.resize((image_size, image_size), Image.Resampling.BOX)


# ---- questions and canonical answers ----------------------------------------------------------

YESNO_TYPES = ("exists", "relation")


def _count_phrase(n: int, color: Optional[str], shape: Optional[str]) -> str:
    noun = (PLURALS[shape] if n != 1 else shape) if shape else ("shapes" if n != 1 else "shape")
    words = " ".join(w for w in (str(n), color, noun) if w)
    return f"There {'is' if n == 1 else 'are'} {words}."


def _ref(color: Optional[str], shape: str) -> str:
    return f"{color} {shape}" if color else shape


def question(spec: dict) -> str:
    t = spec["type"]
    if t == "color":
        return f"What color is the {spec['shape']}?"
    if t == "size":
        return f"What size is the {_ref(spec['color'], spec['shape'])}?"
    if t == "where":
        return f"Where is the {_ref(spec['color'], spec['shape'])}?"
    if t == "count":
        c, s = spec.get("color"), spec.get("shape")
        noun = PLURALS[s] if s else "shapes"
        return f"How many {c + ' ' if c else ''}{noun} are there?"
    if t == "larger":
        return f"Which is larger, the {' '.join(spec['a'])} or the {' '.join(spec['b'])}?"
    if t == "relation":
        return f"Is the {' '.join(spec['a'])} {spec['rel']} the {' '.join(spec['b'])}?"
    if t == "exists":
        return f"Is there a {_ref(spec.get('color'), spec['shape'])} in the image?"
    if t == "background":
        return "What color is the background?"
    if t == "describe":
        return ["Describe the image.", "What is in the image?"][spec.get("variant", 0)]
    if t == "at":
        return f"What is at the {spec['pos']}?"
    if t == "choice":
        opts = " ".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(spec["options"]))
        subj = (
            f"What color is the {spec['shape']}?"
            if spec["about"] == "color"
            else f"What shape is at the {spec['pos']}?"
        )
        return f"{subj} {opts}. Answer with the letter."
    raise ValueError(f"unknown question type {t!r}")


def _relation_holds(a: Obj, b: Obj, rel: str) -> bool:
    return {
        "left of": a.col < b.col,
        "right of": a.col > b.col,
        "above": a.row < b.row,
        "below": a.row > b.row,
    }[rel]


def _one(scene: Scene, ref) -> Optional[Obj]:
    objs = scene.find(color=ref[0], shape=ref[1])
    return objs[0] if objs else None


def answer(spec: dict, scene: Scene) -> str:
    """The faithful answer to ``spec`` about ``scene`` (the oracle)."""
    t = spec["type"]
    if t == "color":
        objs = scene.find(shape=spec["shape"])
        if not objs:
            return f"There is no {spec['shape']} in the image."
        return f"The {spec['shape']} is {objs[0].color}."
    if t in ("size", "where"):
        o = _one(scene, (spec["color"], spec["shape"]))
        if o is None:
            return f"There is no {_ref(spec['color'], spec['shape'])} in the image."
        return f"The {o.name} is {o.size}." if t == "size" else f"The {o.name} is at the {o.pos}."
    if t == "count":
        n = len(scene.find(color=spec.get("color"), shape=spec.get("shape")))
        return _count_phrase(n, spec.get("color"), spec.get("shape"))
    if t == "larger":
        a, b = _one(scene, spec["a"]), _one(scene, spec["b"])
        if a.size == b.size:
            return f"The {a.name} and the {b.name} are the same size."
        big, small = (a, b) if a.size == "large" else (b, a)
        return f"The {big.name} is larger than the {small.name}."
    if t == "relation":
        return (
            "Yes." if _relation_holds(_one(scene, spec["a"]), _one(scene, spec["b"]), spec["rel"]) else "No."
        )
    if t == "exists":
        return "Yes." if scene.find(color=spec.get("color"), shape=spec["shape"]) else "No."
    if t == "background":
        return f"The background is {scene.background}."
    if t == "describe":
        return scene.describe()
    if t == "at":
        objs = scene.find(pos=spec["pos"])
        if not objs:
            return f"There is nothing at the {spec['pos']}."
        o = objs[0]
        return f"There is a {o.size} {o.name} at the {o.pos}."
    if t == "choice":
        return spec["answer"]
    raise ValueError(f"unknown question type {t!r}")


# ---- picking questions per category -----------------------------------------------------------

CATEGORIES = [
    "attribute",
    "adversarial",
    "comparison",
    "counting",
    "spatial",
    "environment",
    "holistic",
    "other",
]


def _absent_combos(scene: Scene) -> list[tuple[str, str]]:
    present = {(o.color, o.shape) for o in scene.objects}
    return [(c, s) for s in SHAPES for c in COLORS if (c, s) not in present]


def make_spec(category: str, scene: Scene, rng: random.Random) -> dict:
    """A question of MMHal-style ``category`` about ``scene``."""
    objs = scene.objects
    if category == "attribute":
        unique = [o for o in objs if len(scene.find(shape=o.shape)) == 1]
        if unique and rng.random() < 0.7:
            return {"type": "color", "shape": rng.choice(unique).shape}
        o = rng.choice(objs)
        return {"type": "size", "color": o.color, "shape": o.shape}
    if category == "adversarial":
        absent_shapes = [s for s in SHAPES if not scene.find(shape=s)]
        if absent_shapes and rng.random() < 0.5:
            return {"type": "color", "shape": rng.choice(absent_shapes)}
        c, s = rng.choice(_absent_combos(scene))
        return {"type": rng.choice(["where", "size"]), "color": c, "shape": s}
    if category == "comparison":
        if len(objs) < 2:
            o = objs[0]
            return {"type": "size", "color": o.color, "shape": o.shape}
        a, b = rng.sample(objs, 2)
        return {"type": "larger", "a": [a.color, a.shape], "b": [b.color, b.shape]}
    if category == "counting":
        k = rng.randrange(3)
        if k == 0:
            return {"type": "count"}
        if k == 1:
            return {
                "type": "count",
                "color": rng.choice(objs).color if rng.random() < 0.7 else rng.choice(list(COLORS)),
            }
        return {
            "type": "count",
            "shape": rng.choice(objs).shape if rng.random() < 0.7 else rng.choice(SHAPES),
        }
    if category == "spatial":
        pairs = [(a, b) for a in objs for b in objs if a is not b]
        if pairs and rng.random() < 0.6:
            a, b = rng.choice(pairs)
            rels = [
                r
                for r in RELATIONS
                if (r in ("left of", "right of") and a.col != b.col)
                or (r in ("above", "below") and a.row != b.row)
            ]
            if rels:  # only ask relations that are decided on the grid
                return {
                    "type": "relation",
                    "a": [a.color, a.shape],
                    "b": [b.color, b.shape],
                    "rel": rng.choice(rels),
                }
        o = rng.choice(objs)
        return {"type": "where", "color": o.color, "shape": o.shape}
    if category == "environment":
        return {"type": "background"}
    if category == "holistic":
        return {"type": "describe", "variant": rng.randrange(2)}
    if category == "other":
        return {"type": "at", "pos": rng.choice(sorted(POSITION_CELLS))}
    raise ValueError(f"unknown category {category!r}")


def make_exists_spec(scene: Scene, rng: random.Random, present: bool) -> dict:
    if present:
        o = rng.choice(scene.objects)
        return {"type": "exists", "color": o.color, "shape": o.shape}
    c, s = rng.choice(_absent_combos(scene))
    return {"type": "exists", "color": c, "shape": s}


def make_choice_spec(scene: Scene, rng: random.Random) -> dict:
    """One multiple-choice question per scene (its answer is the scene's ``aok_`` caption)."""
    unique = [o for o in scene.objects if len(scene.find(shape=o.shape)) == 1]
    if unique:
        o = rng.choice(unique)
        wrong = rng.sample([c for c in COLORS if c != o.color], 3)
        spec = {"type": "choice", "about": "color", "shape": o.shape}
        right = o.color
    else:
        o = rng.choice(scene.objects)
        wrong = rng.sample([s for s in SHAPES if s != o.shape], 3)
        spec = {"type": "choice", "about": "shape", "pos": o.pos}
        right = o.shape
    k = rng.randrange(4)
    options = wrong[:k] + [right] + wrong[k:]
    spec.update(options=options, answer="ABCD"[k])
    return spec


# ---- planted hallucinations and less helpful answers ------------------------------------------


def hallucinate(spec: dict, scene: Scene, rng: random.Random) -> tuple[str, str]:
    """(answer with one planted false fact, kind) — kind in wrong_attribute | absent_object |
    wrong_count | wrong_relation. Built from the facts directly, never filtered by the evaluator."""
    t = spec["type"]
    if t in YESNO_TYPES:
        flipped = "No." if answer(spec, scene) == "Yes." else "Yes."
        return flipped, ("absent_object" if t == "exists" else "wrong_relation")
    if t == "choice":
        return rng.choice([L for L in "ABCD" if L != spec["answer"]]), "wrong_attribute"
    if t == "color":
        objs = scene.find(shape=spec["shape"])
        if not objs:  # claim a colour for an absent shape
            return f"The {spec['shape']} is {rng.choice(list(COLORS))}.", "absent_object"
        wrong = [c for c in COLORS if not scene.find(color=c, shape=spec["shape"])]
        return f"The {spec['shape']} is {rng.choice(wrong)}.", "wrong_attribute"
    if t in ("size", "where"):
        o = _one(scene, (spec["color"], spec["shape"]))
        name = _ref(spec["color"], spec["shape"])
        if o is None:
            if t == "size":
                return f"The {name} is {rng.choice(SIZES)}.", "absent_object"
            return f"The {name} is at the {rng.choice(sorted(POSITION_CELLS))}.", "absent_object"
        if t == "size":
            return f"The {name} is {'small' if o.size == 'large' else 'large'}.", "wrong_attribute"
        return (
            f"The {name} is at the {rng.choice([p for p in sorted(POSITION_CELLS) if p != o.pos])}.",
            "wrong_relation",
        )
    if t == "count":
        n = len(scene.find(color=spec.get("color"), shape=spec.get("shape")))
        m = n + 1 if n == 0 or rng.random() < 0.5 else n - 1
        return _count_phrase(m, spec.get("color"), spec.get("shape")), "wrong_count"
    if t == "larger":
        a, b = _one(scene, spec["a"]), _one(scene, spec["b"])
        if a.size == b.size:
            big, small = (a, b) if rng.random() < 0.5 else (b, a)
            return f"The {big.name} is larger than the {small.name}.", "wrong_relation"
        big, small = (a, b) if a.size == "large" else (b, a)
        if rng.random() < 0.5:
            return f"The {small.name} is larger than the {big.name}.", "wrong_relation"
        return f"The {a.name} and the {b.name} are the same size.", "wrong_relation"
    if t == "background":
        return (
            f"The background is {rng.choice([b for b in BACKGROUNDS if b != scene.background])}.",
            "wrong_attribute",
        )
    if t == "at":
        objs = scene.find(pos=spec["pos"])
        c, s = rng.choice(_absent_combos(scene))
        if not objs:
            return f"There is a {rng.choice(SIZES)} {c} {s} at the {spec['pos']}.", "absent_object"
        if rng.random() < 0.5:
            return f"There is nothing at the {spec['pos']}.", "absent_object"
        return f"There is a {objs[0].size} {c} {s} at the {spec['pos']}.", "wrong_attribute"
    if t == "describe":
        return _hallucinated_description(scene, rng)
    raise ValueError(f"unknown question type {t!r}")


def _hallucinated_description(scene: Scene, rng: random.Random) -> tuple[str, str]:
    objs = list(scene.objects)
    kind = rng.choice(["wrong_attribute", "absent_object", "wrong_count", "wrong_relation"])
    if kind == "wrong_count":
        n = len(objs) + rng.choice([-1, 1]) if len(objs) > 1 else 2
        head = f"A {scene.background} background with {n} shapes"
        return head + ": " + ", ".join(f"{o.size} {o.name} at the {o.pos}" for o in objs) + ".", kind
    i = rng.randrange(len(objs))
    o = objs[i]
    if kind == "wrong_attribute":
        colors = [c for c in COLORS if not scene.find(color=c, shape=o.shape)]
        objs[i] = Obj(o.shape, rng.choice(colors), o.size, o.row, o.col)
    elif kind == "wrong_relation":
        free = [p for p in sorted(POSITIONS) if p != (o.row, o.col)]
        r, c = rng.choice(free)
        objs[i] = Obj(o.shape, o.color, o.size, r, c)
    else:  # absent object: one more object whose (color, shape) is not in the scene
        c, s = rng.choice(_absent_combos(scene))
        free = [p for p in sorted(POSITIONS) if not scene.find(pos=POSITIONS[p])] or sorted(POSITIONS)
        r, cc = rng.choice(free)
        objs.append(Obj(s, c, rng.choice(SIZES), r, cc))
    n = len(scene.objects)
    head = f"A {scene.background} background with {n} shape{'s' if n != 1 else ''}"
    objs.sort(key=lambda x: (x.row, x.col))  # reading order, as faithful ones: order gives nothing away
    return head + ": " + ", ".join(f"{x.size} {x.name} at the {x.pos}" for x in objs) + ".", kind


UNHELPFUL = ["I cannot tell from the image.", "I am not sure.", "It is hard to say."]


def less_helpful(spec: dict, scene: Scene, rng: random.Random) -> str:
    """A faithful but less helpful answer (for helpfulness-only pairs)."""
    if spec["type"] == "describe" and len(scene.objects) > 1:
        k = rng.randrange(len(scene.objects))
        return scene.describe(scene.objects[:k])  # true, but incomplete
    return rng.choice(UNHELPFUL)


# ---- the dataset ------------------------------------------------------------------------------

FACT_CAPTION_TYPES = {"A": 2, "B": 3, "C": 4, "D": 5}


def _human(q: str, first: bool) -> str:
    return f"<image>\n{q}" if first else q


def _conversation(pairs: list[tuple[str, str]]) -> list[dict]:
    conv = []
    for i, (q, a) in enumerate(pairs):
        conv.append({"from": "human", "value": _human(q, i == 0)})
        conv.append({"from": "gpt", "value": a})
    return conv


def build(n: int, seed: int, n_eval: Optional[int] = None) -> dict:
    """All records in memory, each generated item also carrying its ``spec`` (for tests/eval).

    Returns {"scenes": [Scene], "sft": [...], "preference": [...], "preference_eval": [...],
    "captions": {...}, "ppo": [...], "eval": {name: [items]}, and for checking: "items" (every
    faithful answer written, as (scene, spec, answer)), "planted" ((scene, spec, answer, kind) of
    every planted hallucination), "unhelpful" ((scene, spec, answer): faithful but less helpful
    outputs), "ppo_specs" ((scene, spec) per PPO prompt)}.
    """
    n_eval = max(10, n // 5) if n_eval is None else n_eval
    rng = random.Random(seed)
    scenes: list[Scene] = []
    seen: set = set()
    for split, count, prefix in (("train", n, "shapes"), ("eval", n_eval, "shapes_eval")):
        i = 0
        while i < count:
            sid = f"{prefix}_{i:06d}"
            s = random_scene(rng, sid, sid + ".png", split)
            if s.signature() in seen:  # train and eval scenes disjoint (and no duplicates at all)
                continue
            seen.add(s.signature())
            scenes.append(s)
            i += 1
    train = [s for s in scenes if s.split == "train"]
    evals = [s for s in scenes if s.split == "eval"]

    out: dict = {
        "scenes": scenes,
        "sft": [],
        "preference": [],
        "preference_eval": [],
        "captions": {},
        "ppo": [],
        "eval": {},
        "items": [],
        "planted": [],
        "unhelpful": [],
        "ppo_specs": [],
    }
    choice = {s.image: make_choice_spec(s, random.Random(f"{seed}-choice-{s.id}")) for s in scenes}
    for s in scenes:
        out["captions"][s.image] = s.to_captions()
        c = choice[s.image]
        out["captions"]["aok_" + s.image] = [
            f"The correct option is {c['answer']}: {c['options']['ABCD'.index(c['answer'])]}."
        ]

    def item(s, spec):
        a = answer(spec, s)
        out["items"].append((s, spec, a))
        return question(spec), a

    # SFT: one multi-turn QA record + one description per scene; a few text-only records.
    for k, s in enumerate(train):
        r = random.Random(f"{seed}-sft-{s.id}")
        cats = r.sample(
            ["attribute", "adversarial", "comparison", "counting", "spatial", "environment", "other"], 2
        )
        specs = [make_spec(c, s, r) for c in cats]
        specs.append(make_exists_spec(s, r, present=r.random() < 0.5))
        if r.random() < 0.3:
            specs[r.randrange(3)] = choice[s.image]
        # Any question may open the conversation: POPE/MMHal ask single-turn, right after <image>.
        r.shuffle(specs)
        pairs = [item(s, sp) for sp in specs]
        out["sft"].append({"id": f"{s.id}-qa", "image": s.image, "conversations": _conversation(pairs)})
        out["sft"].append(
            {
                "id": f"{s.id}-desc",
                "image": s.image,
                "conversations": _conversation([item(s, make_spec("holistic", s, r))]),
            }
        )
        if k % 25 == 0:
            q, a = SYSTEM_FREE_FACTS[(k // 25) % len(SYSTEM_FREE_FACTS)]
            out["sft"].append(
                {
                    "id": f"text-{k}",
                    "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
                }
            )

    # Preference pairs: 3 of 4 plant a hallucination, 1 of 4 differ only in helpfulness.
    def pairs_for(pool, key, per_scene):
        for s in pool:
            r = random.Random(f"{seed}-{key}-{s.id}")
            for j in range(per_scene):
                cat = r.choice(CATEGORIES)
                spec = choice[s.image] if r.random() < 0.1 else make_spec(cat, s, r)
                if spec["type"] not in YESNO_TYPES and spec["type"] != "choice" and r.random() < 0.1:
                    spec = make_exists_spec(s, r, present=r.random() < 0.5)
                good = answer(spec, s)
                halluc = r.random() < 0.75 or spec["type"] in YESNO_TYPES or spec["type"] == "choice"
                if halluc:
                    bad, kind = hallucinate(spec, s, r)
                    out["planted"].append((s, spec, bad, kind))
                else:
                    bad = less_helpful(spec, s, r)
                    out["unhelpful"].append((s, spec, bad))
                out["items"].append((s, spec, good))
                pref = 1 if r.random() < 0.5 else 2
                o1, o2 = (good, bad) if pref == 1 else (bad, good)
                out[key].append(
                    {
                        "id": f"{s.id}-pref{j}",
                        "image": s.image,
                        "conversations": _conversation([(question(spec), good)]),
                        "output_1": {"value": o1},
                        "output_2": {"value": o2},
                        "preference": pref,
                        "hallucination": bool(halluc),
                    }
                )

    pairs_for(train, "preference", 2)
    pairs_for(evals, "preference_eval", 1)

    # PPO prompts: caption_type 1 general, 2-5 multiple choice (answer A-D), 6 "No", 7 "Yes".
    for s in train:
        r = random.Random(f"{seed}-ppo-{s.id}")
        u = r.random()
        if u < 0.35:
            spec = make_spec(r.choice(["holistic", "attribute", "counting", "spatial", "other"]), s, r)
            while spec["type"] in YESNO_TYPES:
                spec = make_spec("holistic", s, r)
            ctype = 1
        elif u < 0.6:
            spec = choice[s.image]
            ctype = FACT_CAPTION_TYPES[spec["answer"]]
        else:
            spec = (
                make_exists_spec(s, r, present=r.random() < 0.5)
                if r.random() < 0.6
                else make_spec("spatial", s, r)
            )
            if spec["type"] not in YESNO_TYPES:
                spec = make_exists_spec(s, r, present=r.random() < 0.5)
            ctype = 7 if answer(spec, s) == "Yes." else 6
        # length_bonus scales the length penalty: short-answer prompts get the full penalty,
        # descriptions none (their answers are meant to be long).
        lb = 0.0 if spec["type"] == "describe" else 1.0
        out["ppo_specs"].append((s, spec))
        out["ppo"].append(
            {
                "id": f"{s.id}-ppo",
                "image": s.image,
                "conversations": [{"from": "human", "value": _human(question(spec), True)}],
                "caption_type": ctype,
                "length_bonus": lb,
            }
        )

    out["eval"] = _eval_sets(train, evals, seed)
    return out


def _eval_item(s: Scene, spec: dict, idx: str, **extra) -> dict:
    d = {"id": idx, "image": s.image, "question": question(spec), "spec": spec, "answer": answer(spec, s)}
    d.update(extra)
    return d


def _eval_sets(train: list[Scene], evals: list[Scene], seed: int) -> dict:
    freq: dict[tuple[str, str], int] = {}
    co: dict[tuple[tuple[str, str], tuple[str, str]], int] = {}
    for s in train:
        names = [(o.color, o.shape) for o in s.objects]
        for a in names:
            freq[a] = freq.get(a, 0) + 1
            for b in names:
                if a != b:
                    co[(a, b)] = co.get((a, b), 0) + 1
    sets: dict[str, list] = {
        "pope_random": [],
        "pope_popular": [],
        "pope_adversarial": [],
        "mmhal": [],
        "chair": [],
    }
    for k, s in enumerate(evals):
        r = random.Random(f"{seed}-eval-{s.id}")
        present = [(o.color, o.shape) for o in s.objects]
        absent = _absent_combos(s)
        npos = min(3, len(present))
        pos = r.sample(present, npos)
        negs = {
            "random": r.sample(absent, npos),
            # POPE popular: the most frequent objects (in training scenes) that are absent
            "popular": sorted(absent, key=lambda a: (-freq.get(a, 0), a))[:npos],
            # POPE adversarial: absent objects co-occurring most with the present ones; here they
            # share a colour or shape with a present object (the most confusable).
            "adversarial": sorted(
                [a for a in absent if any(a[0] == p[0] or a[1] == p[1] for p in present)] or absent,
                key=lambda a: (-sum(co.get((a, p), 0) for p in present), a),
            )[:npos],
        }
        for split, neg in negs.items():
            qs = [(p, "yes") for p in pos] + [(a, "no") for a in neg]
            for j, ((c, sh), label) in enumerate(qs):
                spec = {"type": "exists", "color": c, "shape": sh}
                sets[f"pope_{split}"].append(
                    _eval_item(s, spec, f"{s.id}-{split}-{j}", label=label, category=split)
                )
        for j in range(2):  # MMHal-style: 8 categories cycled over the eval scenes
            cat = CATEGORIES[(2 * k + j) % len(CATEGORIES)]
            sets["mmhal"].append(_eval_item(s, make_spec(cat, s, r), f"{s.id}-mmhal-{j}", category=cat))
        sets["chair"].append(
            _eval_item(s, {"type": "describe", "variant": 0}, f"{s.id}-chair", category="holistic")
        )
    return sets


def _dump(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def write_dataset(out_dir, n: int, seed: int, image_size: int = 48, n_eval: Optional[int] = None) -> dict:
    """Write a ShapesWorld dataset (LLaVA-RLHF formats) into ``out_dir``; returns counts/paths.

    Files: sft.json, preference.json, preference_eval.json, image_to_caption.json, ppo_prompts.json,
    scenes.json (the facts), eval/{pope_random,pope_popular,pope_adversarial,mmhal,chair}.json,
    images/*.png. Same (n, seed, image_size, n_eval) -> byte-identical files.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    data = build(n, seed, n_eval)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for s in data["scenes"]:
        # PNG without metadata chunks (no time stamps): byte-identical across runs.
        render(s, image_size).save(img_dir / s.image, format="PNG", optimize=False)
    files = {
        "sft": out / "sft.json",
        "preference": out / "preference.json",
        "preference_eval": out / "preference_eval.json",
        "captions": out / "image_to_caption.json",
        "ppo_prompts": out / "ppo_prompts.json",
        "scenes": out / "scenes.json",
    }
    _dump(files["preference"], data["preference"])
    _dump(files["preference_eval"], data["preference_eval"])
    _dump(files["captions"], data["captions"])
    _dump(files["ppo_prompts"], data["ppo"])
    _dump(files["scenes"], [s.to_dict() for s in data["scenes"]])
    for name, items in data["eval"].items():
        files[f"eval/{name}"] = out / "eval" / f"{name}.json"
        _dump(files[f"eval/{name}"], items)
    _dump(files["sft"], data["sft"])  # last: its presence marks a complete dataset (setup.ensure_dataset)
    counts = {
        "scenes_train": sum(s.split == "train" for s in data["scenes"]),
        "scenes_eval": sum(s.split == "eval" for s in data["scenes"]),
        "sft": len(data["sft"]),
        "preference": len(data["preference"]),
        "preference_eval": len(data["preference_eval"]),
        "ppo_prompts": len(data["ppo"]),
        **{f"eval/{k}": len(v) for k, v in data["eval"].items()},
    }
    return {
        "root": str(out),
        "images": str(img_dir),
        "counts": counts,
        "files": {k: str(v) for k, v in files.items()},
        "image_size": image_size,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def load_scenes(path) -> dict[str, Scene]:
    """scenes.json -> {image file name: Scene}."""
    with open(path) as f:
        return {d["image"]: Scene.from_dict(d) for d in json.load(f)}


__all__ = [
    "Scene",
    "Obj",
    "COLORS",
    "SHAPES",
    "SIZES",
    "POSITIONS",
    "BACKGROUNDS",
    "CATEGORIES",
    "random_scene",
    "render",
    "patch_labels",
    "PATCH_LABELS",
    "question",
    "answer",
    "make_spec",
    "make_choice_spec",
    "make_exists_spec",
    "hallucinate",
    "less_helpful",
    "build",
    "write_dataset",
    "load_scenes",
]
