"""Checkpoints that really resume: trainable weights, optimizer, schedule, step, guard counters
and every RNG state, written atomically; only complete ones count."""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from factrl.model.io import atomic_dir
from factrl.trainers.config import Config, save_config


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    for k, g in (generators or {}).items():
        st[f"gen/{k}"] = g.get_state()
    return st


def set_rng_state(st: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    for k, g in (generators or {}).items():
        if f"gen/{k}" in st:
            g.set_state(st[f"gen/{k}"])


@dataclass
class Checkpoints:
    """``<dir>/step-00000042/{state.pt, config.yaml, COMPLETE}``, written into a temp dir that
    replaces the step dir in one rename; only directories with COMPLETE count. Keeps the last
    ``keep`` of them."""

    root: Path
    keep: int = 2

    def save(self, step: int, state: dict, cfg: Config) -> Path:
        final = self.root / f"step-{step:08d}"
        with atomic_dir(final) as tmp:
            torch.save(state, tmp / "state.pt")
            save_config(cfg, tmp / "config.yaml")
            (tmp / "COMPLETE").write_text(str(step))
        for old in self.complete()[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / "COMPLETE").is_file())

    def latest(self) -> Optional[Path]:
        c = self.complete()
        return c[-1] if c else None

    def resolve(self, resume: str) -> Optional[Path]:
        """``none`` → None; ``auto`` → the newest complete checkpoint (or None); else a path."""
        if resume in ("", "none"):
            return None
        if resume == "auto":
            return self.latest()
        p = Path(resume)
        if not (p / "COMPLETE").is_file():
            raise FileNotFoundError(f"resume={resume!r}: not a complete checkpoint directory (no COMPLETE)")
        return p

    @staticmethod
    def load(path: Path) -> dict:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=False)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in module.named_parameters()}
    return {names[id(p)]: p.detach().clone() for p in module.parameters() if p.requires_grad}


def load_trainable_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    missing = [k for k in state if k not in params]
    if missing:
        raise KeyError(f"checkpoint holds parameters the model lacks: {missing[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
