"""What every stage shares: run setup, logging, checkpoints that really resume, NaN guards,
learning-rate schedules, data order, and the gradient all-reduce for multi-process runs.

Functions, not a base class: each trainer calls what it needs, top-down.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist

from factrl.trainers.config import Config, save_config


class NonFiniteError(RuntimeError):
    pass


# ---- run setup ----------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={name!r} but CUDA is not available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def init_distributed() -> tuple[int, int]:
    """(rank, world) — initializes a process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Average gradients of the trainable parameters over processes (DDP on what trains)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def stage_dir(cfg: Config, stage: str) -> Path:
    return Path(cfg.run.out_dir) / stage


@contextmanager
def autocast(device: torch.device, dtype_name: str):
    """bf16/fp16 autocast on GPU; plain fp32 on CPU."""
    if device.type == "cuda" and dtype_name in ("bfloat16", "float16"):
        with torch.autocast("cuda", dtype=getattr(torch, dtype_name)):
            yield
    else:
        yield


# ---- logging --------------------------------------------------------------------------------------
class Logger:
    """Metrics to ``metrics.jsonl`` and tensorboard, a tqdm bar with the live loss, phase timers."""

    def __init__(self, out: Path, total: int, desc: str, progress: bool = True, rank: int = 0, initial: int = 0):
        self.out, self.rank = out, rank
        self.path = out / "metrics.jsonl"
        self.phase: dict[str, float] = {}
        self.tb = None
        self.bar = None
        if rank != 0:
            return
        out.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        except Exception:  # tensorboard is optional at run time
            self.tb = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)

    @contextmanager
    def timer(self, phase: str):
        t0 = time.perf_counter()
        yield
        self.phase[phase] = self.phase.get(phase, 0.0) + time.perf_counter() - t0

    def log(self, step: int, metrics: dict, advance: int = 1) -> None:
        if self.rank != 0:
            return
        row = {"step": step, **{k: _scalar(v) for k, v in metrics.items()},
               **{f"time/{k}": round(v, 4) for k, v in self.phase.items()}}
        self.phase = {}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            shown = {k: f"{row[k]:.4g}" for k in ("loss", "reward", "kl", "acc") if isinstance(row.get(k), float)}
            self.bar.set_postfix(shown)
            self.bar.update(advance)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.rank == 0 and self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _scalar(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, png: Path, keys: list[str]) -> Optional[Path]:
    """PNG of the given metric curves over steps (skipped if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path)
    keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png


# ---- optimisation ---------------------------------------------------------------------------------
def lr_lambda(schedule: str, warmup: int, total: int, decay_ratio: float = 0.2):
    """LR multiplier per step: linear warmup, then ``constant``, ``cosine`` to 0 at ``total``, or
    ``wsd`` (warmup-stable-decay): constant, then a cosine to 0 over the last ``decay_ratio`` of
    the steps. A tiny model trained from scratch needs the full LR long enough to leave its
    plateaus (cosine has mostly decayed by then); the short final decay then settles it."""
    if schedule not in ("constant", "cosine", "wsd"):
        raise ValueError(f"unknown schedule {schedule!r} (cosine | constant | wsd)")
    if not 0.0 < decay_ratio <= 1.0:
        raise ValueError(f"decay_ratio={decay_ratio}: expected 0 < decay_ratio <= 1")
    decay_start = max(warmup, total - int(round(decay_ratio * total)))

    def cosine(step: int, start: int) -> float:
        progress = (step - start) / max(1, total - start)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        if schedule == "cosine":
            return cosine(step, warmup)
        return 1.0 if step < decay_start else cosine(step, decay_start)

    return f


def make_optimizer(params: list, loop, total_steps: int):
    opt = torch.optim.AdamW(params, lr=loop.lr, betas=tuple(loop.betas), weight_decay=loop.weight_decay)
    warmup = loop.warmup_steps if loop.warmup_steps > 0 else int(round(loop.warmup_ratio * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(loop.schedule, warmup, total_steps, loop.decay_ratio))
    return opt, sched


@dataclass
class StepGuard:
    """Skips optimizer steps whose loss or gradients are not finite; stops after K in a row."""

    max_consecutive: int
    skipped: int = 0
    consecutive: int = 0

    def step(self, loss: torch.Tensor, params: list, optimizer, scheduler, grad_clip: float) -> Optional[float]:
        grads = [p.grad for p in params if p.grad is not None]
        finite = bool(torch.isfinite(loss).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.consecutive += 1
            if self.consecutive >= self.max_consecutive:
                raise NonFiniteError(f"{self.consecutive} consecutive steps with non-finite loss or gradients "
                                     f"(loss={loss.item()}); stopping. Lower the learning rate or check the data.")
            return None
        self.consecutive = 0
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else \
            torch.sqrt(sum((g.float() ** 2).sum() for g in grads)) if grads else torch.tensor(0.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)


# ---- data order ---------------------------------------------------------------------------------------
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The permutation of epoch ``epoch``: a function of (seed, epoch) alone, so a resumed run
    walks exactly the same order from its saved position."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batch_indices(n: int, batch: int, seed: int, step: int, rank: int = 0, world: int = 1) -> list[int]:
    """Example indices of global optimizer step ``step`` for this process (drop_last epochs)."""
    per_epoch = n // batch
    if per_epoch == 0:
        raise ValueError(f"dataset has {n} examples, fewer than one batch of {batch}")
    epoch, pos = divmod(step, per_epoch)
    idx = epoch_order(n, seed, epoch)[pos * batch:(pos + 1) * batch]
    per_rank = batch // world
    return idx[rank * per_rank:(rank + 1) * per_rank]


# ---- checkpoints ----------------------------------------------------------------------------------------
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
    """``<dir>/step-00000042/{state.pt, config.yaml, COMPLETE}``, written to a temp dir and
    renamed; only directories with COMPLETE count. Keeps the last ``keep`` of them."""

    root: Path
    keep: int = 2
    saved: list = field(default_factory=list)

    def save(self, step: int, state: dict, cfg: Config) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(state, tmp / "state.pt")
        save_config(cfg, tmp / "config.yaml")
        (tmp / "COMPLETE").write_text(str(step))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
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


def save_state(ckpts: Checkpoints, step: int, cfg: Config, model, optimizer, scheduler, guard: StepGuard,
               generators: dict | None = None, **extra) -> Path:
    """Checkpoint everything a resumed run needs: trainable weights, optimizer, schedule, step
    (= data position), NaN-guard counters, every RNG state, and stage extras (e.g. kl_coef)."""
    return ckpts.save(step, {"model": trainable_state(model), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "step": step, "skipped": guard.skipped,
                             "consecutive": guard.consecutive, "rng": rng_state(generators), **extra}, cfg)


def resume_state(ckpts: Checkpoints, cfg: Config, model, optimizer, scheduler, guard: StepGuard,
                 metrics_path: Path, generators: dict | None = None, rank: int = 0) -> tuple[int, dict]:
    """Restore per ``run.resume``; returns (first step to run, the saved state or {}). Log rows of
    steps the resumed run will redo are dropped; a fresh run starts a fresh log."""
    path = ckpts.resolve(cfg.run.resume)
    if path is None:
        if rank == 0 and metrics_path.exists():
            metrics_path.unlink()
        return 0, {}
    st = Checkpoints.load(path)
    load_trainable_state(model, st["model"])
    optimizer.load_state_dict(st["optimizer"])
    scheduler.load_state_dict(st["scheduler"])
    guard.skipped, guard.consecutive = st["skipped"], st["consecutive"]
    set_rng_state(st["rng"], generators)
    if rank == 0:
        rows = [r for r in read_metrics(metrics_path) if r["step"] <= st["step"]]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"[factrl] resumed from {path} at step {st['step']}")
    return st["step"], st
