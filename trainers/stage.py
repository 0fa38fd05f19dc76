"""The one context every stage runs in (SFT, RM, PPO, eval), and the optimisation pieces it owns.

``Stage(cfg, name)`` resolves the device, seeds, joins the process group and saves the resolved
config; ``stage.train(...)`` then builds optimizer + schedule, the NaN step guard, checkpoints,
resumes per ``run.resume`` and opens the logger. A stage's loop calls ``optimizer_step`` and
``end_step`` (log + checkpoint) and finally ``finish``. Functions and one object, no base class.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from factrl.trainers.checkpoint import (
    CheckpointError,
    Checkpoints,
    load_trainable_state,
    remove_dead_temps,
    rng_state,
    set_rng_state,
    trainable_state,
)
from factrl.trainers.config import Config, ConfigError, load_config, save_config, to_dict, write_atomic
from factrl.trainers.logs import Logger, plot_curves, read_metrics
from factrl.trainers.run import (
    RunDirError,
    RunLayout,
    all_reduce_grads,
    all_sum,
    init_distributed,
    lock_out_dir,
    resolve_device,
    seed_everything,
)


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


def warmup_steps(loop, total_steps: int) -> int:
    return loop.warmup_steps if loop.warmup_steps > 0 else int(round(loop.warmup_ratio * total_steps))


def make_optimizer(params: list, loop, total_steps: int):
    opt = torch.optim.AdamW(params, lr=loop.lr, betas=tuple(loop.betas), weight_decay=loop.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(loop.schedule, warmup_steps(loop, total_steps), total_steps, loop.decay_ratio))
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
            return self._skip(loss)
        self.consecutive = 0
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else \
            torch.sqrt(sum((g.float() ** 2).sum() for g in grads)) if grads else torch.tensor(0.0)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def engine_step(self, engine, loss: torch.Tensor) -> Optional[float]:
        """The same counting for a DeepSpeed step: ZeRO skips (and does not schedule) a step whose
        gradient norm is not finite; a non-finite loss makes one."""
        if engine.was_step_applied() and bool(torch.isfinite(loss).all()):
            self.consecutive = 0
            norm = engine.get_global_grad_norm()
            return float("nan") if norm is None else float(norm)
        return self._skip(loss)

    def _skip(self, loss: torch.Tensor) -> None:
        """Count a skipped step; stop after ``max_consecutive`` in a row."""
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(f"{self.consecutive} consecutive steps with non-finite loss or gradients "
                                 f"(loss={loss.item()}); stopping. Lower the learning rate or check the data.")
        return None


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


# Resume: what may change without changing the optimization (logged when it does); everything
# else under model., data., the stage's own section and run.seed must match the checkpoint's
# config unless run.resume_override. Other stages' sections do not concern this one (logged only).
HARMLESS_RUN = ("run.out_dir", "run.device", "run.progress")
HOW_TO_START = ("run.resume", "run.overwrite", "run.resume_override")  # say how to start, not what: not compared
HARMLESS_FIELDS = ("save_every", "keep_last", "eval_every", "eval_items", "sample_every", "max_nonfinite_skips",
                   "save_merged")
PER_RUN_FILES = ("metrics.jsonl", "samples.jsonl")  # rows keyed by "step": fresh per run, cut back on resume


class Interrupted(Exception):
    """SIGINT/SIGTERM: the stage stopped after a complete step and checkpointed it."""

    def __init__(self, msg: str, signal_name: str):
        super().__init__(msg)
        self.signal_name = signal_name


def config_changes(old: dict, new: dict, stage: str) -> tuple[dict, dict]:
    """({key: (old, new)} that change the optimization, {key: (old, new)} that do not), flat keys."""
    a, b = _flat(old), _flat(new)
    changed = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
               if a.get(k) != b.get(k) and k not in HOW_TO_START}
    relevant = lambda k: (k.startswith(("model.", "data.", f"{stage}.")) or k == "run.seed") and \
        k not in HARMLESS_RUN and k.rsplit(".", 1)[-1] not in HARMLESS_FIELDS  # noqa: E731
    return ({k: v for k, v in changed.items() if relevant(k)}, {k: v for k, v in changed.items() if not relevant(k)})


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Stage:
    """One stage run: ``cfg``, ``name``, ``layout`` (every path of the run), ``out`` (this
    stage's directory), ``device``, ``rank``/``world``, ``resume_from`` (the verified checkpoint a
    resume starts from, or None); after ``train``: ``optimizer``, ``scheduler``, ``guard``,
    ``ckpts``, ``log`` and ``start`` (the first step to run).

    Before any model or data work the stage takes the out_dir's run lock, removes what killed
    writers left, picks and verifies the checkpoint to resume from and compares its config with
    this one; a fresh run into a stage directory holding another run's results refuses (unless
    ``run.overwrite``). SIGINT/SIGTERM during training end the current step, checkpoint it and
    raise ``Interrupted``. ``trains=False`` (eval): the lock and config only."""

    def __init__(self, cfg: Config, name: str, trains: bool = True):
        self.cfg, self.name = cfg, name
        self.layout = RunLayout(Path(cfg.run.out_dir))
        self.out = self.layout.stage(name)
        self.device = resolve_device(cfg.run.device)
        seed_everything(cfg.run.seed)
        # DeepSpeed ZeRO for the supervised stages; PPO trains adapters only and keeps factrl's DDP
        self.zero = cfg.run.distributed == "deepspeed" and name in ("sft", "rm")
        if self.zero:
            from factrl.trainers import zero

            self.rank, self.world = zero.init_process_group()
        else:
            self.rank, self.world = init_distributed()
        if cfg.run.distributed == "deepspeed" and name == "ppo" and self.rank == 0:
            print("[factrl] ppo: run.distributed=deepspeed applies to SFT and RM; PPO runs on factrl's DDP")
        self.engine = None
        self.ckpts = Checkpoints(self.out / "checkpoints")
        self._signal, self._handlers, self.changed = None, {}, {}
        if self.rank == 0:
            lock_out_dir(self.layout.root)
            remove_dead_temps(self.layout.root)  # the tiny base's, a final output's ...
            remove_dead_temps(self.out)
        self.resume_from = self._resume_point() if trains else None  # eval: no checkpoints, nothing to resume
        if self.rank == 0:
            save_config(cfg, self.out / "config.yaml")

    def _resume_point(self) -> Optional[Path]:
        """The checkpoint to resume from (verified, config compared), or None for a fresh run."""
        cfg, used = self.cfg, self._previous_results()
        path = self.ckpts.resolve(cfg.run.resume)
        if path is None and cfg.run.resume in ("", "none") and used and self.rank == 0:
            if not cfg.run.overwrite:
                raise RunDirError(f"{self.out} holds another run's {', '.join(used)}: a fresh run there would mix "
                                  "with them. Continue it with run.resume=auto, replace it with run.overwrite=true, "
                                  "or choose another run.out_dir")
            print(f"[factrl] run.overwrite=true: deleting {', '.join(used)} of {self.out}")
            shutil.rmtree(self.ckpts.root, ignore_errors=True)
            for f in PER_RUN_FILES:
                (self.out / f).unlink(missing_ok=True)
        if path is not None:
            self._compare_config(path)
        return path

    def _previous_results(self) -> list[str]:
        found = [f for f in PER_RUN_FILES if (self.out / f).is_file()]
        if self.ckpts.root.is_dir() and any(self.ckpts.root.glob("step-*")):
            found.insert(0, f"checkpoints ({self.ckpts.root})")
        return found

    def _compare_config(self, path: Path) -> None:
        """Refuse to resume with values that change the optimization, unless run.resume_override
        (then they are logged, and ``train`` applies the new optimizer values)."""
        saved = path / "config.yaml"
        try:
            old = to_dict(load_config(str(saved), validate=False))
        except (ConfigError, OSError) as e:
            raise CheckpointError(f"{saved}: cannot read the checkpoint's config ({e})") from e
        self.changed, harmless = config_changes(old, to_dict(self.cfg), self.name)
        show = lambda d: "\n  ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in d.items())  # noqa: E731
        if self.changed and not self.cfg.run.resume_override:
            raise ConfigError(f"resuming {path} with a different config; these values change the optimization:\n  "
                              f"{show(self.changed)}\nRestore them, or set run.resume_override=true to train on with "
                              "the new values (recorded in the stage's resume.log)")
        if (self.changed or harmless) and self.rank == 0:
            print(f"[factrl] resuming {path} with changed values:\n  {show({**self.changed, **harmless})}")
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "resume.log", "a") as f:
                f.write(json.dumps({"time": time.time(), "checkpoint": str(path), "override": self.changed,
                                    "harmless": harmless}, default=str) + "\n")

    def train(self, model, params: list, loop, steps: int, generators: Optional[dict] = None,
              loss_fn=None) -> dict:
        """Set up training of ``params`` for ``steps`` steps (the schedule's length) and resume
        from ``resume_from``. Returns the resumed checkpoint's state ({} for a fresh run) for stage
        extras such as kl_coef. Under DeepSpeed the engine forwards ``loss_fn`` (see ``forward``)."""
        self.model, self.params, self.loop, self.steps = model, params, loop, steps
        self.generators = generators or {}
        if self.zero:
            from factrl.trainers import zero

            quantized = any(lin.is_quantized for _, lin in model.linears())
            self.engine = zero.initialize(self.cfg, model, params, loop, self.world, loss_fn,
                                          lr_lambda(loop.schedule, warmup_steps(loop, steps), steps, loop.decay_ratio),
                                          quantized)
            self.optimizer, self.scheduler = self.engine.optimizer, self.engine.lr_scheduler
        else:
            self.optimizer, self.scheduler = make_optimizer(params, loop, steps)
        self.guard = StepGuard(loop.max_nonfinite_skips)
        self.ckpts.keep = loop.keep_last
        self.start, state = self._resume()
        run = self.cfg.run
        self.log = Logger(self.out, steps, self.name, run.progress, self.rank, initial=self.start,
                          report_to=run.report_to, run_config=to_dict(self.cfg), project=run.wandb_project)
        self._catch_signals()
        return state

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def forward(self, loss_fn, batch: dict, norm: float):
        """``loss_fn(batch, norm)``: (loss, metrics); under DeepSpeed through the engine, whose hooks
        gather ZeRO-3's partitioned weights."""
        return self.engine(batch, norm) if self.zero else loss_fn(batch, norm)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate this micro-batch's gradients. DeepSpeed reduces them over processes as a mean
        and steps on the ``grad_accum``-th call (its own accumulation, with the same count); our
        loss is this process' share of the global mean already, hence x world and no 1/accum."""
        if not self.zero:
            loss.backward()
            return
        self.engine.backward(loss * self.world, scale_wrt_gas=False)
        self.engine.step()

    def optimizer_step(self, loss: torch.Tensor, schedule: bool = True, average: bool = True) -> Optional[float]:
        """Gradients combined over processes (averaged, or summed when ``average`` is False: the
        loss was normalized by a global count), then a guarded step (and a schedule step unless
        ``schedule`` is False: PPO steps it once per PPO step); the grad norm, or None if skipped.
        Under DeepSpeed the engine has stepped in ``backward`` (skipping a step whose gradients are
        not finite, as the guard does); this counts what it skipped."""
        if self.zero:
            return self.guard.engine_step(self.engine, loss)
        all_reduce_grads(self.params, average)
        return self.guard.step(loss, self.params, self.optimizer, self.scheduler if schedule else None,
                               self.loop.grad_clip)

    def end_step(self, step: int, metrics: dict, **extra) -> None:
        """Log step ``step`` (1-based) and checkpoint it every ``save_every`` steps, at the end,
        and when a signal asked to stop (then raise Interrupted)."""
        self.log.log(step, metrics)
        stop = self._signal is not None
        if self.world > 1:  # every process stops after the same step
            stop = all_sum(float(stop)) > 0
        saved = None
        if (self.rank == 0 or self.zero) and (step % self.loop.save_every == 0 or step == self.steps or stop):
            saved = self.save(step, **extra)  # DeepSpeed: every process writes its partition
        if stop:
            name = self._signal or "a signal"
            self._release_signals()
            self.log.close()
            raise Interrupted(f"{self.name}: stopped by {name} after step {step} of {self.steps}; checkpoint "
                              f"{saved or self.ckpts.root}; continue with run.resume=auto", name)

    def save(self, step: int, **extra) -> Path:
        """Everything a resumed run needs: trainable weights, optimizer, schedule, step (= data
        position), guard counters, every RNG state, and stage extras."""
        g = self.guard
        if self.zero:  # weights, optimizer and schedule by the engine; the rest as its client state
            client = {"step": step, "skipped": g.skipped, "consecutive": g.consecutive,
                      "rng": rng_state(self.generators), **extra}
            return self.ckpts.save_engine(step, self.engine, client, self.cfg, self.rank)
        return self.ckpts.save(step, {"model": trainable_state(self.model), "optimizer": self.optimizer.state_dict(),
                                      "scheduler": self.scheduler.state_dict(), "step": step, "skipped": g.skipped,
                                      "consecutive": g.consecutive, "rng": rng_state(self.generators), **extra},
                               self.cfg)

    def _resume(self) -> tuple[int, dict]:
        """(first step, saved state or {}). Rows of the per-run files (metrics, samples) of steps the
        resumed run will redo are dropped; a fresh run starts them fresh."""
        path = self.resume_from
        if path is None:
            if self.rank == 0:
                for f in PER_RUN_FILES:
                    (self.out / f).unlink(missing_ok=True)
            return 0, {}
        st = Checkpoints.load_engine(path, self.engine) if self.zero else Checkpoints.load(path)
        if st["step"] > self.steps:
            raise CheckpointError(f"{path} is at step {st['step']}, past this run's {self.steps} steps: resuming "
                                  "would train nothing and write the old weights as this run's output. Set the "
                                  "stage's steps to at least that, or start a fresh run (run.overwrite=true)")
        if not self.zero:  # the engine has loaded its own
            load_trainable_state(self.model, st["model"])
            self.optimizer.load_state_dict(st["optimizer"])
            self.scheduler.load_state_dict(st["scheduler"])
        if self.changed:  # run.resume_override: the new optimizer values apply from here
            self._apply_optimizer_config()
        self.guard.skipped, self.guard.consecutive = st["skipped"], st["consecutive"]
        set_rng_state(st["rng"], self.generators)
        if self.rank == 0:
            for f in PER_RUN_FILES:
                rows = [r for r in read_metrics(self.out / f) if r.get("step", 0) <= st["step"]]
                if rows or (self.out / f).exists():
                    write_atomic(self.out / f, "".join(json.dumps(r) + "\n" for r in rows))
            print(f"[factrl] resumed from {path} at step {st['step']}")
        return st["step"], st

    def _apply_optimizer_config(self) -> None:
        """lr, betas and weight decay of this config (the loaded optimizer state holds the old
        ones); the schedule's shape and length are this config's already (LambdaLR saves no lambdas)."""
        sch, loop = self.scheduler, self.loop
        groups = sch.optimizer.param_groups  # the torch optimizer (under DeepSpeed, the one ZeRO wraps)
        sch.base_lrs = [loop.lr for _ in groups]
        for g, lam in zip(groups, sch.lr_lambdas):
            g["lr"] = loop.lr * lam(sch.last_epoch)
            g["betas"], g["weight_decay"] = tuple(loop.betas), loop.weight_decay
        sch._last_lr = [g["lr"] for g in groups]

    def _catch_signals(self) -> None:
        """SIGINT/SIGTERM set a flag that ``end_step`` acts on (the step in flight completes); a
        second signal abandons at once (KeyboardInterrupt)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            if self._signal is not None or not self._handlers:
                raise KeyboardInterrupt
            self._signal = signal.Signals(signum).name
            print(f"\n[factrl] {self.name}: {self._signal}: stopping after this step with a checkpoint "
                  "(again to abandon the step)", file=sys.stderr)

        handler.factrl_previous = {}  # what it replaced: a stage that died of an exception leaves its
        for s in (signal.SIGINT, signal.SIGTERM):  # handler behind; the next one restores what was first
            prev = signal.signal(s, handler)
            handler.factrl_previous[s] = getattr(prev, "factrl_previous", {}).get(s, prev)
        self._handlers = dict(handler.factrl_previous)

    def _release_signals(self) -> None:
        for s, h in self._handlers.items():
            signal.signal(s, h)
        self._handlers = {}

    def whole_weights(self):
        """A context in which the model's weights are whole on every process (ZeRO-3 gathers
        them), for writing the stage's output; a no-op otherwise."""
        import contextlib

        if self.engine is None:
            return contextlib.nullcontext()
        from factrl.trainers import zero

        return zero.full_state(self.engine)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def finish(self, plot_keys) -> None:
        self._release_signals()
        self.log.close()
        if self.rank == 0:
            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png", list(plot_keys))
