"""Run every ``benchmarks/bench_*.py``: ``main(["--smoke"])`` without CUDA, ``main([])`` with it.

A failing benchmark is reported and the rest still run. The last stdout line is one JSON object:
``{"device", "argv", "ran": [...], "failed": {name: error}, "summaries": {name: summary}}``.

    python benchmarks/run_all.py [--smoke] [--only gae logprobs ...] [--list]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def discover() -> list[Path]:
    return sorted(HERE.glob("bench_*.py"))


def load(path: Path):
    # Each bench imports ``common`` from this folder.
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location(f"factrl_bench_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="pass --smoke even when CUDA is available")
    ap.add_argument("--only", nargs="+", default=None, help="names without the bench_ prefix, e.g. gae")
    ap.add_argument("--list", action="store_true", help="list the benchmarks found and exit")
    args = ap.parse_args(argv)

    paths = discover()
    if args.only:
        wanted = {n.removeprefix("bench_").removesuffix(".py") for n in args.only}
        unknown = wanted - {p.stem.removeprefix("bench_") for p in paths}
        if unknown:
            ap.error(f"no benchmark named {sorted(unknown)}; found {[p.stem for p in paths]}")
        paths = [p for p in paths if p.stem.removeprefix("bench_") in wanted]
    if args.list:
        print(json.dumps({"benchmarks": [p.stem for p in paths]}))
        return {"benchmarks": [p.stem for p in paths]}

    has_cuda = torch.cuda.is_available()
    bench_argv = ["--smoke"] if (args.smoke or not has_cuda) else []
    ran, failed, summaries, seconds = [], {}, {}, {}
    for path in paths:
        name = path.stem
        print(f"\n===== {name} {' '.join(bench_argv)} =====", flush=True)
        t0 = time.perf_counter()
        try:
            summary = load(path).main(list(bench_argv))
            ran.append(name)
            summaries[name] = summary
        except BaseException as e:  # SystemExit from argparse too; Ctrl-C still stops everything
            if isinstance(e, KeyboardInterrupt):
                raise
            if isinstance(e, SystemExit) and e.code in (None, 0):
                ran.append(name)
                continue
            traceback.print_exc()
            failed[name] = f"{type(e).__name__}: {e}"
            print(f"!!!!! {name} FAILED: {failed[name]}", flush=True)
        finally:
            seconds[name] = round(time.perf_counter() - t0, 1)
            if has_cuda:
                torch.cuda.empty_cache()
    result = {"device": "cuda" if has_cuda else "cpu", "argv": bench_argv, "ran": ran, "failed": failed,
              "seconds": seconds, "summaries": summaries}
    print(json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    res = main()
    sys.exit(1 if res.get("failed") else 0)
