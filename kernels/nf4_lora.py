"""Fused NF4 base + LoRA linear: ``y = x @ dequant(W)^T + s * (x @ A^T) @ B^T (+ bias)``.

The hottest op of every stage: every q/k/v/o/gate/up/down of the decoder is one frozen NF4
weight ``W [N, K]`` (bitsandbytes layout, see ``kernels/nf4.py``) plus zero or more LoRA
adapters. The Triton path never writes a dequantized W to memory:

* ``_nf4_lora_proj_kernel``   rank-r products ``Us = s * x @ A^T`` (fwd) and ``Vs = s * dY @ B``
  (bwd), once per row block, fp32 ``[M, r]``. Cost ``M*K*r``: ~r/N of the main matmul.
* ``_nf4_lora_mm_kernel``     the main tile loop: loads packed NF4 bytes, dequantizes them in
  registers (code table x block scale, double-quant included) and feeds ``tl.dot``; the LoRA
  term ``Us @ B^T`` is one more rank-r dot on the same fp32 accumulator, then bias. With
  ``FWD=False`` the same kernel computes ``dX = dY @ W + Vs @ A``.
* ``_nf4_lora_gemv_kernel``   decode (M <= 16): split-K over the 4-bit weight bytes so that
  enough programs stream W to saturate HBM; memory-bound on ``N*K/2`` bytes.
* ``_nf4_lora_adapter_grad_kernel``  ``dA[g] = Vs_g^T X_g`` and ``dB[g] = dY_g^T Us_g`` over the
  rows of each adapter group (split over rows, fp32 partials summed afterwards).
* ``_nf4_dequant_kernel``     standalone dequantization through the same tile loader (tests
  check it bit for bit against bitsandbytes).

Accumulators hold ``out^T`` tiles ``[BLOCK_J, BLOCK_M]``: the dequantized W tile is then the
*left* operand of ``tl.dot``. On Hopper, wgmma may take its left operand from registers but
its right one only from shared memory, so this keeps the in-register dequantized tile where
the tensor cores can read it directly; for decode it also puts the large N dimension on the
MMA's M side (M=16 activations become the MMA's N).

Grouped adapters: ``lora_A [G, r, K]``, ``lora_B [G, N, r]``, ``adapter_ids [M]`` in -1..G-1
(-1 = base only). ``Us`` is zero on -1 rows, and each output tile loops only over the groups
present in its rows (usually one), so one pass over W serves several roles.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from factrl.kernels import _limits
from factrl.kernels._backend import TRITON_INTERPRET, new_output, resolve_backend
from factrl.kernels.nf4 import NF4Weight, dequantize_nf4

DECODE_MAX_M = 16

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# ------------------------------------------------------------------------------------------
# Triton helpers
# ------------------------------------------------------------------------------------------
@triton.jit
def _dequant_tile(qw_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, n0, k0, N, K,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BS: tl.constexpr, DQ: tl.constexpr):
    """fp32 ``W[n0:n0+BLOCK_N, k0:k0+BLOCK_K]`` (zeros outside W), dequantized in registers.

    Needs K % BS == 0 (blocks never straddle rows), K even, BS and BLOCK_K powers of two.
    """
    HALF: tl.constexpr = BLOCK_K // 2
    rn = n0 + tl.arange(0, BLOCK_N)
    rb = k0 // 2 + tl.arange(0, HALF)  # byte column inside row n: bytes hold k = 2b (hi), 2b+1 (lo)
    bmask = (rn[:, None] < N) & (rb[None, :] < K // 2)
    byte = tl.load(qw_ptr + rn[:, None].to(tl.int64) * (K // 2) + rb[None, :], mask=bmask, other=0)
    hi = (byte >> 4).to(tl.int32)
    lo = (byte & 0xF).to(tl.int32)
    idx = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))  # (BN, HALF, 2) -> (BN, BK): element 2j = hi
    vals = tl.load(code_ptr + idx)  # 16-entry table gather, L1-resident
    # One scale per (row, sub-block of SUB columns): SUB = BS, or the whole tile row when BS > BK.
    SUB: tl.constexpr = BLOCK_K if BLOCK_K < BS else BS
    NSUB: tl.constexpr = BLOCK_K // SUB
    rs = tl.arange(0, NSUB)
    blk = (rn[:, None].to(tl.int64) * K + k0 + rs[None, :] * SUB) // BS  # (BN, NSUB) block index
    smask = (rn[:, None] < N) & (k0 + rs[None, :] * SUB < K)
    if DQ:
        # bitsandbytes: absmax = code2[q] * absmax2[blk // 256] + offset (two fp32 roundings;
        # launches pass enable_fp_fusion=False so this stays a mul then an add, not an FMA).
        q = tl.load(absmax_ptr + blk, mask=smask, other=0).to(tl.int32)
        s2 = tl.load(absmax2_ptr + blk // 256, mask=smask, other=0.0)
        scale = tl.load(code2_ptr + q) * s2 + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=smask, other=0.0)
    scale = tl.where(smask, scale, 0.0)
    w = tl.reshape(vals, (BLOCK_N, NSUB, SUB)) * scale[:, :, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _lora_term(acc, rm, rj, M, J, R, ids_ptr, u_ptr, stride_um, lw_ptr, stride_lg, stride_lj, stride_lr,
               GROUPED: tl.constexpr, LORA_DT: tl.constexpr, LORA_PREC: tl.constexpr, R_PAD: tl.constexpr):
    """``acc (BJ, BM) += Lw[g(m)][rj, :] @ U[rm, :]^T``: U fp32 (M, R) already scaled, Lw (G, J, R)."""
    rr = tl.arange(0, R_PAD)
    uT = tl.load(u_ptr + rm[None, :].to(tl.int64) * stride_um + rr[:, None],
                 mask=(rm[None, :] < M) & (rr[:, None] < R), other=0.0)  # (R_PAD, BM)
    loffs = rj[:, None].to(tl.int64) * stride_lj + rr[None, :] * stride_lr  # (BJ, R_PAD)
    lmask = (rj[:, None] < J) & (rr[None, :] < R)
    if GROUPED:
        ids = tl.load(ids_ptr + rm, mask=rm < M, other=-1)
        g_lo = tl.min(tl.where(ids >= 0, ids, 2147483647), axis=0)
        g_hi = tl.max(ids, axis=0)
        for g in range(g_lo, g_hi + 1):  # groups present in this row block (empty if all -1)
            ug = tl.where((ids == g)[None, :], uT, 0.0)
            lw = tl.load(lw_ptr + g * stride_lg + loffs, mask=lmask, other=0.0)
            acc = tl.dot(lw.to(LORA_DT), ug.to(LORA_DT), acc, input_precision=LORA_PREC)
    else:
        lw = tl.load(lw_ptr + loffs, mask=lmask, other=0.0)
        acc = tl.dot(lw.to(LORA_DT), uT.to(LORA_DT), acc, input_precision=LORA_PREC)
    return acc


# ------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------
def _cfg(d, w, s):
    return triton.Config(d, num_warps=w, num_stages=s)


# Hopper/Ampere: big out tiles for the compute-bound shapes, small-M tiles for short batches. At
# launch the pruning drops what the device's shared memory cannot hold; compile_check.py compiles
# every entry for sm_90 and sm_80 and reports shared memory, registers and spills.
# Chosen by compiling bf16 activations with grouped LoRA (bf16 and fp32 adapters) for sm_80 and
# sm_90 (compile_check --all-configs, triton 3.9, 2026-12-02). Dropped: every mm config with
# BLOCK_L=128 (0.5-11.7 KB of register spills on every arch and role; 128/128/128 also needs 174 KB
# on sm_80), mm 128/256/64 (13 KB of spills in dX on sm_80), mm 64/256/64 x 4 stages (272 KB with
# fp32 adapters: fits neither), gemv 128/256 x 8 warps (225 / 233 KB: fits neither), the gemv and
# projection configs that spilled 0.1-7 KB. Left: spill-free with bf16 adapters except mm dX on
# sm_80 (12 / 92 bytes); the new small-M entries are measured by the quick compile check.
GPU_MM_CONFIGS = [
    _cfg({"BLOCK_M": 128, "BLOCK_J": 128, "BLOCK_L": 64, "GROUP_M": 8}, 8, 3),
    _cfg({"BLOCK_M": 256, "BLOCK_J": 128, "BLOCK_L": 64, "GROUP_M": 8}, 8, 3),
    _cfg({"BLOCK_M": 32, "BLOCK_J": 128, "BLOCK_L": 64, "GROUP_M": 8}, 4, 3),  # short batches
]
GPU_GEMV_CONFIGS = [_cfg({"BLOCK_N": bn, "BLOCK_K": bk}, w, s) for bn, bk, w, s in [(64, 128, 4, 4), (32, 128, 4, 4)]]
GPU_PROJ_CONFIGS = [_cfg({"BLOCK_M": bm, "BLOCK_L": bl}, w, s) for bm, bl, w, s in [(64, 64, 4, 3), (32, 128, 4, 3)]]
if TRITON_INTERPRET:  # one config: the interpreter would otherwise "benchmark" every candidate
    _MM_CONFIGS = [_cfg({"BLOCK_M": 32, "BLOCK_J": 64, "BLOCK_L": 64, "GROUP_M": 4}, 4, 1)]
    _GEMV_CONFIGS = [_cfg({"BLOCK_N": 64, "BLOCK_K": 64}, 4, 1)]
    _PROJ_CONFIGS = [_cfg({"BLOCK_M": 32, "BLOCK_L": 64}, 4, 1)]
else:
    _MM_CONFIGS, _GEMV_CONFIGS, _PROJ_CONFIGS = GPU_MM_CONFIGS, GPU_GEMV_CONFIGS, GPU_PROJ_CONFIGS


# Configs over the device's per-block shared memory (big tiles on sm_80, fp32 operands) are dropped
# before the autotuner compiles them (kernels/_limits.py).
_PRUNE_MM = _limits.pruner("_nf4_lora_mm_kernel", "a_ptr", "lw_ptr",
                           role=lambda a, kw: "fwd" if kw.get("FWD", a.get("FWD")) else "dx")
_PRUNE_GEMV = _limits.pruner("_nf4_lora_gemv_kernel", "x_ptr", "lw_ptr")
_PRUNE_PROJ = _limits.pruner("_nf4_lora_proj_kernel", "in_ptr", "p_ptr",
                             role=lambda a, kw: "us" if a["stride_pl"] == 1 else "vs")


# M_BUCKET (next power of two of M) is in the autotune keys so that short and long batches get
# their own best config, but it is a plain argument the bodies never read, kept out of
# specialization: as a constexpr each new bucket would compile every config again.
@triton.autotune(configs=_PROJ_CONFIGS, key=["M_BUCKET", "L", "R_PAD", "GROUPED", "SPLIT_L"],
                 prune_configs_by={"early_config_prune": _PRUNE_PROJ})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _nf4_lora_proj_kernel(in_ptr, stride_im, stride_il, p_ptr, stride_pg, stride_pl, stride_pr,
                          scale_ptr, ids_ptr, out_ptr, M, L, R, M_BUCKET,
                          GROUPED: tl.constexpr, SPLIT_L: tl.constexpr,
                          DT: tl.constexpr, PREC: tl.constexpr, R_PAD: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    """out[split, m, :] = s[g] * In[m, l-range] @ P[g][l-range, :], g = ids[m]; 0 where g = -1.

    In (M, L), P[g] (L, R) through strides, out fp32 (SPLIT_L, M, R).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R_PAD)
    l_per = tl.cdiv(tl.cdiv(L, BLOCK_L), SPLIT_L) * BLOCK_L
    l_start = pid_s * l_per
    l_end = tl.minimum(l_start + l_per, L)
    out = tl.zeros((BLOCK_M, R_PAD), tl.float32)
    if GROUPED:
        ids = tl.load(ids_ptr + rm, mask=rm < M, other=-1)
        g_lo = tl.min(tl.where(ids >= 0, ids, 2147483647), axis=0)
        g_hi = tl.max(ids, axis=0)
    else:
        ids = tl.zeros((BLOCK_M,), tl.int32)
        g_lo = 0
        g_hi = 0
    for g in range(g_lo, g_hi + 1):
        acc = tl.zeros((BLOCK_M, R_PAD), tl.float32)
        for l0 in range(l_start, l_end, BLOCK_L):
            rl = l0 + tl.arange(0, BLOCK_L)
            a = tl.load(in_ptr + rm[:, None].to(tl.int64) * stride_im + rl[None, :] * stride_il,
                        mask=(rm[:, None] < M) & (rl[None, :] < l_end), other=0.0)  # (BM, BL)
            p = tl.load(p_ptr + g * stride_pg + rl[:, None].to(tl.int64) * stride_pl
                        + rr[None, :] * stride_pr, mask=(rl[:, None] < l_end) & (rr[None, :] < R), other=0.0)
            acc = tl.dot(a.to(DT), p.to(DT), acc, input_precision=PREC)
        s = tl.load(scale_ptr + g)
        out = tl.where((ids == g)[:, None], acc * s, out)
    tl.store(out_ptr + (pid_s * M + rm[:, None].to(tl.int64)) * R + rr[None, :], out,
             mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.autotune(configs=_MM_CONFIGS, key=["M_BUCKET", "N", "K", "FWD", "HAS_LORA", "R_PAD"],
                 prune_configs_by={"early_config_prune": _PRUNE_MM})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _nf4_lora_mm_kernel(a_ptr, stride_am, stride_al,
                        qw_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                        out_ptr, stride_om, stride_oj,
                        u_ptr, stride_um, lw_ptr, stride_lg, stride_lj, stride_lr, ids_ptr, bias_ptr,
                        M, N, K, R, M_BUCKET,
                        FWD: tl.constexpr, BS: tl.constexpr, DQ: tl.constexpr,
                        HAS_LORA: tl.constexpr, GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr,
                        DOT_DT: tl.constexpr, PREC: tl.constexpr, LORA_DT: tl.constexpr,
                        LORA_PREC: tl.constexpr, R_PAD: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr,
                        GROUP_M: tl.constexpr):
    """FWD:  out (M, N) = a (M, K) @ W^T + Us @ B[g]^T + bias   (J = N, L = K)
    !FWD: out (M, K) = a (M, N) @ W   + Vs @ A[g]            (J = K, L = N)  -- dX
    """
    if FWD:
        J = N
        L = K
    else:
        J = K
        L = N
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_j = tl.cdiv(J, BLOCK_J)
    # Grouped ordering: GROUP_M row blocks sweep all J tiles together, so their activations and
    # the W tiles they share stay in L2.
    per_group = GROUP_M * num_j
    first_m = (pid // per_group) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % gsize
    pid_j = (pid % per_group) // gsize
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    acc = tl.zeros((BLOCK_J, BLOCK_M), tl.float32)  # out^T tile
    for l0 in range(0, L, BLOCK_L):
        rl = l0 + tl.arange(0, BLOCK_L)
        aT = tl.load(a_ptr + rm[None, :].to(tl.int64) * stride_am + rl[:, None] * stride_al,
                     mask=(rm[None, :] < M) & (rl[:, None] < L), other=0.0)  # (BL, BM)
        if FWD:
            w = _dequant_tile(qw_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                              pid_j * BLOCK_J, l0, N, K, BLOCK_J, BLOCK_L, BS, DQ)  # (BJ=n, BL=k)
        else:
            w = tl.trans(_dequant_tile(qw_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                                       l0, pid_j * BLOCK_J, N, K, BLOCK_L, BLOCK_J, BS, DQ))  # (BJ=k, BL=n)
        # Cast W to the activation dtype exactly as dequantize_4bit(..., dtype) rounds it.
        acc = tl.dot(w.to(DOT_DT), aT.to(DOT_DT), acc, input_precision=PREC)
    if HAS_LORA:
        acc = _lora_term(acc, rm, rj, M, J, R, ids_ptr, u_ptr, stride_um, lw_ptr, stride_lg, stride_lj,
                         stride_lr, GROUPED, LORA_DT, LORA_PREC, R_PAD)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rj, mask=rj < J, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + rm[None, :].to(tl.int64) * stride_om + rj[:, None] * stride_oj,
             acc.to(out_ptr.dtype.element_ty), mask=(rm[None, :] < M) & (rj[:, None] < J))


@triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "SPLIT_K", "HAS_LORA", "R_PAD"],
                 prune_configs_by={"early_config_prune": _PRUNE_GEMV})
