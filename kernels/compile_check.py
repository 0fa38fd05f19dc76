"""Ahead-of-time compile check: every Triton kernel variant the launchers produce, compiled for
sm_90 and sm_80 on a machine without a GPU (Triton's own ptxas), with shared memory, registers
and spills read from the result.

    python -m factrl.kernels.compile_check [--full] [--arch 90 80] [--jobs 2] [--json OUT]

Quick (the test suite): each kernel x dtype variant x launcher role once, with one
representative config (the smallest tiles), on both architectures: 122 compiles. The other
autotune configs' shared memory comes from the measured table (below); a config the table lacks
is compiled too, so one added to a list without re-measuring is checked all the same. ``--full``
(``make compile-check``): every flag combination the launchers set at the representative config,
plus every autotune config of the quick variants: 644 compiles. A variant is what the launchers
can pass: the activation dtype (fp32 | fp16 | bf16), the adapter dtype (the activation's, or fp32
master weights), and the constexpr flags.

Every launch argument is given as a representative value from a LLaVA-7B launch, so the
compile sees the specializations the GPU run will see (an int equal to 1 becomes a constant,
one divisible by 16 and every pointer get Triton's divisibility-16 hint).

Fails (exit 1, ``problems`` in the JSON) on: a compile error; compiled shared memory over the
architecture's per-block limit for a config the launch-time pruning keeps (``kernels/_limits.py``:
it prunes by the measured table ``kernels/_shared_table.py``, which ``--write-table`` rewrites); a
compile above its table entry (a stale table); and a bf16 autotune config whose table entry
exceeds sm_90's limit (a config no target architecture can use on the production path).

Must run with ``TRITON_INTERPRET`` unset (under the interpreter the kernels are not compilable
objects and the autotune lists are reduced to one config); the test runs it in a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise RuntimeError("factrl.kernels.compile_check needs TRITON_INTERPRET unset (it compiles for real GPUs)")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from factrl.kernels import _limits  # noqa: E402
from factrl.kernels import gae as G  # noqa: E402
from factrl.kernels import logprobs as LP  # noqa: E402
from factrl.kernels import nf4_lora as NL  # noqa: E402

ARCHS = (90, 80)
TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
ACT = (torch.float32, torch.float16, torch.bfloat16)
SHORT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


@dataclass
class Variant:
    """One kernel specialization: runtime args (a pointer type string, 'fp32' for a float, or a
    representative int), constexprs, and the configs to compile it with."""

    kernel: str
    tag: str
    args: dict
    constexprs: dict
    configs: list  # [(meta constexprs dict, num_warps, num_stages)]
    est_key: tuple | None = None  # (role, a_bytes, b_bytes) for kernels/_limits.py (autotuned kernels)
    options: dict = field(default_factory=dict)


def _unwrap(fn):
    return fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn


def _cfgs(configs):
    return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in configs]


def _lora_dt(act, adapter):
    """What ``nf4_lora._lora_cfg`` picks, outside the interpreter."""
    if adapter == act:
        return TL[act], "ieee"
    return tl.float32, ("ieee" if act == torch.float32 else "tf32")


def _adapter_dtypes(act):
    return [act] if act == torch.float32 else [act, torch.float32]


# ------------------------------------------------------------------------------------------
# Variants: what the launchers in kernels/*.py pass (LLaVA-7B shapes: K = N = 4096, r = 64)
# ------------------------------------------------------------------------------------------
def nf4_variants(full: bool) -> list[Variant]:
    out = []
    M, N, K, R, G_ = 512, 4096, 4096, 64, 3
    for act in ACT:
        dot_dt = TL[act]
        for adt in _adapter_dtypes(act):
            ldt, lprec = _lora_dt(act, adt)
            tag = f"{SHORT[act]}-lora{SHORT[adt]}"
            flag_sets = list(itertools.product([True, False], repeat=3)) if full else [(True, True, True)]
            for dq, has_lora, grouped in flag_sets:
                if grouped and not has_lora:
                    continue
                ftag = f"{tag}-dq{int(dq)}-lora{int(has_lora)}-grp{int(grouped)}"
                w = {"qw_ptr": "*u8", "absmax_ptr": "*u8" if dq else "*fp32", "absmax2_ptr": "*fp32",
                     "code2_ptr": "*fp32", "offset_ptr": "*fp32", "code_ptr": "*fp32"}
                lora = {"u_ptr": "*fp32", "stride_um": R, "lw_ptr": PTR[adt], "ids_ptr": "*i32"}
                cx = dict(BS=64, DQ=dq, HAS_LORA=has_lora, GROUPED=grouped, DOT_DT=dot_dt, PREC="ieee",
                          LORA_DT=ldt, LORA_PREC=lprec, R_PAD=R)
                for fwd in (True, False):
                    bias_opts = ([True, False] if full else [True]) if fwd else [False]
                    for has_bias in bias_opts:
                        # fwd: B[g][n, r] = Lw[g][j=n, r]; dX: A[g][r, k] = Lw[g][j=k, r]
                        strides = dict(stride_lg=N * R, stride_lj=R, stride_lr=1) if fwd else \
                            dict(stride_lg=R * K, stride_lj=1, stride_lr=K)
                        args = {"a_ptr": PTR[act], "stride_am": K if fwd else N, "stride_al": 1, **w,
                                "out_ptr": PTR[act], "stride_om": N if fwd else K, "stride_oj": 1, **lora,
                                **strides, "bias_ptr": PTR[act], "M": M, "N": N, "K": K, "R": R, "M_BUCKET": M}
                        name = f"mm-{'fwd' if fwd else 'dx'}-{ftag}-bias{int(has_bias)}"
                        out.append(Variant("_nf4_lora_mm_kernel", name, args,
                                           {**cx, "FWD": fwd, "HAS_BIAS": has_bias}, _cfgs(NL.GPU_MM_CONFIGS),
                                           est_key=("fwd" if fwd else "dx", act.itemsize, adt.itemsize),
                                           options=dict(enable_fp_fusion=False)))
                # decode: M <= 16, split-K over W
                for split in ([1, 4] if full else [4]):
                    args = {"x_ptr": PTR[act], "stride_xm": K, "stride_xk": 1, **w,
                            "out_ptr": PTR[act] if split == 1 else "*fp32", "stride_os": 16 * N, "stride_om": N,
                            "stride_on": 1, **lora, "stride_lg": N * R, "stride_lj": R, "stride_lr": 1,
                            "bias_ptr": PTR[act], "M": 5, "N": N, "K": K, "R": R}
                    out.append(Variant("_nf4_lora_gemv_kernel", f"gemv-{ftag}-split{split}", args,
                                       {**cx, "HAS_BIAS": True, "SPLIT_K": split, "BLOCK_M": NL.DECODE_MAX_M},
                                       _cfgs(NL.GPU_GEMV_CONFIGS), est_key=("-", act.itemsize, adt.itemsize),
                                       options=dict(enable_fp_fusion=False)))
            # rank-r projections: Us = s x A^T (fwd, P = A seen (K, r)), Vs = s dY B (bwd, P = B (N, r))
            for role, pst in (("us", (R * K, 1, K)), ("vs", (N * R, R, 1))):
                for grouped in ([True, False] if full else [True]):
                    for split in ([1, 4] if full else [1]):
                        args = {"in_ptr": PTR[act], "stride_im": K, "stride_il": 1, "p_ptr": PTR[adt],
                                "stride_pg": pst[0], "stride_pl": pst[1], "stride_pr": pst[2], "scale_ptr": "*fp32",
                                "ids_ptr": "*i32" if grouped else "*fp32", "out_ptr": "*fp32", "M": M, "L": K,
                                "R": R, "M_BUCKET": M}
                        out.append(Variant("_nf4_lora_proj_kernel", f"proj-{role}-{tag}-grp{int(grouped)}-split{split}",
                                           args, dict(GROUPED=grouped, SPLIT_L=split, DT=ldt, PREC=lprec, R_PAD=R),
                                           _cfgs(NL.GPU_PROJ_CONFIGS), est_key=(role, act.itemsize, adt.itemsize),
                                           options=dict(enable_fp_fusion=False)))
            # adapter grads: dA = Vs^T X (P fp32 rank side), dB = dY^T Us (Q fp32 rank side)
            for role in ("dA", "dB"):
                for grouped in ([True, False] if full else [True]):
                    p_rank = role == "dA"
                    args = {"p_ptr": "*fp32" if p_rank else PTR[act], "stride_pm": R if p_rank else N, "stride_pi": 1,
                            "q_ptr": PTR[act] if p_rank else "*fp32", "stride_qm": K if p_rank else R,
                            "stride_qj": 1, "ids_ptr": "*i32", "lo_ptr": "*i32", "hi_ptr": "*i32", "out_ptr": "*fp32",
                            "M": M, "I": R if p_rank else N, "J": K if p_rank else R, "G": G_}
                    cx = dict(GROUPED=grouped, SPLIT_M=2, DT=ldt, PREC=lprec, BLOCK_I=R if p_rank else 128,
                              BLOCK_J=128 if p_rank else R, BLOCK_M=64)
                    out.append(Variant("_nf4_lora_adapter_grad_kernel", f"grad-{role}-{tag}-grp{int(grouped)}", args,
                                       cx, [({}, 4, 3)], options=dict(enable_fp_fusion=False)))
        for dq in (True, False):
            w = {"qw_ptr": "*u8", "absmax_ptr": "*u8" if dq else "*fp32", "absmax2_ptr": "*fp32",
                 "code2_ptr": "*fp32", "offset_ptr": "*fp32", "code_ptr": "*fp32"}
            out.append(Variant("_nf4_dequant_kernel", f"dequant-{SHORT[act]}-dq{int(dq)}",
                               {**w, "out_ptr": PTR[act], "N": N, "K": K},
                               dict(BS=64, DQ=dq, BLOCK_N=32, BLOCK_K=128), [({}, 4, 3)],
                               options=dict(enable_fp_fusion=False)))
    return out


def logprobs_variants(full: bool) -> list[Variant]:
    out = []
    N, H, V = 2048, 4096, 32064
    pairs = [(d, d) for d in ACT] + [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)]
    for hd, wd in pairs:
        upcast = hd != wd
        prec = "ieee" if (upcast or hd == torch.float32) else "tf32"
        cx = dict(UPCAST=upcast, PRECISION=prec)
        tag = f"h{SHORT[hd]}-w{SHORT[wd]}"
        args = {"h_ptr": PTR[hd], "w_ptr": PTR[wd], "t_ptr": "*i64", "m_ptr": "*fp32", "s_ptr": "*fp32",
                "a_ptr": "*fp32", "zt_ptr": "*fp32", "N": N, "V": V, "H": H, "stride_hn": H, "stride_wv": H,
                "v_per_split": 4096, "inv_temp": "fp32"}
        out.append(Variant("_logprobs_fwd_kernel", f"lp-fwd-{tag}", args, cx, _cfgs(LP._logprobs_fwd_kernel.configs),
                           est_key=("-", hd.itemsize, wd.itemsize)))
        for gent in ([True, False] if full else [True]):
            args = {"h_ptr": PTR[hd], "w_ptr": PTR[wd], "t_ptr": "*i64", "lse_ptr": "*fp32", "ez_ptr": "*fp32",
                    "glp_ptr": "*fp32", "gent_ptr": "*fp32", "dz_ptr": PTR[wd], "N": N, "V": V, "H": H,
                    "stride_hn": H, "stride_wv": H, "stride_dz": V, "inv_temp": "fp32"}
            out.append(Variant("_logprobs_bwd_kernel", f"lp-bwd-{tag}-gent{int(gent)}", args,
                               {**cx, "HAS_GENT": gent}, _cfgs(LP._logprobs_bwd_kernel.configs),
                               est_key=("-", hd.itemsize, wd.itemsize)))
    return out


def gae_variants(full: bool) -> list[Variant]:
    out = []
    B, T = 512, 896
    bb, ct, nw = G._gae_config(B, T)
    for dt in ACT:
        for mask in (["*u8", "*i64", "*fp32"] if full else ["*u8"]):
            args = {"r_ptr": PTR[dt], "v_ptr": PTR[dt], "m_ptr": mask, "adv_ptr": "*fp32", "ret_ptr": "*fp32",
                    "B": B, "T": T, "stride_r": T, "stride_v": T, "stride_m": T, "stride_o": T,
                    "gamma": "fp32", "gamma_lam": "fp32"}
            out.append(Variant("_gae_fwd_kernel", f"gae-{SHORT[dt]}-m{mask[1:]}", args,
                               dict(BLOCK_B=bb, CHUNK_T=ct), [({}, nw, 3)]))
        out.append(Variant("_whiten_stats_kernel", f"whiten-stats-{SHORT[dt]}",
                           {"x_ptr": PTR[dt], "m_ptr": "*u8", "part_ptr": "*fp32", "N": B * T, "P": 112},
                           dict(BLOCK=4096), [({}, 8, 3)]))
        out.append(Variant("_whiten_apply_kernel", f"whiten-apply-{SHORT[dt]}",
                           {"x_ptr": PTR[dt], "m_ptr": "*u8", "stats_ptr": "*fp32", "out_ptr": "*fp32", "N": B * T},
                           dict(SHIFT_MEAN=True, BLOCK=4096), [({}, 8, 3)]))
    out.append(Variant("_whiten_combine_kernel", "whiten-combine", {"part_ptr": "*fp32", "stats_ptr": "*fp32",
                       "P": 112, "eps": "fp32"}, dict(UNBIASED=True, BLOCK_P=1024), [({}, 4, 3)]))
    return out


def estimate(v: Variant, meta: dict, warps: int, stages: int, arch: int) -> int | None:
    """The shared memory the launch-time pruning assumes for this config (None: not autotuned)."""
    if v.est_key is None:
        return None
    role, a, b = v.est_key
    return _limits.shared_bytes(v.kernel, role, meta, warps, stages, a, b, arch)


KERNELS = {
    "_nf4_lora_mm_kernel": NL._nf4_lora_mm_kernel, "_nf4_lora_gemv_kernel": NL._nf4_lora_gemv_kernel,
    "_nf4_lora_proj_kernel": NL._nf4_lora_proj_kernel,
    "_nf4_lora_adapter_grad_kernel": NL._nf4_lora_adapter_grad_kernel,
    "_nf4_dequant_kernel": NL._nf4_dequant_kernel, "_logprobs_fwd_kernel": LP._logprobs_fwd_kernel,
    "_logprobs_bwd_kernel": LP._logprobs_bwd_kernel, "_gae_fwd_kernel": G._gae_fwd_kernel,
    "_whiten_stats_kernel": G._whiten_stats_kernel, "_whiten_combine_kernel": G._whiten_combine_kernel,
    "_whiten_apply_kernel": G._whiten_apply_kernel,
}


def all_variants(full: bool) -> list[Variant]:
    return nf4_variants(full) + logprobs_variants(full) + gae_variants(full)


# ------------------------------------------------------------------------------------------
# Compiling one (variant, config, arch)
# ------------------------------------------------------------------------------------------
def _source(v: Variant, meta: dict):
    from triton.compiler import ASTSource

    fn = _unwrap(KERNELS[v.kernel])
    constexprs = {**v.constexprs, **meta}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name not in v.args:
            raise KeyError(f"{v.kernel} ({v.tag}): no value for argument {name!r}")
        a = v.args[name]
        if isinstance(a, str):
            sig[name] = a
            if a.startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif a == 1 and name not in _do_not_specialize(fn):
            sig[name] = "constexpr"
            constexprs[name] = 1
        else:
            sig[name] = "i64" if abs(a) >= 2 ** 31 else "i32"
            if a % 16 == 0 and name not in _do_not_specialize(fn):
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = set(constexprs) - set(fn.arg_names)
    if missing:
        raise KeyError(f"{v.kernel} ({v.tag}): constexprs {sorted(missing)} are not arguments")
    return ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)


def _do_not_specialize(fn) -> set:
    names = set()
    for p in getattr(fn, "do_not_specialize", ()) or ():
        names.add(fn.arg_names[p] if isinstance(p, int) else p)
    return names


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


_VARIANTS: list = []  # what the forked workers compile; jobs carry indices (estimates are closures)


def compile_one(job) -> dict:
    """Compile (variant index, config index, arch); registers and spills from ptxas' own -v log."""
    vi, ci, arch = job
    v = _VARIANTS[vi]
    meta, warps, stages = v.configs[ci]
    from triton.backends.compiler import GPUTarget

    row = {"kernel": v.kernel, "variant": v.tag, "arch": arch, "config": _cfg_name(meta, warps, stages)}
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        src = _source(v, meta)
        knobs = getattr(triton, "knobs", None)
        ctx = contextlib.nullcontext()
        if knobs is not None and hasattr(knobs.nvidia, "dump_ptxas_log"):
            ctx = knobs.nvidia.scope() if hasattr(knobs.nvidia, "scope") else contextlib.nullcontext()
        with ctx, contextlib.redirect_stdout(log):
            if knobs is not None and hasattr(knobs.nvidia, "dump_ptxas_log"):
                knobs.nvidia.dump_ptxas_log = True
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=warps, num_stages=stages, **v.options))
        row["shared"] = int(k.metadata.shared)
        text = log.getvalue()
        regs = _PTXAS_REGS.findall(text)
        spills = _PTXAS_SPILL.findall(text)
        row["regs"] = int(regs[-1]) if regs else None
        row["spill_bytes"] = sum(int(s) for s, _ in spills) if spills else None
        row["ok"] = True
    except Exception as e:  # the report names the variant; the message is the compiler's
        row["ok"] = False
        row["error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["estimate"] = estimate(v, meta, warps, stages, arch)
    if v.est_key is not None:
        row["table_key"] = [v.kernel, *v.est_key, _limits.config_name(meta, warps, stages)]
    return row


_cfg_name = _limits.config_name


def estimate_problems(variants: list[Variant]) -> tuple[list[dict], list[str]]:
    """Shared-memory estimates for every autotune config of every variant (no compile): which
    configs each architecture's pruning drops, and configs that fit no target at all."""
    rows, problems = [], []
    seen = set()
    for v in variants:
        if v.est_key is None:
            continue
        for meta, warps, stages in v.configs:
            key = (v.kernel, v.tag, _cfg_name(meta, warps, stages))
            if key in seen:
                continue
            seen.add(key)
            est = {arch: estimate(v, meta, warps, stages, arch) for arch in ARCHS}
            fits = {arch: est[arch] is None or est[arch] <= _limits.SHARED_LIMIT[arch] for arch in ARCHS}
            rows.append({"kernel": v.kernel, "variant": v.tag, "config": key[2],
                         **{f"estimate_sm{a}": e for a, e in est.items()},
                         **{f"fits_sm{a}": f for a, f in fits.items()}})
            top = max(ARCHS)
            if not fits[top] and _production(v):
                problems.append(f"{v.kernel} {v.tag} {key[2]}: {est[top]} B shared memory exceeds sm_{top}'s "
                                f"{_limits.SHARED_LIMIT[top]} B (a dead config on the production path)")
    return rows, problems


def _production(v: Variant) -> bool:
    """bf16 activations (adapters bf16 or fp32, head in bf16): what PPO runs on the GPU. Every
    autotune config must fit sm_90 there; fp32 operands may need the pruning even on sm_90."""
    return "bf16" in v.tag and "wf32" not in v.tag


def compile_problems(rows: list[dict]) -> list[str]:
    problems = []
    for r in rows:
        where = f"{r['kernel']} {r['variant']} sm_{r['arch']} {r['config']}"
        if not r["ok"]:
            problems.append(f"{where}: compile error: {r['error'].splitlines()[0] if r['error'] else ''}")
            continue
        est = r.get("estimate")
        kept = est is None or est <= _limits.SHARED_LIMIT[r["arch"]]
        if kept and r["shared"] > _limits.SHARED_LIMIT[r["arch"]]:
            problems.append(f"{where}: {r['shared']} B shared memory over the {_limits.SHARED_LIMIT[r['arch']]} B "
                            f"limit, and the pruning keeps it (table entry {est}; rerun with --write-table)")
        if est is not None and r["shared"] > est:
            problems.append(f"{where}: compiled shared memory {r['shared']} B above its table entry {est} B "
                            f"(stale kernels/_shared_table.py: rerun with --write-table)")
    return problems


def representative(v: Variant) -> int:
    """The config a variant is compiled with outside the sweep: the smallest tiles (the fastest
    compile; it fits every architecture)."""
    def size(c):
        meta, warps, stages = c
        n = stages
        for x in meta.values():
            n *= x
        return n
    return min(range(len(v.configs)), key=lambda i: size(v.configs[i]))


def _configs_to_compile(v: Variant, arch: int, every: bool) -> list[int]:
    """The representative config, plus every autotune config whose shared memory on ``arch`` the
    table does not give: the pruning would keep it blindly, so only a compile can tell whether it
    fits (a config added to an autotune list without re-measuring the table is compiled here)."""
    if every:
        return list(range(len(v.configs)))
    rep = representative(v)
    unmeasured = [ci for ci, (meta, warps, stages) in enumerate(v.configs)
                  if ci != rep and v.est_key is not None and estimate(v, meta, warps, stages, arch) is None]
    return [rep, *unmeasured]


def run(full: bool = False, archs=ARCHS, jobs: int = 2, only: str | None = None, all_configs: bool = False,
        rows_log: str | None = None) -> dict:
    """Quick: every dtype variant x launcher role (flags at their most inclusive), representative
    config. Full: every flag combination at the representative config, plus every autotune config
    of the quick variants (the shared-memory sweep)."""
    t0 = time.perf_counter()
    variants = all_variants(full)
    sweep = {v.tag for v in all_variants(False)} if full else set()
    if only:
        variants = [v for v in variants if re.search(only, v.kernel + " " + v.tag)]
    est_rows, problems = estimate_problems(variants)
    _VARIANTS[:] = variants
    jobs_list = [(vi, ci, arch) for vi, v in enumerate(variants) for arch in archs
                 for ci in _configs_to_compile(v, arch, all_configs or v.tag in sweep)]
    rows = []
    log = open(rows_log, "a") if rows_log else None
    with contextlib.ExitStack() as stack:
        if jobs > 1:
            import multiprocessing as mp

            ex = stack.enter_context(ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")))
            results = ex.map(compile_one, jobs_list, chunksize=1)
        else:
            results = map(compile_one, jobs_list)
        for row in results:  # each row as it arrives, so a long sweep leaves what it measured
            rows.append(row)
            if log:
                log.write(json.dumps(row) + "\n")
                log.flush()
    if log:
        log.close()
    problems += compile_problems(rows)
    spills = [r for r in rows if r.get("spill_bytes")]
    return {"full": full, "archs": list(archs), "triton": triton.__version__, "compiles": len(rows),
            "failed": sum(not r["ok"] for r in rows), "spilling": len(spills),
            "seconds": round(time.perf_counter() - t0, 1), "problems": problems, "rows": rows, "estimates": est_rows}


def write_table(rows: list[dict], path: str) -> int:
    """``kernels/_shared_table.py`` from compiled rows: per (kernel, role, operand bytes, config)
    the largest ``shared`` any flag combination got, per architecture."""
    table: dict = {}
    if os.path.exists(path):  # merge with an earlier sweep's entries (e.g. other dtypes)
        scope: dict = {}
        exec(open(path).read(), scope)
        table = {k: dict(v) for k, v in scope.get("SHARED", {}).items()}
    for r in rows:
        if r.get("ok") and r.get("table_key"):
            k = tuple(r["table_key"])
            table.setdefault(k, {})
            table[k][r["arch"]] = max(table[k].get(r["arch"], 0), r["shared"])
    lines = ["# ruff: noqa: E501",
             '"""Shared memory (bytes) Triton allocated per autotune config, per architecture: written by',
             f'``python -m factrl.kernels.compile_check --all-configs --write-table`` (triton {triton.__version__}). '
             'Keys: (kernel,',
             'launcher role, activation/first operand bytes, adapter/second operand bytes, config). Do not edit."""',
             "", "SHARED = {"]
    for k in sorted(table):
        lines.append(f"    {k!r}: {dict(sorted(table[k].items()))!r},")
    lines.append("}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return len(table)


def available() -> str | None:
    """None when this triton can compile for CUDA without a GPU, else the reason it cannot."""
    try:
        from triton.backends import backends
        from triton.backends.nvidia.compiler import get_ptxas
    except Exception as e:  # noqa: BLE001 - any import failure means no CUDA backend
        return f"triton {triton.__version__} has no CUDA backend ({e})"
    if "nvidia" not in backends:
        return f"triton {triton.__version__} has no nvidia backend"
    for arch in ARCHS:
        try:
            path = get_ptxas(arch).path
        except Exception as e:  # noqa: BLE001 - a missing binary raises from the knob
            return f"no ptxas for sm_{arch} in triton {triton.__version__} ({e})"
        if not (path and os.access(path, os.X_OK)):
            return f"no ptxas for sm_{arch} in triton {triton.__version__}"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="every flag combination x every autotune config")
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(_limits.SHARED_LIMIT))
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--only", default=None, help="regex on 'kernel variant'")
    ap.add_argument("--all-configs", action="store_true", help="every autotune config of the selected variants")
    ap.add_argument("--write-table", default=None, metavar="PY", help="write the measured shared memory per "
                    "config there (kernels/_shared_table.py; merged with the entries already in it)")
    ap.add_argument("--json", default=None, help="write the full report (every compile's row) here")
    ap.add_argument("--rows", default=None, help="append each compile's row to this .jsonl as it finishes")
    args = ap.parse_args(argv)
    why = available()
    if why:
        print(json.dumps({"skipped": why}))
        return 0
    rep = run(args.full, tuple(args.arch), args.jobs, args.only, args.all_configs, args.rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1)
    if args.write_table:
        print(f"wrote {write_table(rep['rows'], args.write_table)} entries to {args.write_table}")
    for r in rep["rows"]:
        if r.get("spill_bytes"):
            print(f"spills {r['spill_bytes']:>6} B  regs {r['regs']:>3}  sm_{r['arch']}  {r['kernel']} {r['variant']} "
                  f"{r['config']}")
    for p in rep["problems"]:
        print("PROBLEM", p)
    summary = {k: v for k, v in rep.items() if k not in ("rows", "estimates")}
    print(json.dumps(summary))
    return 1 if rep["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
