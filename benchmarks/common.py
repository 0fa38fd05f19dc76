"""Shared benchmark plumbing: timing, peak memory, device facts, result files.

Every ``bench_<op>.py`` prints a table and, as its last stdout line, one JSON object; it
appends its rows to ``benchmarks/results/<op>-<device>.jsonl`` with device name, git sha and date.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{os.cpu_count()}cores"


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def time_ms(fn: Callable[[], object], warmup: int = 3, rep: int = 10) -> float:
    """Median milliseconds per call. GPU: triton.testing.do_bench (flushes L2, syncs)."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak memory one call adds on top of what is already allocated.

    CUDA: ``max_memory_allocated`` after a reset. CPU: the process' peak RSS (VmHWM), reset
    through ``/proc/self/clear_refs`` before the call, minus the RSS before it.
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return -1
    base = _rss_bytes("VmRSS")
    fn()
    return max(0, _rss_bytes("VmHWM") - base)


def write_results(op: str, rows: list[dict], extra: dict | None = None, results_dir: Path | None = None) -> dict:
    """Append rows to results/<op>-<device>.jsonl (or ``results_dir``); return the summary object
    (print it last)."""
    results_dir = Path(results_dir) if results_dir is not None else RESULTS
    results_dir.mkdir(parents=True, exist_ok=True)
    meta = {"op": op, "device": device_name(), "git_sha": git_sha(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__}
    dev = meta["device"].replace(" ", "_").replace("/", "_")
    path = results_dir / f"{op}-{dev}.jsonl"
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps({**meta, **r}) + "\n")
    shown = path.relative_to(RESULTS.parent.parent) if path.is_relative_to(RESULTS.parent.parent) else path
    return {**meta, **(extra or {}), "rows": len(rows), "file": str(shown)}


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols} if rows else {}
    print("  ".join(c.rjust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in cols))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