@triton.jit
def _nf4_lora_gemv_kernel(x_ptr, stride_xm, stride_xk,
                          qw_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                          out_ptr, stride_os, stride_om, stride_on,
                          u_ptr, stride_um, lw_ptr, stride_lg, stride_lj, stride_lr, ids_ptr, bias_ptr,
                          M, N, K, R,
                          SPLIT_K: tl.constexpr, BS: tl.constexpr, DQ: tl.constexpr, HAS_LORA: tl.constexpr,
                          GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DT: tl.constexpr,
                          PREC: tl.constexpr, LORA_DT: tl.constexpr, LORA_PREC: tl.constexpr,
                          R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """Decode, M <= BLOCK_M (16): out[split] (M, N) = x[:, k-range] @ W[:, k-range]^T (+ LoRA, bias
    in split 0). Each program streams a (BLOCK_N, K/SPLIT_K) slab of packed W once."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per
    k_end = tl.minimum(k_start + k_per, K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)  # out^T: W rows on the MMA's M side
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xT = tl.load(x_ptr + rm[None, :] * stride_xm + rk[:, None] * stride_xk,
                     mask=(rm[None, :] < M) & (rk[:, None] < K), other=0.0)  # (BK, BM)
        w = _dequant_tile(qw_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                          pid_n * BLOCK_N, k0, N, K, BLOCK_N, BLOCK_K, BS, DQ)
        acc = tl.dot(w.to(DOT_DT), xT.to(DOT_DT), acc, input_precision=PREC)
    if pid_k == 0:
        if HAS_LORA:
            acc = _lora_term(acc, rm, rn, M, N, R, ids_ptr, u_ptr, stride_um, lw_ptr, stride_lg, stride_lj,
                             stride_lr, GROUPED, LORA_DT, LORA_PREC, R_PAD)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + pid_k * stride_os + rm[None, :] * stride_om + rn[:, None] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=(rm[None, :] < M) & (rn[:, None] < N))


@triton.jit
def _nf4_lora_adapter_grad_kernel(p_ptr, stride_pm, stride_pi, q_ptr, stride_qm, stride_qj,
                                  ids_ptr, lo_ptr, hi_ptr, out_ptr, M, I, J, G,
                                  GROUPED: tl.constexpr, SPLIT_M: tl.constexpr, DT: tl.constexpr,
                                  PREC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                                  BLOCK_M: tl.constexpr):
    """out[split, g] (I, J) fp32 = sum over rows m of group g in this split of P[m, :]^T Q[m, :].

    dA[g] (r, K): P = Vs (M, r), Q = X (M, K).   dB[g] (N, r): P = dY (M, N), Q = Us (M, r).
    Rows of g are searched only inside [lo[g], hi[g]) (contiguous segments make that tight).
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_i = tl.cdiv(I, BLOCK_I)
    n_j = tl.cdiv(J, BLOCK_J)
    g = pid // (n_i * n_j)
    pid_i = (pid % (n_i * n_j)) // n_j
    pid_j = pid % n_j
    if GROUPED:
        lo = tl.load(lo_ptr + g)
        hi = tl.load(hi_ptr + g)
    else:
        lo = 0
        hi = M
    per = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M), SPLIT_M) * BLOCK_M
    start = lo + pid_s * per
    end = tl.minimum(start + per, hi)
    ri = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    rj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    acc = tl.zeros((BLOCK_I, BLOCK_J), tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        rows = rm < end
        if GROUPED:
            rows = rows & (tl.load(ids_ptr + rm, mask=rows, other=-1) == g)
        pT = tl.load(p_ptr + rm[None, :].to(tl.int64) * stride_pm + ri[:, None] * stride_pi,
                     mask=rows[None, :] & (ri[:, None] < I), other=0.0)  # (BI, BM)
        q = tl.load(q_ptr + rm[:, None].to(tl.int64) * stride_qm + rj[None, :] * stride_qj,
                    mask=rows[:, None] & (rj[None, :] < J), other=0.0)  # (BM, BJ)
        acc = tl.dot(pT.to(DT), q.to(DT), acc, input_precision=PREC)
    tl.store(out_ptr + ((pid_s * G + g) * I + ri[:, None].to(tl.int64)) * J + rj[None, :], acc,
             mask=(ri[:, None] < I) & (rj[None, :] < J))


@triton.jit
def _nf4_dequant_kernel(qw_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr, N, K,
                        BS: tl.constexpr, DQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (N, K) = dequant(W) through the fused kernels' own tile loader."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    w = _dequant_tile(qw_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                      tl.program_id(0) * BLOCK_N, tl.program_id(1) * BLOCK_K, N, K, BLOCK_N, BLOCK_K, BS, DQ)
    tl.store(out_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(rn[:, None] < N) & (rk[None, :] < K))


# ------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------
def _wargs(w: NF4Weight):
    """Pointer args for the tile loader; unused double-quant slots get a harmless stand-in."""
    dq = w.double_quant
    return (w.qweight, w.absmax, w.absmax2 if dq else w.absmax, w.code2 if dq else w.code,
            w.offset.reshape(1) if dq else w.code, w.code)


def triton_supports(weight: NF4Weight) -> bool:
    """The fused kernels need whole NF4 blocks per weight row (true for every LLaMA layer)."""
    n, k = weight.shape
    bs = weight.blocksize
    return k % 2 == 0 and bs >= 2 and (bs & (bs - 1)) == 0 and k % bs == 0


def _check_weight(weight: NF4Weight):
    if not triton_supports(weight):
        raise ValueError(f"triton nf4_lora needs in_features % blocksize == 0 and a power-of-two blocksize; "
                         f"got shape {weight.shape}, blocksize {weight.blocksize}")
    if weight.qweight.dtype != torch.uint8 or not weight.qweight.is_contiguous():
        raise ValueError("qweight must be contiguous uint8")


def _dot_cfg(act_dtype: torch.dtype):
    """(dot operand dtype, input precision) for activations of act_dtype.

    fp32 -> exact 'ieee'. bf16 under the interpreter -> fp32 (the interpreter's bf16 tl.dot is wrong).
    """
    if act_dtype == torch.float32 or (TRITON_INTERPRET and act_dtype == torch.bfloat16):
        return tl.float32, "ieee"
    return _TL_DTYPE[act_dtype], "ieee"  # precision is ignored for 16-bit operands


def _lora_cfg(act_dtype: torch.dtype, adapter_dtype: torch.dtype):
    """Rank-r dots: in the activation dtype when adapters share it, else fp32 operands with
    tf32 inputs on the GPU (10-bit mantissa, >= fp16/bf16 inputs) and fp32 accumulation."""
    if adapter_dtype == act_dtype:
        return _dot_cfg(act_dtype)
    return tl.float32, ("ieee" if act_dtype == torch.float32 else "tf32")


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The interpreter converts fp32 -> bf16 by truncation (the GPU rounds to nearest even):
    there, kernels store fp32 and torch rounds afterwards."""
    return torch.float32 if (TRITON_INTERPRET and dtype == torch.bfloat16) else dtype


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs inner dims >= 16


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 8192)


def _n_sm(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _project(inp, p, p_strides, scale, ids, r, dt, prec, split=1):
    """fp32 (M, r) = scale[g] * inp (M, L) @ P[g] (L, r); P[g][l, j] = p[g*sg + l*sl + j*sr]."""
    m, l = inp.shape
    out = new_output((split, m, r), torch.float32, inp.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), split)  # noqa: E731
    _nf4_lora_proj_kernel[grid](inp, inp.stride(0), inp.stride(1), p, *p_strides, scale,
                                ids if ids is not None else scale, out, m, l, r, _m_bucket(m),
                                GROUPED=ids is not None, SPLIT_L=split, DT=dt,
                                PREC=prec, R_PAD=_r_pad(r), enable_fp_fusion=False)
    return out[0] if split == 1 else out.sum(0)


def nf4_matmul_fwd(x2, weight, us=None, lora_B=None, ids=None, bias=None):
    """(M, N) in x2.dtype = x2 (M, K) @ dequant(W)^T [+ us (M, r) @ lora_B[g] (G, N, r)^T] [+ bias]."""
    _check_weight(weight)
    m, k = x2.shape
    n = weight.shape[0]
    if k != weight.shape[1]:
        raise ValueError(f"x has {k} features, weight is {weight.shape}")
    dot_dt, prec = _dot_cfg(x2.dtype)
    r = lora_B.shape[-1] if lora_B is not None else 0
    lora_dt, lora_prec = _lora_cfg(x2.dtype, lora_B.dtype) if lora_B is not None else (dot_dt, prec)
    common = dict(BS=weight.blocksize, DQ=weight.double_quant, HAS_LORA=us is not None,
                  GROUPED=ids is not None, HAS_BIAS=bias is not None, DOT_DT=dot_dt, PREC=prec,
                  LORA_DT=lora_dt, LORA_PREC=lora_prec,
                  R_PAD=_r_pad(max(r, 1)), enable_fp_fusion=False)
    dummy = weight.code  # stands in for absent optional pointers (never dereferenced)
    if us is not None:  # B[g][n, r] is Lw[g][j=n, r]
        largs = (us, us.stride(0), lora_B, lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
                 ids if ids is not None else dummy, bias if bias is not None else dummy)
    else:
        largs = (dummy, 0, dummy, 0, 0, 0, dummy, bias if bias is not None else dummy)
    if m <= DECODE_MAX_M:
        # Split K until ~2 waves of programs stream W (each program owns >= 256 columns).
        split = max(1, min(triton.cdiv(2 * _n_sm(x2.device), triton.cdiv(n, 64)), k // 256))
        out = new_output((split, m, n), _store_dtype(x2.dtype) if split == 1 else torch.float32, x2.device)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
        _nf4_lora_gemv_kernel[grid](x2, x2.stride(0), x2.stride(1), *_wargs(weight),
                                    out, out.stride(0), out.stride(1), out.stride(2), *largs,
                                    m, n, k, r, SPLIT_K=split, BLOCK_M=DECODE_MAX_M, **common)
        return (out[0] if split == 1 else out.sum(0)).to(x2.dtype)
    out = new_output((m, n), _store_dtype(x2.dtype), x2.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_J"]),)  # noqa: E731
    _nf4_lora_mm_kernel[grid](x2, x2.stride(0), x2.stride(1), *_wargs(weight),
                              out, out.stride(0), out.stride(1), *largs, m, n, k, r, _m_bucket(m),
                              FWD=True, **common)
    return out.to(x2.dtype)


def nf4_matmul_dx(dy, weight, vs=None, lora_A=None, ids=None, out_dtype=None):
    """(M, K) = dy (M, N) @ dequant(W) [+ vs (M, r) @ lora_A[g] (G, r, K)]."""
    _check_weight(weight)
    m, n = dy.shape
    n_w, k = weight.shape
    if n != n_w:
        raise ValueError(f"dy has {n} features, weight is {weight.shape}")
    dot_dt, prec = _dot_cfg(dy.dtype)
    r = lora_A.shape[1] if lora_A is not None else 0
    lora_dt, lora_prec = _lora_cfg(dy.dtype, lora_A.dtype) if lora_A is not None else (dot_dt, prec)
    dummy = weight.code
    if vs is not None:  # A[g][r, k] seen as Lw[g][j=k, r]
        largs = (vs, vs.stride(0), lora_A, lora_A.stride(0), lora_A.stride(2), lora_A.stride(1),
                 ids if ids is not None else dummy, dummy)
    else:
        largs = (dummy, 0, dummy, 0, 0, 0, dummy, dummy)
    out_dtype = out_dtype or dy.dtype
    out = new_output((m, k), _store_dtype(out_dtype), dy.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_J"]),)  # noqa: E731
    _nf4_lora_mm_kernel[grid](dy, dy.stride(0), dy.stride(1), *_wargs(weight),
                              out, out.stride(0), out.stride(1), *largs, m, n, k, r, _m_bucket(m),
                              FWD=False, BS=weight.blocksize,
                              DQ=weight.double_quant, HAS_LORA=vs is not None, GROUPED=ids is not None,
                              HAS_BIAS=False, DOT_DT=dot_dt, PREC=prec, LORA_DT=lora_dt, LORA_PREC=lora_prec,
                              R_PAD=_r_pad(max(r, 1)), enable_fp_fusion=False)
    return out.to(out_dtype)


def _adapter_grad(p, q, ids, lo, hi, g, dt, prec, p_is_rank):
    """fp32 (G, I, J) = per-group P^T Q over rows; P (M, I), Q (M, J); one of I, J is the rank."""
    m, i = p.shape
    j = q.shape[1]
    big_block = 64 if TRITON_INTERPRET else 128
    bi = _r_pad(i) if p_is_rank else big_block
    bj = big_block if p_is_rank else _r_pad(j)
    tiles = g * triton.cdiv(i, bi) * triton.cdiv(j, bj)
    # Split the row reduction until ~2 waves of programs, keeping >= 4 row blocks per split.
    block_m = 32 if TRITON_INTERPRET else 64
    split = max(1, min(triton.cdiv(2 * _n_sm(p.device), tiles), triton.cdiv(m, 4 * block_m)))
    out = new_output((split, g, i, j), torch.float32, p.device)
    dummy = lo if lo is not None else p
    _nf4_lora_adapter_grad_kernel[(tiles, split)](
        p, p.stride(0), p.stride(1), q, q.stride(0), q.stride(1), ids if ids is not None else dummy,
        lo if lo is not None else dummy, hi if hi is not None else dummy, out, m, i, j, g,
        GROUPED=ids is not None, SPLIT_M=split, DT=dt, PREC=prec, BLOCK_I=bi, BLOCK_J=bj,
        BLOCK_M=block_m, num_warps=4, num_stages=3, enable_fp_fusion=False)
    return out[0] if split == 1 else out.sum(0)


def nf4_dequantize_triton(weight: NF4Weight, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """(N, K) in dtype through the fused kernels' tile loader; equals ``dequantize_nf4`` bit for bit."""
    _check_weight(weight)
    n, k = weight.shape
    out = new_output((n, k), _store_dtype(dtype), weight.device)
    bn, bk = 32, 128
    _nf4_dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        *_wargs(weight), out, n, k, BS=weight.blocksize, DQ=weight.double_quant, BLOCK_N=bn, BLOCK_K=bk,
        enable_fp_fusion=False)
    return out.to(dtype)


def _group_row_ranges(ids, g):
    """(lo, hi) int32 [G]: first and one-past-last row of each group (lo=M, hi=0 when empty),
    computed on the device without a host sync (-1 rows go to a spare bucket G)."""
    m = ids.numel()
    idx = torch.where(ids >= 0, ids, g).long()
    ar = torch.arange(m, device=ids.device, dtype=torch.int32)
    lo = torch.full((g + 1,), m, dtype=torch.int32, device=ids.device).scatter_reduce(0, idx, ar, "amin")
    hi = torch.zeros(g + 1, dtype=torch.int32, device=ids.device).scatter_reduce(0, idx, ar + 1, "amax")
    return lo[:g].contiguous(), hi[:g].contiguous()


# ------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------
class NF4LoRAFunction(torch.autograd.Function):
    """x2 (M, K), lora_A (G, r, K) | None, lora_B (G, N, r) | None -> (M, N).

    Saves x (only when dA is needed), Us (M, r) fp32 and the adapters; never a dequantized W.
    """

    @staticmethod
    def forward(ctx, x2, lora_A, lora_B, weight, scale, bias, ids):
        has_lora = lora_A is not None
        us = None
        if has_lora:
            dt, prec = _lora_cfg(x2.dtype, lora_A.dtype)
            # P[g][l=k, j=r] = A[g, r, k]
            split = _proj_split(x2.shape[0], x2.shape[1], x2.device)
            us = _project(x2, lora_A, (lora_A.stride(0), lora_A.stride(2), lora_A.stride(1)), scale, ids,
                          lora_A.shape[1], dt, prec, split)
        y = nf4_matmul_fwd(x2, weight, us, lora_B, ids, bias)
        need_a = has_lora and ctx.needs_input_grad[1]
        ctx.save_for_backward(x2 if need_a else None, us, lora_A, lora_B, scale, ids)
        ctx.weight = weight
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, us, lora_A, lora_B, scale, ids = ctx.saved_tensors
        weight = ctx.weight
        dy = dy.contiguous()
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        dx = da = db = None
        vs = lo = hi = None
        if lora_A is not None:
            g, r = lora_A.shape[0], lora_A.shape[1]
            dt, prec = _lora_cfg(dy.dtype, lora_A.dtype)
            if ids is not None and (need_a or need_b):
                lo, hi = _group_row_ranges(ids, g)
            if need_x or need_a:  # Vs = s * dY @ B[g]: P[g][l=n, j=r] = B[g, n, r]
                split = _proj_split(dy.shape[0], dy.shape[1], dy.device)
                vs = _project(dy, lora_B, (lora_B.stride(0), lora_B.stride(1), lora_B.stride(2)), scale, ids,
                              r, dt, prec, split)
            if need_a:  # dA[g] (r, K) = Vs_g^T X_g
                da = _adapter_grad(vs, x2, ids, lo, hi, g, dt, prec, p_is_rank=True).to(lora_A.dtype)
            if need_b:  # dB[g] (N, r) = dY_g^T Us_g
                db = _adapter_grad(dy, us, ids, lo, hi, g, dt, prec, p_is_rank=False).to(lora_B.dtype)
        if need_x:
            dx = nf4_matmul_dx(dy, weight, vs if (lora_A is not None) else None, lora_A, ids)
        return dx, da, db, None, None, None, None


def _proj_split(m, l, device):
    """Split the rank-r projection over L when few row blocks exist (decode), ~1 wave."""
    if m > 256:
        return 1
    return max(1, min(triton.cdiv(_n_sm(device), triton.cdiv(m, 64)), l // 256))


# ------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------
def _check_args(x, weight, lora_A, lora_B, scaling, bias, adapter_ids):
    """Validate; return (M, N, K, G or 0, grouped)."""
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be floating point, got {x.dtype}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x {tuple(x.shape)} does not end in in_features={k} of weight {weight.shape}")
    m = x.numel() // k if k else 0
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be ({n},), got {tuple(bias.shape)}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must be given together")
    if lora_A is None:
        if adapter_ids is not None:
            raise ValueError("adapter_ids given without adapters")
        return m, n, k, 0, False
    if lora_A.dim() == 2:
        r = lora_A.shape[0]
        if tuple(lora_A.shape) != (r, k) or tuple(lora_B.shape) != (n, r):
            raise ValueError(f"single adapter needs lora_A (r, {k}) and lora_B ({n}, r); got "
                             f"{tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
        if adapter_ids is not None:
            raise ValueError("adapter_ids needs grouped adapters lora_A (G, r, K), lora_B (G, N, r)")
        if torch.is_tensor(scaling) and scaling.numel() != 1:
            raise ValueError("a single adapter takes a scalar scaling")
        return m, n, k, 1, False
    if lora_A.dim() != 3:
        raise ValueError(f"lora_A must be (r, K) or (G, r, K), got {tuple(lora_A.shape)}")
    g, r = lora_A.shape[0], lora_A.shape[1]
    if tuple(lora_A.shape) != (g, r, k) or tuple(lora_B.shape) != (g, n, r):
        raise ValueError(f"grouped adapters need lora_A ({g}, r, {k}) and lora_B ({g}, {n}, r); got "
                         f"{tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    if adapter_ids is None or adapter_ids.numel() != m:
        raise ValueError(f"grouped adapters need adapter_ids with {m} entries (one per row)")
    if adapter_ids.dtype.is_floating_point or adapter_ids.dtype == torch.bool:
        raise TypeError("adapter_ids must be an integer tensor")
    if torch.is_tensor(scaling) and scaling.numel() not in (1, g):
        raise ValueError(f"scaling must be a float or have {g} entries")
    if m:  # an id outside -1..G-1 would read another tensor's memory in the kernels
        lo, hi = (int(v) for v in torch.aminmax(adapter_ids))  # host ids: free; device ids: one sync
        if lo < -1 or hi >= g:
            raise ValueError(f"adapter_ids must lie in -1..{g - 1}, got {lo}..{hi}")
    return m, n, k, g, True


def nf4_lora(x, weight: NF4Weight, lora_A=None, lora_B=None, scaling=1.0, bias=None,
             adapter_ids=None, backend=None) -> torch.Tensor:
    """``x (..., K) @ dequant(W)^T + scaling * (x @ A^T) @ B^T (+ bias)`` -> ``(..., N)`` in x.dtype.

    Single adapter: lora_A (r, K), lora_B (N, r). Grouped: lora_A (G, r, K), lora_B (G, N, r),
    adapter_ids (M,) in -1..G-1 (-1 = base only; checked before any launch, so pass them on the host:
    ids on the GPU cost one device sync per call), scaling float or (G,). Gradients flow to x,
    lora_A, lora_B; never to W; bias is frozen. backend None: triton on CUDA, torch on CPU.
    """
    m, n, k, g, grouped = _check_args(x, weight, lora_A, lora_B, scaling, bias, adapter_ids)
    explicit = backend is not None or os.environ.get("FACTRL_BACKEND")
    backend = resolve_backend(backend, x)
    if backend == "triton" and not triton_supports(weight) and not explicit:
        backend = "torch"  # odd layouts (K not a multiple of the block size) take the torch path
    if backend == "torch":
        return nf4_lora_reference(x, weight, lora_A, lora_B, scaling, bias, adapter_ids)
    if x.dtype not in _TL_DTYPE or (lora_A is not None and lora_A.dtype not in _TL_DTYPE):
        raise TypeError(f"triton nf4_lora takes float32/float16/bfloat16 tensors, got {x.dtype}")
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        raise ValueError("nf4_lora treats bias as frozen; pass bias.detach() (or use backend='torch')")
    x2 = x.reshape(m, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    a = b = ids = scale = None
    if g:
        a = lora_A if grouped else lora_A.unsqueeze(0)  # (G, r, K)
        b = lora_B if grouped else lora_B.unsqueeze(0)  # (G, N, r)
        if torch.is_tensor(scaling):
            scale = scaling.detach().to(device=x.device, dtype=torch.float32).reshape(-1).expand(g)
            scale = scale.contiguous()
        else:
            scale = torch.full((g,), float(scaling), dtype=torch.float32, device=x.device)
        if grouped:
            ids = adapter_ids.reshape(m).to(device=x.device, dtype=torch.int32).contiguous()
    y = NF4LoRAFunction.apply(x2, a, b, weight, scale, bias.detach() if bias is not None else None, ids)
    return y.reshape(*x.shape[:-1], n)


def nf4_lora_reference(x, weight, lora_A=None, lora_B=None, scaling=1.0, bias=None,
                       adapter_ids=None) -> torch.Tensor:
    """Pure PyTorch (any float dtype, fp64 too): bitsandbytes-exact dequantization in x.dtype,
    then matmuls (autograd through torch). The base product runs in x.dtype like bnb; the LoRA
    term in the promoted dtype of x and the adapters (fp32 adapters -> fp32 LoRA, like peft),
    added before the final cast."""
    m, n, k, g, grouped = _check_args(x, weight, lora_A, lora_B, scaling, bias, adapter_ids)
    x2 = x.reshape(m, k)
    y = x2 @ dequantize_nf4(weight, x.dtype).t()  # (M, N)
    if bias is not None:
        y = y + bias.to(x.dtype)
    if g:
        ldt = torch.promote_types(x.dtype, lora_A.dtype)
        xl = x2.to(ldt)
        y = y.to(ldt)
        if not grouped:
            s = scaling.to(ldt).reshape(()) if torch.is_tensor(scaling) else scaling
            y = y + ((xl @ lora_A.to(ldt).t()) @ lora_B.to(ldt).t()) * s
        else:
            ids = adapter_ids.reshape(m).to(x.device)
            sc = None
            if torch.is_tensor(scaling):
                sc = scaling.to(device=x.device, dtype=ldt).reshape(-1).expand(g)
            for gi in range(g):
                rows = (ids == gi).nonzero(as_tuple=True)[0]
                if rows.numel() == 0:
                    continue
                part = (xl.index_select(0, rows) @ lora_A[gi].to(ldt).t()) @ lora_B[gi].to(ldt).t()
                y = y.index_add(0, rows, part * (sc[gi] if sc is not None else scaling))
        y = y.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)
