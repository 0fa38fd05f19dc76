"""Benchmark: lm_head -> token log-probs, naive vs torch.compile vs Liger (optional) vs ours.

Providers
  naive    logits = hidden @ W.T (input dtype) -> .float() / T -> log_softmax -> gather: the full
           [N, V] logits, fp32 copies and their gradients live in memory
  compile  torch.compile of the same naive code
  liger    Liger-Kernel's fused linear cross-entropy, reduction="none" (= -log-prob per token);
           skipped when liger_kernel is not importable
  chunked  our torch backend (chunked autograd.Function; what CPU runs use)
  ours     token_logprobs(backend=None): Triton on CUDA (on CPU that is the chunked torch path,
           so the CPU smoke reports only naive vs chunked)
Modes: fwd (forward, graph built), bwd (backward only), full (forward + backward); median time and
peak memory added on top of the inputs. GPU default grid: H in {4096, 5120}, V in {32000, 128256},
N in {2k..32k}, bf16. Without CUDA: a CPU smoke (N=2048, H=256, V=32000 fp32, so the naive fp32
logits alone are 256 MB) of naive vs chunked, with peak memory (process RSS high-water mark).
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from factrl.kernels.logprobs import token_logprobs  # noqa: E402

MODES = ("fwd", "bwd", "full")


def naive(hidden, weight, targets, temperature=1.0, ignore_index=-100):
    logits = (hidden @ weight.T).float() / temperature  # (N, V): the full logits
    logp = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    lp = logp.gather(-1, torch.where(valid, targets, 0)[:, None]).squeeze(-1)
    return torch.where(valid, lp, 0.0)


def _liger():
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception:  # not installed (the CPU machine), or a broken install
        return None
    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")

    def fn(hidden, weight, targets, temperature=1.0, ignore_index=-100):
        out = loss(weight, hidden / temperature, targets)
        out = out[0] if isinstance(out, tuple) else getattr(out, "loss", out)
        return -out

    return fn


def providers(names: list[str], on_gpu: bool) -> dict:
    out = {}
    for name in names:
        if name == "naive":
            out[name] = naive
        elif name == "compile":
            out[name] = torch.compile(naive, dynamic=False)
        elif name == "liger":
            fn = _liger()
            if fn is None:
                print("liger: liger_kernel not importable, skipped")
            else:
                out[name] = fn
        elif name == "chunked":
            out[name] = lambda h, w, t: token_logprobs(h, w, t, backend="torch")
        elif name == "ours":
            if not on_gpu:
                print("ours: no CUDA, the default backend is the chunked torch path (reported as 'chunked')")
                continue
            out[name] = lambda h, w, t: token_logprobs(h, w, t)
    return out


def _limit_malloc_caching():
    """CPU peak memory is read from RSS: make glibc return big frees to the OS at once (fixed mmap
    threshold), so one provider's freed arenas do not hide the next provider's allocations."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB (also disables the dynamic threshold)
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def measure(fn, N, H, V, dtype, device, mode, warmup, rep, what):
    """Median ms (what="time") or peak bytes added by one call (what="mem"), after one warm call."""
    g = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(N, H, device=device, generator=g) / H ** 0.5 * 3).to(dtype).requires_grad_()
    weight = torch.randn(V, H, device=device, generator=g).to(dtype)
    targets = torch.randint(0, V, (N,), device=device, generator=g)

    def fwd():
        return fn(hidden, weight, targets)

    def full():
        hidden.grad = None
        fwd().sum().backward()

    if mode == "fwd":
        call = fwd
    elif mode == "full":
        call = full
    else:  # backward only: one graph, replayed with retain_graph
        out = fwd().sum()

        def call():
            hidden.grad = None
            out.backward(retain_graph=True)

    call()  # compile / autotune outside the measurements
    if what == "mem":
        return common.peak_memory_bytes(call)
    return common.time_ms(call, warmup=warmup, rep=rep)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="small fast run")
    p.add_argument("--providers", default=None, help="comma list of naive,compile,liger,chunked,ours")
    p.add_argument("--modes", default=None, help="comma list of fwd,bwd,full (default all; CPU: fwd,full)")
    p.add_argument("--hidden", default=None, help="comma list of H")
    p.add_argument("--vocab", default=None, help="comma list of V")
    p.add_argument("--tokens", default=None, help="comma list of N")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.modes_given = args.modes is not None
    args.modes = args.modes or ",".join(MODES)

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    ints = lambda s: [int(x) for x in s.split(",")]
    if on_gpu:
        Hs, Vs = [4096, 5120], [32000, 128256]
        Ns = [2048, 4096, 8192, 16384, 32768]
        names = ["naive", "compile", "liger", "chunked", "ours"]
        dtype, warmup, rep = "bf16", 3, 10
        if args.smoke:
            Hs, Vs, Ns = [4096], [32000], [2048, 16384]
    else:
        print("no CUDA: CPU smoke of the torch paths (naive reference vs chunked torch backend); "
              "the GPU goals (peak <= 1/8 naive, time <= naive, <= Liger at N=16k) need a GPU run")
        Hs, Vs, Ns = [256], [32000], [2048]
        names = ["naive", "chunked"]  # torch.compile on 2 CPU cores: minutes of compile; opt in
        dtype, warmup, rep = "fp32", 0, 2
        if not args.modes_given:
            args.modes = "fwd,full"  # bwd = full - fwd here; keeps the smoke under a minute
    Hs = ints(args.hidden) if args.hidden else Hs
    Vs = ints(args.vocab) if args.vocab else Vs
    Ns = ints(args.tokens) if args.tokens else Ns
    names = args.providers.split(",") if args.providers else names
    dtype = args.dtype or dtype
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    modes = args.modes.split(",")

    provs = providers(names, on_gpu)
    rows = [dict(provider=name, mode=mode, N=N, H=H, V=V, dtype=dtype)
            for H in Hs for V in Vs for N in Ns for mode in modes for name in provs]
    # CPU: all timings first with the normal allocator, then all memory runs with glibc caching off
    for what in ("time", "mem"):
        if what == "mem" and not on_gpu:
            _limit_malloc_caching()
        for row in rows:
            if row.get("note"):
                continue
            try:
                r = measure(provs[row["provider"]], row["N"], row["H"], row["V"], tdtype, device, row["mode"],
                            warmup, rep, what)
            except torch.cuda.OutOfMemoryError:
                row.update(ms=None, peak_mb=None, note="OOM")
                continue
            finally:
                if on_gpu:
                    torch.cuda.empty_cache()
            if what == "time":
                flops = 2 * row["N"] * row["H"] * row["V"] * {"fwd": 1, "bwd": 1, "full": 2}[row["mode"]]
                row.update(ms=r, tflops=flops / r / 1e9)
            else:
                row.update(peak_mb=r / 2**20)
                print(json.dumps(row), file=sys.stderr, flush=True)

    common.print_table(rows, ["provider", "mode", "N", "H", "V", "dtype", "ms", "peak_mb", "tflops", "note"])
    extra = {"smoke": args.smoke or not on_gpu, "ratios": _ratios(rows)}
    plot = None if args.no_plot else _plot(rows)
    if plot:
        extra["plot"] = plot
    summary = common.write_results("logprobs", rows, extra)
    print(json.dumps(summary))
    return summary


