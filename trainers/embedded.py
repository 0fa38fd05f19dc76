"""The embedded default, chosen when ``model.checkpoint`` is empty: ShapesWorld data and a tiny
LLaVA base built from scratch, both made on first use. The CLI and the pipeline call ``prepare``
before any stage; the generic stages never import the world (they read its files like any data).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from factrl.trainers.config import Config
from factrl.trainers.run import RunLayout
from factrl.trainers.setup import is_tiny


def prepare(cfg: Config) -> None:
    """For the embedded default: ShapesWorld under data.root and the tiny base under run.out_dir."""
    if is_tiny(cfg):
        ensure_dataset(cfg)
        ensure_tiny_base(cfg)


def ensure_dataset(cfg: Config) -> Path:
    """The data root; for the tiny preset, ShapesWorld is written there if absent."""
    root = Path(cfg.data.root)
    if (root / cfg.data.sft_file).is_file():
        return root
    from factrl.trainers.shapesworld.dataset import write_dataset

    print(f"[factrl] generating ShapesWorld ({cfg.data.shapes_n} scenes, seed {cfg.data.shapes_seed}) in {root}")
    write_dataset(root, n=cfg.data.shapes_n, seed=cfg.data.shapes_seed, image_size=cfg.data.shapes_image_size)
    return root


def ensure_tiny_base(cfg: Config) -> Path:
    """The tiny LLaVA built from scratch under run.out_dir, its CLIP tower pretrained on the scenes."""
    path = RunLayout(Path(cfg.run.out_dir)).tiny_base
    if not (path / "config.json").is_file():
        from factrl.model.tiny import build_tiny_checkpoint
        from factrl.trainers.data import text_corpus

        root = ensure_dataset(cfg)
        tiny = cfg.model.tiny
        if tiny.image_size != cfg.data.shapes_image_size:
            raise ValueError(f"model.tiny.image_size={tiny.image_size} != data.shapes_image_size="
                             f"{cfg.data.shapes_image_size}")
        print(f"[factrl] building the tiny base checkpoint in {path}")
        pretrain = _tower_pretraining(cfg, root) if tiny.vision_pretrain_steps > 0 else None
        build_tiny_checkpoint(path, tiny, list(text_corpus(root)), seed=cfg.run.seed, pretrain_vision=pretrain)
    return path


def _tower_pretraining(cfg: Config, root: Path) -> Callable:
    """pretrain_vision hook for the tiny base: per-patch attributes of ShapesWorld's *training*
    scenes (held-out accuracy on 256 eval scenes goes into the report)."""
    import random

    from factrl.model.tiny import make_image_processor, pretrain_patch_features
    from factrl.trainers.data import image_loader
    from factrl.trainers.shapesworld.dataset import load_scenes
    from factrl.trainers.shapesworld.scenes import PATCH_LABELS, patch_labels

    tiny = cfg.model.tiny
    grid = tiny.image_size // tiny.patch_size
    if grid % 3:
        raise ValueError(f"model.tiny.patch_size={tiny.patch_size}: a {grid}x{grid} patch grid does not tile "
                         "ShapesWorld's 3x3 cells, so the tower cannot be pretrained per cell; choose a patch size "
                         "giving a multiple of 3 patches per side, or model.tiny.vision_pretrain_steps=0")
    scenes = list(load_scenes(root / "scenes.json").values())
    train = [s for s in scenes if s.split == "train"]
    held = [s for s in scenes if s.split == "eval"][:256]
    images = image_loader(str(root / cfg.data.image_folder), make_image_processor(tiny.image_size),
                          cfg.data.image_aspect)
    rng = random.Random(cfg.run.seed)

    def batch(ss):
        labels = [patch_labels(s, grid) for s in ss]
        return (torch.stack([images(s.image) for s in ss]),
                {k: torch.tensor([lab[k] for lab in labels]) for k in PATCH_LABELS})

    def run(vision):
        heldout = None
        if held:  # scored on the patches that show an object
            px, labels = batch(held)
            heldout = (px, labels, labels["shape"] > 0)
        return pretrain_patch_features(vision, lambda step: batch(rng.sample(train, min(64, len(train)))), PATCH_LABELS,
                                       tiny.vision_pretrain_steps, heldout=heldout, seed=cfg.run.seed,
                                       progress=cfg.run.progress)

    return run
