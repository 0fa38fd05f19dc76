"""ShapesWorld's closed world: vocabulary, scenes (the exact facts of an image), their rendering
and per-patch labels."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Optional

from PIL import Image, ImageDraw

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

    def absent(self) -> list[tuple[str, str]]:
        """Every (color, shape) the scene has no object of."""
        present = {(o.color, o.shape) for o in self.objects}
        return [(c, s) for s in SHAPES for c in COLORS if (c, s) not in present]

    # -- texts
    def describe(self, objects: Optional[list[Obj]] = None, n: Optional[int] = None, noun: Optional[str] = None) -> str:
        """ "A <bg> background with <n> shape(s)[: <size> <color> <shape> at the <pos>, ...]." """
        objs, n = self.objects if objects is None else objects, len(self.objects) if n is None else n
        head = f"A {self.background} background with {n} {noun or ('shapes' if n != 1 else 'shape')}"
        return head + (": " + ", ".join(f"{o.size} {o.name} at the {o.pos}" for o in objs) if objs else "") + "."

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
