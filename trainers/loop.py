"""The supervised optimisation loop SFT and RM share (PPO has its own, with rollouts).

Reads top-down: 1. data order for this step, 2. micro-batches forward/backward with gradient
accumulation, 3. gradient all-reduce across processes, 4. guarded optimizer step, 5. log,
eval, checkpoint. Losses are normalised by a count over the *global* batch (tokens for SFT,
pairs for RM), so 1 process × accumulation and N processes give the same gradients.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist

from factrl.trainers.common import (
    Checkpoints,
    Logger,
    StepGuard,
    all_reduce_grads,
    batch_indices,
    init_distributed,
    make_optimizer,
    plot_curves,
    resume_state,
    save_state,
    stage_dir,
)
from factrl.trainers.config import Config, save_config


def _all_sum(x: float) -> float:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())
    return x


def total_steps(loop, n_examples: int, world: int) -> int:
    global_batch = loop.batch_size * loop.grad_accum * world
    per_epoch = n_examples // global_batch
    if per_epoch == 0:
        raise ValueError(f"{n_examples} examples is fewer than one global batch of {global_batch}")
    return loop.max_steps if loop.max_steps > 0 else max(1, math.ceil(loop.epochs * per_epoch))


def supervised_loop(cfg: Config, loop, stage: str, model: torch.nn.Module, params: list,
                    n_examples: int, make_batch: Callable[[list[int]], dict],
                    count: Callable[[dict], float], loss_fn: Callable[[dict, float], tuple],
                    eval_fn: Optional[Callable[[int], dict]] = None, plot_keys=("loss",)) -> dict:
    """Train ``params`` of ``model``; returns the last logged metrics (plus eval)."""
    rank, world = init_distributed()
    out = stage_dir(cfg, stage)
    if rank == 0:
        save_config(cfg, out / "config.yaml")
    steps = total_steps(loop, n_examples, world)
    optimizer, scheduler = make_optimizer(params, loop, steps)
    guard = StepGuard(loop.max_nonfinite_skips)
    ckpts = Checkpoints(out / "checkpoints", keep=loop.keep_last)

    start, _ = resume_state(ckpts, cfg, model, optimizer, scheduler, guard, out / "metrics.jsonl", rank=rank)

    log = Logger(out, steps, stage, cfg.run.progress, rank, initial=start)
    global_batch = loop.batch_size * loop.grad_accum * world
    last: dict = {}
    model.train()
    for step in range(start, steps):
        # 1. this process' share of the global batch, split into micro-batches
        with log.timer("data"):
            idx = batch_indices(n_examples, global_batch, cfg.run.seed, step, rank, world)
            micro = [make_batch(idx[i:i + loop.batch_size]) for i in range(0, len(idx), loop.batch_size)]
            norm = _all_sum(sum(count(b) for b in micro))
        # 2. forward/backward with accumulation
        loss_total = torch.zeros(())
        sums: dict[str, float] = {}
        for b in micro:
            with log.timer("forward"):
                loss, metrics = loss_fn(b, norm)
            with log.timer("backward"):
                loss.backward()
            loss_total = loss_total + loss.detach().float().cpu()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        # 3. gradients summed over processes (losses are already globally normalised)
        all_reduce_grads(params)
        loss_value = _all_sum(float(loss_total))
        # 4. guarded optimizer step: non-finite loss/grad -> skipped, counted, never applied
        with log.timer("optimizer"):
            gnorm = guard.step(torch.tensor(loss_value), params, optimizer, scheduler, loop.grad_clip)
        last = {"loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": gnorm,
                "skipped": guard.skipped, **{k: _all_sum(v) for k, v in sums.items()}}
        # 5. eval, log, checkpoint
        if eval_fn is not None and loop.eval_every > 0 and (step + 1) % loop.eval_every == 0:
            last.update(eval_fn(step + 1))
            model.train()
        log.log(step + 1, last)
        if rank == 0 and ((step + 1) % loop.save_every == 0 or step + 1 == steps):
            save_state(ckpts, step + 1, cfg, model, optimizer, scheduler, guard)
    log.close()
    if eval_fn is not None and not any(k.startswith("eval/") for k in last):
        last.update(eval_fn(steps))
    if rank == 0:
        plot_curves(out / "metrics.jsonl", out / "curves.png", list(plot_keys))
    return {**last, "steps": steps}
