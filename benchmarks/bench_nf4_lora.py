"""Benchmark the fused NF4 + LoRA linear (kernels/nf4_lora.py).

Providers (same NF4 weight, rank-64 adapters, bf16 activations):
  bnb_peft        bitsandbytes ``Linear4bit`` + peft LoRA: what QLoRA users run today
  dequant_matmul  dequantize W (bnb's kernel on GPU) then cuBLAS, plus LoRA; W re-dequantized in
                  the backward (Unsloth's approach)
  bf16_matmul     plain bf16 ``x @ W^T`` with the same shape, no LoRA: the ceiling
  ours            ``nf4_lora`` (Triton on GPU; on CPU its torch path, i.e. the reference math)
Modes: forward (no grad), backward (grad of x and the adapters, from a retained graph), full.
Shapes: LLaMA-7B/13B layers (in, out), tokens 1 .. 16384. Reports median ms, TFLOP/s, GB/s,
peak memory; appends to results/nf4_lora-<device>.jsonl, plots results/nf4_lora-<device>.png;
the last stdout line is one JSON object. Without a GPU it says so and runs a small CPU smoke.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from factrl.kernels.nf4 import NF4Weight, dequantize_nf4  # noqa: E402
from factrl.kernels.nf4_lora import nf4_lora  # noqa: E402

GPU_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (5120, 5120), (5120, 13824)]  # (in, out)
GPU_TOKENS = [1, 8, 2048, 8192, 16384]
CPU_SHAPES = [(512, 512), (512, 1376)]  # scaled-down LLaMA aspect ratios
CPU_TOKENS = [1, 64]
PROVIDERS = ["bnb_peft", "dequant_matmul", "bf16_matmul", "ours"]
MODES = ["forward", "backward", "full"]


class _DequantLinear(torch.autograd.Function):
    """Unsloth-style base linear: dequantize, cuBLAS, free W; re-dequantize for dX."""

    @staticmethod
    def forward(ctx, x, packed, state, nf):
        ctx.packed, ctx.state, ctx.nf = packed, state, nf
        return x @ _dequant(packed, state, nf, x.dtype).t()

    @staticmethod
    def backward(ctx, dy):
        return dy @ _dequant(ctx.packed, ctx.state, ctx.nf, dy.dtype), None, None, None


def _dequant(packed, state, nf, dtype):
    if packed.is_cuda:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(packed, state, quant_type="nf4").to(dtype)
    return dequantize_nf4(nf, dtype)


def _build(k, n, r, dtype, adt, device):
    """Every provider as fn(x) -> y, sharing one NF4 weight and one adapter pair."""
    import bitsandbytes as bnb
    from peft import LoraConfig, inject_adapter_in_model

    w = torch.randn(n, k, dtype=dtype, device=device) * 0.02
    lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    lin.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    lin = lin.to(device)
    packed, state = lin.weight.data, lin.weight.quant_state
    nf = NF4Weight.from_bnb(packed, state)
    wq = dequantize_nf4(nf.to("cpu"), dtype).to(device)  # bf16 copy of the same quantized weight
    mod = torch.nn.Sequential()
    mod.add_module("proj", lin)
    alpha = 16
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0)
    mod = inject_adapter_in_model(cfg, mod)
    a = torch.randn(r, k, device=device, dtype=adt) / k ** 0.5
    b = torch.randn(n, r, device=device, dtype=adt) / r ** 0.5
    with torch.no_grad():
        mod.proj.lora_A["default"].weight.copy_(a)
        mod.proj.lora_B["default"].weight.copy_(b)
    mod.proj.lora_A["default"].to(adt)
    mod.proj.lora_B["default"].to(adt)
    peft_params = [mod.proj.lora_A["default"].weight, mod.proj.lora_B["default"].weight]
    a.requires_grad_()
    b.requires_grad_()
    s = alpha / r

    def dequant_matmul(x):
        return _DequantLinear.apply(x, packed, state, nf) + ((x.to(adt) @ a.t()) @ b.t() * s).to(x.dtype)

    providers = {
        "bnb_peft": (mod, peft_params),
        "dequant_matmul": (dequant_matmul, [a, b]),
        "bf16_matmul": (lambda x: x @ wq.t(), []),
        "ours": (lambda x: nf4_lora(x, nf, a, b, s), [a, b]),
    }
    return providers, nf.nbytes(), wq.numel() * wq.element_size()


def _flops_bytes(provider, mode, m, k, n, r, nf4_bytes, w16_bytes, esize=2):
    """Useful FLOPs and minimum bytes moved (W once per matmul pass, activations once)."""
    lora = provider != "bf16_matmul"
    wb = w16_bytes if provider == "bf16_matmul" else nf4_bytes
    f_fwd = 2 * m * n * k + (2 * m * k * r + 2 * m * n * r if lora else 0)
    f_bwd = 2 * m * n * k + (2 * (2 * m * n * r) + 2 * (2 * m * k * r) if lora else 0)
    b_fwd = wb + esize * (m * k + m * n)
    b_bwd = wb + esize * (m * n + m * k + (m * k if lora else 0))
    return {"forward": (f_fwd, b_fwd), "backward": (f_bwd, b_bwd),
            "full": (f_fwd + f_bwd, b_fwd + b_bwd)}[mode]


def _callable(fn, params, mode, x, dy):
    leaves = [x] + params
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(x)
        return run
    if mode == "full":
        return lambda: torch.autograd.grad(fn(x), leaves, dy)
    y = fn(x)  # backward only: reuse one graph
    return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)


def _hbm_ceiling_gbs(device) -> float | None:
    """Measured copy bandwidth (read + write) of 1 GiB: the memory ceiling GB/s are judged by."""
    if device != "cuda":
        return None
    src = torch.empty(1 << 29, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = common.time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / ms / 1e6


def _plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shapes = sorted({(r["in"], r["out"]) for r in rows})
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(len(modes), len(shapes), figsize=(3.6 * len(shapes), 3 * len(modes)),
                             squeeze=False)
    for i, mode in enumerate(modes):
        for j, (k, n) in enumerate(shapes):
            ax = axes[i][j]
            for p in PROVIDERS:
                pts = sorted((r["tokens"], r["ms"]) for r in rows
                             if r["provider"] == p and r["mode"] == mode and (r["in"], r["out"]) == (k, n))
                if pts:
                    ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label=p)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{mode} {k}x{n}", fontsize=9)
            ax.set_xlabel("tokens")
            ax.set_ylabel("ms")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"nf4_lora on {common.device_name()} ({common.git_sha()})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="small fast run")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--adapter-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16
    adt = getattr(torch, args.adapter_dtype)
    if cuda:
        shapes, tokens = (GPU_SHAPES[:1], [1, 2048]) if args.smoke else (GPU_SHAPES, GPU_TOKENS)
        warmup, rep = 3, 10
    else:
        print("No CUDA GPU: running only a small CPU smoke of the torch paths (the Triton kernels and the "
              "GPU goals cannot be measured here).")
        shapes, tokens = (CPU_SHAPES[:1], CPU_TOKENS[:1]) if args.smoke else (CPU_SHAPES, CPU_TOKENS)
        warmup, rep = 1, 3
        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    providers = [p for p in args.providers.split(",") if p]
    modes = [m for m in args.modes.split(",") if m]
    r = args.rank
    rows = []
    for k, n in shapes:
        built, nf4_bytes, w16_bytes = _build(k, n, r, dtype, adt, device)
        for m in tokens:
            x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn(m, n, device=device, dtype=dtype)
            for p in providers:
                fn, params = built[p]
                for mode in modes:
                    try:
                        call = _callable(fn, params, mode, x, dy)
                        ms = common.time_ms(call, warmup=warmup, rep=rep)
                        peak = common.peak_memory_bytes(call)
                        err = None
                    except Exception as e:  # e.g. OOM at 16k tokens: record it, keep going
                        ms, peak, err = float("nan"), -1, f"{type(e).__name__}: {e}"[:200]
                    flops, nbytes = _flops_bytes(p, mode, m, k, n, r, nf4_bytes, w16_bytes)
                    rows.append({"provider": p, "mode": mode, "in": k, "out": n, "tokens": m, "rank": r,
                                 "dtype": str(dtype).removeprefix("torch."),
                                 "adapter_dtype": args.adapter_dtype,
                                 "ms": ms, "tflops": flops / ms / 1e9, "gbs": nbytes / ms / 1e6,
                                 "peak_mb": peak / 2**20, "error": err})
                    if cuda:
                        torch.cuda.empty_cache()
    common.print_table(rows, ["provider", "mode", "in", "out", "tokens", "ms", "tflops", "gbs", "peak_mb"])
    extra = {"backend": "triton" if cuda else "torch (CPU smoke; no GPU)", "smoke": args.smoke, "rank": r,
             "hbm_ceiling_gbs": _hbm_ceiling_gbs(device), "goals": _goals(rows)}
    dev = common.device_name().replace(" ", "_").replace("/", "_")
    png = _plot(rows, common.RESULTS / f"nf4_lora-{dev}.png")
    extra["plot"] = str(png.relative_to(common.RESULTS.parent.parent)) if png else None
    summary = common.write_results("nf4_lora", rows, extra)
    print(json.dumps(summary))
    return summary


def _goals(rows):
    """Ratios behind the issue's goals: fwd+bwd at 8192 tokens vs bnb+peft and vs bf16, and
    decode (1 token forward) vs bnb. Meaningful only on a GPU with the Triton path."""
    def t(p, mode, m, k, n):
        v = [r["ms"] for r in rows
             if (r["provider"], r["mode"], r["tokens"], r["in"], r["out"]) == (p, mode, m, k, n)]
        return v[0] if v and math.isfinite(v[0]) else None

    out = {}
    for k, n in sorted({(r["in"], r["out"]) for r in rows}):
        key = f"{k}x{n}"
        toks = {r["tokens"] for r in rows}
        m_big = 8192 if 8192 in toks else max(toks)
        ours, bnb, bf = (t(p, "full", m_big, k, n) for p in ("ours", "bnb_peft", "bf16_matmul"))
        d_ours, d_bnb = t("ours", "forward", 1, k, n), t("bnb_peft", "forward", 1, k, n)
        out[key] = {"tokens": m_big,
                    "full_speedup_vs_bnb_peft": bnb / ours if ours and bnb else None,
                    "full_time_vs_bf16": ours / bf if ours and bf else None,
                    "decode_speedup_vs_bnb_peft": d_bnb / d_ours if d_ours and d_bnb else None}
    return out


if __name__ == "__main__":
    main()
