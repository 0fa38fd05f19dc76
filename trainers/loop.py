"""The supervised optimisation loop SFT and RM share (PPO has its own, with rollouts).

Reads top-down: 1. data order for this step, 2. micro-batches forward/backward with gradient
accumulation, 3. guarded optimizer step (gradients averaged over processes), 4. eval, log,
checkpoint. Losses are normalised by a count over the *global* batch (tokens for SFT, pairs for
RM), so 1 process × accumulation and N processes give the same gradients.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from factrl.trainers.run import all_sum
from factrl.trainers.stage import Stage, batch_indices


def total_steps(loop, n_examples: int, world: int) -> int:
    global_batch = loop.batch_size * loop.grad_accum * world
    per_epoch = n_examples // global_batch
    if per_epoch == 0:
        raise ValueError(f"{n_examples} examples is fewer than one global batch of {global_batch}")
    return loop.max_steps if loop.max_steps > 0 else max(1, math.ceil(loop.epochs * per_epoch))


def supervised_loop(stage: Stage, loop, model: torch.nn.Module, params: list,
                    n_examples: int, make_batch: Callable[[list[int]], dict],
                    count: Callable[[dict], float], loss_fn: Callable[[dict, float], tuple],
                    eval_fn: Optional[Callable[[int], dict]] = None, plot_keys=("loss",)) -> dict:
    """Train ``params`` of ``model``; returns the last logged metrics (plus eval)."""
    steps = total_steps(loop, n_examples, stage.world)
    stage.train(model, params, loop, steps, loss_fn=loss_fn)
    log, global_batch = stage.log, loop.batch_size * loop.grad_accum * stage.world
    last: dict = {}
    model.train()
    for step in range(stage.start, steps):
        # 1. this process' share of the global batch, split into micro-batches
        with log.timer("data"):
            idx = batch_indices(n_examples, global_batch, stage.cfg.run.seed, step, stage.rank, stage.world)
            micro = [make_batch(idx[i:i + loop.batch_size]) for i in range(0, len(idx), loop.batch_size)]
            norm = all_sum(sum(count(b) for b in micro))
        # 2. forward/backward with accumulation
        loss_total = torch.zeros(())
        sums: dict[str, float] = {}
        for b in micro:
            with log.timer("forward"):
                loss, metrics = stage.forward(loss_fn, b, norm)
            with log.timer("backward"):
                stage.backward(loss)
            loss_total = loss_total + loss.detach().float().cpu()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        # 3. guarded optimizer step: non-finite loss/grad -> skipped, counted, never applied
        loss_value = all_sum(float(loss_total))
        with log.timer("optimizer"):
            # summed, not averaged: each process' loss is its share of the global mean already
            gnorm = stage.optimizer_step(torch.tensor(loss_value), average=False)
        last = {"loss": loss_value, "lr": stage.lr, "grad_norm": gnorm,
                "skipped": stage.guard.skipped, **{k: all_sum(v) for k, v in sums.items()}}
        # 4. eval, log, checkpoint
        if eval_fn is not None and loop.eval_every > 0 and (step + 1) % loop.eval_every == 0:
            last.update(eval_fn(step + 1))
            model.train()
        stage.end_step(step + 1, last)
    if eval_fn is not None and loop.eval_every >= 0 and not any(k.startswith("eval/") for k in last):
        last.update(eval_fn(steps))
    stage.finish(plot_keys)
    return {**last, "steps": steps}
