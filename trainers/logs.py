"""Logging: metrics to ``metrics.jsonl`` + tensorboard, a progress bar, phase timers, curve plots."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

REPORT_TO = ("tensorboard", "wandb")


def report_targets(report_to: str) -> set[str]:
    """``run.report_to`` ("tensorboard", "wandb", "tensorboard,wandb", "none") as a set."""
    names = {s.strip() for s in report_to.split(",") if s.strip()} - {"none"}
    unknown = sorted(names - set(REPORT_TO))
    if unknown:
        raise ValueError(f"run.report_to: unknown backend(s) {unknown} (known: tensorboard, wandb, none)")
    return names


class Logger:
    """Metrics to ``metrics.jsonl`` and the ``report_to`` backends (tensorboard in ``tb/``, wandb
    offline in ``wandb/``), a tqdm bar with the live loss, phase timers. ``run_config``: the
    resolved config as a dict, recorded by wandb."""

    def __init__(self, out: Path, total: int, desc: str, progress: bool = True, rank: int = 0, initial: int = 0,
                 report_to: str = "tensorboard", run_config: Optional[dict] = None, project: str = "factrl"):
        self.out, self.rank = out, rank
        self.path = out / "metrics.jsonl"
        self.phase: dict[str, float] = {}
        self.tb = None
        self.wandb = None
        self.bar = None
        targets = report_targets(report_to)
        if rank != 0:
            return
        out.mkdir(parents=True, exist_ok=True)
        if "tensorboard" in targets:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except Exception:  # tensorboard is optional at run time
                self.tb = None
        if "wandb" in targets:
            try:
                import wandb
            except ImportError:
                raise ImportError("run.report_to includes wandb, but wandb is not installed: "
                                  "pip install 'factrl[wandb]' (or run.report_to=tensorboard)") from None
            os.environ.setdefault("WANDB_MODE", "offline")  # no network here: sync later with `wandb sync`
            self.wandb = wandb.init(project=project, name=f"{out.parent.name}/{desc}", dir=str(out),
                                    config=run_config or {}, mode=os.environ["WANDB_MODE"])
        if progress:
            from tqdm.auto import tqdm

            # Into a file or pipe (make train > log), a bar every 30 s instead of one per step.
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True,
                            mininterval=0.1 if sys.stderr.isatty() else 30)

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
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # ENOSPC from write() carries no file name
            raise OSError(e.errno, f"{e.strerror}: writing {self.path}", str(self.path)) from e
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.bar is not None:
            shown = {k: f"{row[k]:.4g}" for k in ("loss", "reward", "kl", "acc") if isinstance(row.get(k), float)}
            self.bar.set_postfix(shown, refresh=False)  # refresh only at mininterval
            self.bar.update(advance)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.rank == 0 and self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _scalar(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``.jsonl`` log. A torn last line (the writer was killed mid-write) is dropped
    with a warning; a bad line before it is an error naming the file and line."""
    if not path.is_file():
        return []
    lines = [(i, line) for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    rows = []
    for n, (i, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected an object, got {type(row).__name__}")
        except ValueError as e:
            if n == len(lines) - 1:
                print(f"[factrl] {path}: line {i} is torn (a killed writer?), dropped: {line[:60]!r}", file=sys.stderr)
                break
            raise ValueError(f"{path}: line {i} is not a JSON object ({e})") from None
        rows.append(row)
    return rows


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