def _ratios(rows):
    """naive / other per (shape, mode): peak-memory and time ratios (> 1 = the other one is better)."""
    out = []
    key = lambda r: (r["N"], r["H"], r["V"], r["mode"])
    naive_rows = {key(r): r for r in rows if r["provider"] == "naive" and r.get("ms")}
    for r in rows:
        b = naive_rows.get(key(r))
        if r["provider"] == "naive" or b is None or not r.get("ms"):
            continue
        out.append(dict(provider=r["provider"], N=r["N"], H=r["H"], V=r["V"], mode=r["mode"],
                        mem_naive_over=b["peak_mb"] / max(r["peak_mb"], 1e-9),
                        time_naive_over=b["ms"] / r["ms"]))
    return out


def _plot(rows):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if r.get("ms")]
    shapes = sorted({(r["H"], r["V"]) for r in ok})
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    fig, axes = plt.subplots(2, len(modes), figsize=(5 * len(modes), 8), squeeze=False)
    for j, mode in enumerate(modes):
        for prov in sorted({r["provider"] for r in ok}):
            for H, V in shapes:
                rs = [r for r in ok if (r["mode"], r["provider"], r["H"], r["V"]) == (mode, prov, H, V)]
                rs.sort(key=lambda r: r["N"])
                if not rs:
                    continue
                lab = f"{prov} H={H} V={V}"
                xs = [r["N"] for r in rs]
                style = "o-" if len(xs) > 1 else "o"
                axes[0][j].plot(xs, [r["ms"] for r in rs], style, label=lab)
                axes[1][j].plot(xs, [r["peak_mb"] for r in rs], style, label=lab)
        axes[0][j].set_title(f"{mode}: median time")
        axes[0][j].set_ylabel("ms")
        axes[1][j].set_title(f"{mode}: peak memory")
        axes[1][j].set_ylabel("MiB")
        for i in range(2):
            axes[i][j].set_xlabel("tokens N")
            axes[i][j].set_xscale("log", base=2)
            axes[i][j].legend(fontsize=7)
    fig.suptitle(f"token log-probs on {common.device_name()} ({common.git_sha()})")
    fig.tight_layout()
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    dev = common.device_name().replace(" ", "_").replace("/", "_")
    path = common.RESULTS / f"logprobs-{dev}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path.relative_to(common.RESULTS.parent.parent))


if __name__ == "__main__":
    main()
