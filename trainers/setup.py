"""Stage set-up shared by SFT, RM, PPO and eval: the embedded tiny assets (ShapesWorld data and
a tiny base checkpoint, made on first use), which checkpoint a stage starts from, and loading
model + tokenizer + images for it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from factrl.trainers.config import Config


def is_tiny(cfg: Config) -> bool:
    return cfg.model.checkpoint == ""


def ensure_dataset(cfg: Config) -> Path:
    """The data root; for the tiny preset, ShapesWorld is written there if absent."""
    root = Path(cfg.data.root)
    if (root / cfg.data.sft_file).is_file() or not is_tiny(cfg):
        return root
    from factrl.trainers.shapes import write_dataset

    print(f"[factrl] generating ShapesWorld ({cfg.data.shapes_n} scenes, seed {cfg.data.shapes_seed}) in {root}")
    write_dataset(root, n=cfg.data.shapes_n, seed=cfg.data.shapes_seed, image_size=cfg.data.shapes_image_size)
    return root


def ensure_base_checkpoint(cfg: Config) -> Path:
    """model.checkpoint, or for the tiny preset a random tiny LLaVA built under run.out_dir."""
    if not is_tiny(cfg):
        return Path(cfg.model.checkpoint)
    path = Path(cfg.run.out_dir) / "tiny_base"
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
    from factrl.trainers.shapes import PATCH_LABELS, load_scenes, patch_labels

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


def stage_base(cfg: Config, override: str) -> Path:
    """What RM and PPO quantize: an explicit path, else this run's SFT output, else model.checkpoint."""
    if override:
        return Path(override)
    sft = Path(cfg.run.out_dir) / "sft" / "final"
    if (sft / "config.json").is_file():
        return sft
    if is_tiny(cfg):
        raise FileNotFoundError(f"{sft}: no SFT checkpoint; run `factrl sft` (make train-sft) first")
    return Path(cfg.model.checkpoint)


@dataclass
class Assets:
    model: "object"
    tokenizer: "object"
    processor: "object"
    images: Optional[Callable[[str], torch.Tensor]]
    num_image_tokens: int
    data_root: Path
    base: Path


def load_assets(cfg: Config, base: Path, quantize: bool, device: torch.device) -> Assets:
    from factrl.model.io import load_image_processor, load_llava, load_tokenizer
    from factrl.trainers.data import image_loader

    root = ensure_dataset(cfg)
    dtype = cfg.model.dtype if device.type == "cuda" else "float32"
    model = load_llava(base, quantize=quantize, double_quant=cfg.model.double_quant,
                       blocksize=cfg.model.blocksize, dtype=dtype, device=device)
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    tok = load_tokenizer(base)
    proc = load_image_processor(base)
    vc = model.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2
    images = image_loader(str(root / cfg.data.image_folder), proc, cfg.data.image_aspect)
    return Assets(model, tok, proc, images, n_img, root, base)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
