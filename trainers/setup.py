"""What a stage starts from: which checkpoint (an explicit path, this run's SFT output, or
``model.checkpoint``), and loading model + tokenizer + images for it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from factrl.trainers.config import Config
from factrl.trainers.run import RunLayout


def is_tiny(cfg: Config) -> bool:
    """The embedded default (no model.checkpoint): a tiny base built from scratch by
    ``factrl.trainers.embedded.prepare`` (the CLI runs it before any stage)."""
    return cfg.model.checkpoint == ""


def base_checkpoint(cfg: Config, layout: RunLayout) -> Path:
    """What SFT starts from: model.checkpoint, or the embedded default's tiny base."""
    if not is_tiny(cfg):
        return Path(cfg.model.checkpoint)
    if not (layout.tiny_base / "config.json").is_file():
        raise FileNotFoundError(f"{layout.tiny_base}: no tiny base checkpoint and model.checkpoint is empty; "
                                "`factrl sft` builds it (factrl.trainers.embedded.prepare)")
    return layout.tiny_base


def stage_base(cfg: Config, layout: RunLayout, override: str) -> Path:
    """What RM and PPO quantize: an explicit path, else this run's SFT output, else model.checkpoint."""
    if override:
        return Path(override)
    if (layout.sft_final / "config.json").is_file():
        return layout.sft_final
    if is_tiny(cfg):
        raise FileNotFoundError(f"{layout.sft_final}: no SFT checkpoint; run `factrl sft` (make train-sft) first")
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

    root = Path(cfg.data.root)
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
