"""Which question to ask about a scene: a spec (see ``grammar.QTYPES``) per MMHal-style category,
the POPE-style existence question and the per-scene multiple-choice question."""

from __future__ import annotations

import random

from .scenes import COLORS, POSITION_CELLS, RELATIONS, SHAPES, Scene

CATEGORIES = ["attribute", "adversarial", "comparison", "counting", "spatial", "environment", "holistic", "other"]


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
        c, s = rng.choice(scene.absent())
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
    c, s = rng.choice(scene.absent())
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
