"""The one context every stage runs in (SFT, RM, PPO, eval), and the optimisation pieces it owns.

``Stage(cfg, name)`` resolves the device, seeds, joins the process group and saves the resolved
config; ``stage.train(...)`` then builds optimizer + schedule, the NaN step guard, checkpoints,
resumes per ``run.resume`` and opens the logger. A stage's loop calls ``optimizer_step`` and
``end_step`` (log + checkpoint) and finally ``finish``. Functions and one object, no base class.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from factrl.trainers.checkpoint import Checkpoints, load_trainable_state, rng_state, set_rng_state, trainable_state
from factrl.trainers.config import Config, save_config, to_dict
from factrl.trainers.logs import Logger, plot_curves, read_metrics
from factrl.trainers.run import RunLayout, all_reduce_grads, init_distributed, resolve_device, seed_everything


class NonFiniteError(RuntimeError):
    pass


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
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)


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


def trainable_adapter(model, name: str, lora=None, copy_from: Optional[str] = None, head: bool = False) -> list:
    """Add adapter ``name`` — fresh from ``lora`` (a LoraConfig: LoRA B = 0, so the model is
    unchanged) or a copy of adapter ``copy_from`` — and with ``head`` a zero-initialized scalar
    head of the same name; mark them trainable and return their parameters (what to train)."""
    if copy_from is not None:
        model.copy_adapter(copy_from, name)
    else:
        model.add_adapter(name, lora.r, lora.alpha, lora.dropout, lora.targets)
    if head:
        model.add_head(name, zero_init=True)
    params = model.adapter_parameters(name) + (list(model.heads[name].parameters()) if head else [])
    for p in params:
        p.requires_grad_(True)
    return params


class Stage:
    """One stage run: ``cfg``, ``name``, ``layout`` (every path of the run), ``out`` (this
    stage's directory), ``device``, ``rank``/``world``; after ``train``: ``optimizer``,
    ``scheduler``, ``guard``, ``ckpts``, ``log`` and ``start`` (the first step to run)."""

    def __init__(self, cfg: Config, name: str):
        self.cfg, self.name = cfg, name
        self.layout = RunLayout(Path(cfg.run.out_dir))
        self.out = self.layout.stage(name)
        self.device = resolve_device(cfg.run.device)
        seed_everything(cfg.run.seed)
        self.rank, self.world = init_distributed()
        if self.rank == 0:
            save_config(cfg, self.out / "config.yaml")

    def train(self, model, params: list, loop, steps: int, generators: Optional[dict] = None) -> dict:
        """Set up training of ``params`` for ``steps`` steps (the schedule's length) and resume
        per ``run.resume``. Returns the resumed checkpoint's state ({} for a fresh run) for stage
        extras such as kl_coef."""
        self.model, self.params, self.loop, self.steps = model, params, loop, steps
        self.generators = generators or {}
        self.optimizer, self.scheduler = make_optimizer(params, loop, steps)
        self.guard = StepGuard(loop.max_nonfinite_skips)
        self.ckpts = Checkpoints(self.out / "checkpoints", keep=loop.keep_last)
        self.start, state = self._resume()
        run = self.cfg.run
        self.log = Logger(self.out, steps, self.name, run.progress, self.rank, initial=self.start,
                          report_to=run.report_to, run_config=to_dict(self.cfg), project=run.wandb_project)
        return state

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def optimizer_step(self, loss: torch.Tensor, schedule: bool = True) -> Optional[float]:
        """Gradients averaged over processes, then a guarded step (and a schedule step unless
        ``schedule`` is False: PPO steps it once per PPO step); the grad norm, or None if skipped."""
        all_reduce_grads(self.params)
        return self.guard.step(loss, self.params, self.optimizer, self.scheduler if schedule else None,
                               self.loop.grad_clip)

    def end_step(self, step: int, metrics: dict, **extra) -> None:
        """Log step ``step`` (1-based) and checkpoint it every ``save_every`` steps and at the end."""
        self.log.log(step, metrics)
        if self.rank == 0 and (step % self.loop.save_every == 0 or step == self.steps):
            self.save(step, **extra)

    def save(self, step: int, **extra) -> Path:
        """Everything a resumed run needs: trainable weights, optimizer, schedule, step (= data
        position), guard counters, every RNG state, and stage extras."""
        g = self.guard
        return self.ckpts.save(step, {"model": trainable_state(self.model), "optimizer": self.optimizer.state_dict(),
                                      "scheduler": self.scheduler.state_dict(), "step": step, "skipped": g.skipped,
                                      "consecutive": g.consecutive, "rng": rng_state(self.generators), **extra},
                               self.cfg)

    def _resume(self) -> tuple[int, dict]:
        """(first step, saved state or {}). Log rows of steps the resumed run will redo are
        dropped; a fresh run starts a fresh log."""
        metrics = self.out / "metrics.jsonl"
        path = self.ckpts.resolve(self.cfg.run.resume)
        if path is None:
            if self.rank == 0 and metrics.exists():
                metrics.unlink()
            return 0, {}
        st = Checkpoints.load(path)
        load_trainable_state(self.model, st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.guard.skipped, self.guard.consecutive = st["skipped"], st["consecutive"]
        set_rng_state(st["rng"], self.generators)
        if self.rank == 0:
            rows = [r for r in read_metrics(metrics) if r["step"] <= st["step"]]
            metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
            print(f"[factrl] resumed from {path} at step {st['step']}")
        return st["step"], st

    def finish(self, plot_keys) -> None:
        self.log.close()
        if self.rank == 0:
            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png", list(plot_keys))
