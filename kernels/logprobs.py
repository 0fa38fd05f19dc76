"""Fused lm_head -> token log-probs (+ entropy) and per-token KL, never materializing [N, V] logits.

PPO needs log pi(target) for every response token (policy with gradient; old policy and reference
without), SFT needs the same for its loss. The naive ``log_softmax(hidden @ W.T).gather`` holds the
fp32 logits ``[N, V]`` (2 GB at N=16k, V=32k) and several same-size copies in backward. Here the
logits exist only one tile at a time:

* forward: per (token block, vocab split) an online log-sum-exp over vocab tiles keeps, per row,
  ``m`` (running max), ``s = sum exp(z - m)``, ``a = sum exp(z - m) * (z - m)`` (for the entropy)
  and the target logit; splits are merged in a tiny ``[n_split, N]`` epilogue (``_combine``).
  ``lse = m + log s``, ``E[z] = m + a / s``, ``entropy = lse - E[z] = log s - a / s``.
  Accumulating ``(z - m)`` instead of ``z`` keeps the entropy exact for logits of size 1e4.
* backward (d hidden; d weight only with ``weight_grad=True`` for a trainable head): tiles are
  recomputed from saved hidden and ``lse``/``E[z]``; with ``p = exp(z - lse)``,
  ``dz = g_lp * (onehot(target) - p) + g_ent * p * (E[z] - z)``,  ``dh = dz @ W / T``
  (``dW = dz.T @ h / T``).
  Triton writes ``dz`` for one token chunk ``[C, V]`` (C*V ~ 2**26 elements) and cuBLAS does the
  ``[C, V] @ [V, H]`` product; the torch backend does the same in (token x vocab) chunks.

Backends: ``triton`` (CUDA; CPU only under ``TRITON_INTERPRET=1``) and ``torch`` (a chunked
autograd.Function, what CPU runs use). ``*_reference`` is the naive log_softmax + gather.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from factrl.kernels import _limits
from factrl.kernels._backend import TRITON_INTERPRET, new_output, resolve_backend

KL_ESTIMATORS = ("k1", "k1_clamp", "k2", "k3")

# Vocab splits start at multiples of 256 so GPU tiles (BLOCK_V <= 256) are full except at V. Correctness
# does not depend on it: a tile crossing its split's end is masked like one crossing V.
_SPLIT_ALIGN = 256


# ----------------------------------------------------------------------------------- Triton kernels


def _configs(gpu: list[tuple[int, int, int, int, int]], interp: tuple[int, int, int]):
    """(BLOCK_N, BLOCK_V, BLOCK_K, warps, stages) on GPU; one config (large tiles = fewer numpy
    calls) under the interpreter, where autotuning would only waste time."""
    if TRITON_INTERPRET:
        return [triton.Config(dict(BLOCK_N=interp[0], BLOCK_V=interp[1], BLOCK_K=interp[2]))]
    return [triton.Config(dict(BLOCK_N=n, BLOCK_V=v, BLOCK_K=k), num_warps=w, num_stages=s)
            for n, v, k, w, s in gpu]


_GEMM_CONFIGS = [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4),
                 (32, 128, 128, 4, 3)]


@triton.jit
def _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_wv,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """z[BLOCK_N, BLOCK_V] = hidden[rows] @ weight[cols].T, fp32 accumulation (unscaled).

    Row offsets are int64: rows * stride passes 2**31 once N * H does (a whole 7B rollout batch,
    512 sequences x 1600 tokens at H = 4096, is 3.4e9), or a row-strided view's stride is large."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    h_rows = h_ptr + rows[:, None].to(tl.int64) * stride_hn  # (BN, 1) row starts
    w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_wv  # (BV, 1)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        h = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # mixed dtypes, or bf16 under the interpreter (its bf16 dot is wrong)
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _online_update(m, s, a, zt, z, cols, t, valid):
    """Fold one tile z[BN, BV] (valid[BN, BV]) into the running (m, s, a, zt), all [BN] fp32.

    Rescaling to a new max m': s' = e^(m-m') s, a' = e^(m-m') (a + (m-m') s). m starts at -1e30
    (finite), so (m - m') * s is 0 * finite, never inf * 0.
    """
    m_new = tl.maximum(m, tl.max(tl.where(valid, z, float("-inf")), axis=1))
    alpha = tl.exp(m - m_new)
    d = tl.where(valid, z - m_new[:, None], 0.0)
    e = tl.where(valid, tl.exp(d), 0.0)
    s_new = alpha * s + tl.sum(e, axis=1)
    a_new = alpha * (a + (m - m_new) * s) + tl.sum(e * d, axis=1)
    zt_new = zt + tl.sum(tl.where(valid & (cols[None, :] == t[:, None]), z, 0.0), axis=1)
    return m_new, s_new, a_new, zt_new


@triton.jit
def _dz_tile(z, cols, t, lse, ez, glp, gent, HAS_GENT: tl.constexpr):
    """d(loss)/dz for one tile: glp * (onehot - p) + gent * p * (E[z] - z); glp/gent are 0 on
    ignored rows."""
    p = tl.exp(z - lse[:, None])
    dz = glp[:, None] * (tl.where(cols[None, :] == t[:, None], 1.0, 0.0) - p)
    if HAS_GENT:
        dz += gent[:, None] * p * (ez[:, None] - z)
    return dz


# Configs over the device's per-block shared memory (fp32 operands on sm_80) are dropped before
# the autotuner compiles them (kernels/_limits.py).
_PRUNE_FWD = _limits.pruner("_logprobs_fwd_kernel", "h_ptr", "w_ptr")
_PRUNE_BWD = _limits.pruner("_logprobs_bwd_kernel", "h_ptr", "w_ptr")


@triton.autotune(configs=_configs(_GEMM_CONFIGS, (16, 1024, 64)), key=["H", "V"],
                 prune_configs_by={"early_config_prune": _PRUNE_FWD})
@triton.jit
def _logprobs_fwd_kernel(h_ptr, w_ptr, t_ptr, m_ptr, s_ptr, a_ptr, zt_ptr,
                         N, V, H, stride_hn, stride_wv, v_per_split, inv_temp,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """grid (cdiv(N, BLOCK_N), n_split): partial (m, s, a, zt) of rows over vocab split pid(1);
    outputs [n_split, N] fp32."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    t = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    m = tl.full([BLOCK_N], -1e30, dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    a = tl.zeros([BLOCK_N], dtype=tl.float32)
    zt = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_wv,
                        BLOCK_N, BLOCK_V, BLOCK_K, UPCAST, PRECISION) * inv_temp
        m, s, a, zt = _online_update(m, s, a, zt, z, cols, t, row_ok[:, None] & col_ok[None, :])
    out = pid_s * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(a_ptr + out, a, mask=row_ok)
    tl.store(zt_ptr + out, zt, mask=row_ok)


@triton.autotune(configs=_configs(_GEMM_CONFIGS, (16, 1024, 64)), key=["H", "V"],
                 prune_configs_by={"early_config_prune": _PRUNE_BWD})
@triton.jit
def _logprobs_bwd_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, ez_ptr, glp_ptr, gent_ptr, dz_ptr,
                         N, V, H, stride_hn, stride_wv, stride_dz, inv_temp,
                         HAS_GENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                         BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """grid (cdiv(N, BLOCK_N), cdiv(V, BLOCK_V)) over one token chunk: dz[N, V] (already / T)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    z = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_wv,
                    BLOCK_N, BLOCK_V, BLOCK_K, UPCAST, PRECISION) * inv_temp
    t = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    glp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    ez = lse
    gent = glp
    if HAS_GENT:
        ez = tl.load(ez_ptr + rows, mask=row_ok, other=0.0)
        gent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
    dz = _dz_tile(z, cols, t, lse, ez, glp, gent, HAS_GENT) * inv_temp
    tl.store(dz_ptr + rows[:, None].to(tl.int64) * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------- launchers


def _combine(m, s, a, zt):
    """Merge per-split partials [n_split, N] -> (target logit, lse, E[z], entropy), each [N] fp32."""
    mx = m.max(0).values
    r = torch.exp(m - mx)
    s_tot = (r * s).sum(0)
    a_tot = (r * (a + (m - mx) * s)).sum(0)  # partials rebased to the global max
    log_s = torch.log(s_tot)
    lse = mx + log_s
    return zt.sum(0), lse, mx + a_tot / s_tot, log_s - a_tot / s_tot


def _n_split(n_rows: int, V: int, block_n: int, device: torch.device) -> int:
    """Enough vocab splits that the grid fills the GPU (~2 programs per SM) for small N."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    want = triton.cdiv(2 * sms, triton.cdiv(n_rows, block_n))
    return max(1, min(want, triton.cdiv(V, _SPLIT_ALIGN)))


def _split_partials(N, V, n_split, device):
    v_per_split = triton.cdiv(triton.cdiv(V, n_split), _SPLIT_ALIGN) * _SPLIT_ALIGN
    n_split = triton.cdiv(V, v_per_split)  # every split starts below V (no empty split)
    bufs = [new_output((n_split, N), torch.float32, device) for _ in range(4)]
    return v_per_split, n_split, bufs


def _gemm_flags(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[bool, str]:
    upcast = hidden.dtype != weight.dtype or (TRITON_INTERPRET and hidden.dtype == torch.bfloat16)
    fp32 = upcast or hidden.dtype == torch.float32
    # fp32 inputs get true fp32 products (torch's default, allow_tf32=False), not tf32.
    return upcast, ("ieee" if fp32 else "tf32")


def _check_gemm_inputs(hidden, weight, targets):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets [N] expected, got {tuple(targets.shape)} for hidden {tuple(hidden.shape)}")
    for x in (hidden, weight):
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"triton backend supports fp32/fp16/bf16, got {x.dtype}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The kernels take a row stride but need unit stride along H: a row-strided view (a slice of
    a larger buffer) is used as it is, without a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def logprobs_fwd_triton(hidden, weight, targets, inv_temp: float, n_split: int | None = None):
    """hidden [N, H], weight [V, H], targets [N] int -> (target logit, lse, E[z], entropy) [N] fp32."""
    _check_gemm_inputs(hidden, weight, targets)
    hidden, weight, targets = _rows(hidden), _rows(weight), targets.contiguous()
    (N, H), V = hidden.shape, weight.shape[0]
    n_split = n_split or _n_split(N, V, 64, hidden.device)
    v_per_split, n_split, (m, s, a, zt) = _split_partials(N, V, n_split, hidden.device)
    upcast, precision = _gemm_flags(hidden, weight)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), n_split)
    _logprobs_fwd_kernel[grid](hidden, weight, targets, m, s, a, zt, N, V, H, hidden.stride(0),
                               weight.stride(0), v_per_split, inv_temp, UPCAST=upcast, PRECISION=precision)
    return _combine(m, s, a, zt)


def logprobs_bwd_triton(hidden, weight, targets, lse, ez, g_lp, g_ent, inv_temp: float, chunk_size: int,
                        need_dw: bool = False):
    """(d hidden [N, H] in hidden's dtype, d weight [V, H] in weight's dtype or None). g_lp/g_ent [N]
    fp32 already zero on ignored rows; g_ent may be None. dz is materialized one token chunk at a time
    ([chunk, V] in the weight's dtype); d weight (only for a trainable head) sums dz.T @ h in fp32."""
    hidden, weight, targets = _rows(hidden), _rows(weight), targets.contiguous()
    (N, H), V = hidden.shape, weight.shape[0]
    upcast, precision = _gemm_flags(hidden, weight)
    has_gent = g_ent is not None
    dh = new_output((N, H), hidden.dtype, hidden.device)
    dz = new_output((min(chunk_size, N), V), weight.dtype, hidden.device)
    dw = torch.zeros((V, H), dtype=torch.float32, device=hidden.device) if need_dw else None
    for c0 in range(0, N, chunk_size):
        c1 = min(c0 + chunk_size, N)
        n = c1 - c0
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(V, meta["BLOCK_V"]))
        _logprobs_bwd_kernel[grid](hidden[c0:c1], weight, targets[c0:c1], lse[c0:c1],
                                   ez[c0:c1] if has_gent else lse[c0:c1], g_lp[c0:c1],
                                   g_ent[c0:c1] if has_gent else g_lp[c0:c1], dz, n, V, H,
                                   hidden.stride(0), weight.stride(0), dz.stride(0), inv_temp,
                                   HAS_GENT=has_gent, UPCAST=upcast, PRECISION=precision)
        dh[c0:c1] = (dz[:n] @ weight).to(hidden.dtype)  # [n, V] @ [V, H]: cuBLAS on GPU
        if need_dw:
            dw += (dz[:n].T @ hidden[c0:c1].to(dz.dtype)).float()  # [V, n] @ [n, H]
    return dh, None if dw is None else dw.to(weight.dtype)


# ---------------------------------------------------------------------- chunked torch implementation


_TORCH_TILE = 1 << 22  # fp32 elements per (token x vocab) tile: 16 MB
_TORCH_VCHUNK = 8192


def _torch_chunks(N, V, chunk_size):
    vc = min(V, _TORCH_VCHUNK)
    nc = chunk_size or max(16, _TORCH_TILE // vc)
    return nc, vc


def _ct(*xs):  # compute dtype: fp32, or fp64 when an input is fp64 (gradcheck)
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def logprobs_fwd_torch(hidden, weight, targets, inv_temp, chunk_size=None, entropy=True):
    """Same contract as logprobs_fwd_triton; tiles of [chunk, 8192] logits in fp32, worked on in place
    (one tile alive). entropy=False skips the entropy accumulator (E[z] and entropy are then junk)."""
    (N, _), V = hidden.shape, weight.shape[0]
    ct = _ct(hidden, weight)
    nc, vc = _torch_chunks(N, V, chunk_size)
    outs = []
    for c0 in range(0, N, nc):
        h = hidden[c0:c0 + nc].to(ct)
        t = targets[c0:c0 + nc]
        parts = []  # per vocab chunk: (m, s, a, zt), each [n]
        for v0 in range(0, V, vc):
            w = weight[v0:v0 + vc].to(ct)  # upcasts one vocab slice only
            z = h @ w.T  # (n, vc)
            if inv_temp != 1.0:
                z.mul_(inv_temp)
            inside = (t >= v0) & (t < v0 + w.shape[0])
            zt = z.gather(1, (t - v0).clamp(0, w.shape[0] - 1)[:, None]).squeeze(1)
            if entropy:
                m = z.amax(1)
                d = z.sub_(m[:, None])  # z - m, in place
                e = d.exp()
                s_k = e.sum(1)
                a_k = e.mul_(d).sum(1)
                del d, e
            else:  # (m, s) = (lse of the chunk, 1): one fused pass
                m = torch.logsumexp(z, 1)
                s_k, a_k = torch.ones_like(m), torch.zeros_like(m)
            parts.append((m, s_k, a_k, torch.where(inside, zt, 0.0)))
            del z
        outs.append(_combine(*(torch.stack(p) for p in zip(*parts))))
    return tuple(torch.cat(o) for o in zip(*outs))


def logprobs_bwd_torch(hidden, weight, targets, lse, ez, g_lp, g_ent, inv_temp, chunk_size=None,
                       need_dw=False):
    """Same contract as logprobs_bwd_triton, recomputing [chunk, 8192] fp32 tiles."""
    (N, H), V = hidden.shape, weight.shape[0]
    ct = _ct(hidden, weight)
    nc, vc = _torch_chunks(N, V, chunk_size)
    dh = torch.empty((N, H), dtype=hidden.dtype, device=hidden.device)
    dw = torch.zeros((V, H), dtype=ct, device=hidden.device) if need_dw else None
    for c0 in range(0, N, nc):
        h = hidden[c0:c0 + nc].to(ct)
        t, lse_c, g = targets[c0:c0 + nc], lse[c0:c0 + nc, None].to(ct), g_lp[c0:c0 + nc].to(ct)
        acc = torch.zeros(h.shape, dtype=ct, device=h.device)
        for v0 in range(0, V, vc):
            w = weight[v0:v0 + vc].to(ct)
            logp = (h @ w.T).mul_(inv_temp).sub_(lse_c)  # (n, vc) log p = z - lse, in place
            p = logp.exp()
            if g_ent is None:
                dz = p.mul_(-g[:, None])
            else:  # g_ent * p * (E[z] - z) = g_ent * p * ((E[z] - lse) - log p), then - g * p
                ez_c = ez[c0:c0 + nc, None].to(ct) - lse_c
                dz = logp.neg_().add_(ez_c).mul_(p).mul_(g_ent[c0:c0 + nc, None].to(ct))
                dz.addcmul_(p, g[:, None], value=-1.0)
            inside = (t >= v0) & (t < v0 + w.shape[0])
            idx = (t - v0).clamp(0, w.shape[0] - 1)[:, None]
            dz.scatter_add_(1, idx, torch.where(inside, g, 0.0)[:, None])  # + g * onehot(target)
            acc.addmm_(dz, w)
            if need_dw:
                dw[v0:v0 + vc].addmm_(dz.T, h, alpha=inv_temp)
            del logp, p, dz
        dh[c0:c0 + nc] = (acc * inv_temp).to(hidden.dtype)
    return dh, None if dw is None else dw.to(weight.dtype)


# -------------------------------------------------------------------------------- autograd Functions


def _valid_grads(valid, g_lp, g_ent, ct):
    """Upstream grads as [N] compute-dtype tensors, zero on ignored rows; g_ent None if unused."""
    g_lp = torch.zeros(valid.shape, dtype=ct, device=valid.device) if g_lp is None else g_lp.to(ct)
    g_lp = torch.where(valid, g_lp, 0.0)
    if g_ent is not None:
        g_ent = torch.where(valid, g_ent.to(ct), 0.0)
    return g_lp.contiguous(), None if g_ent is None else g_ent.contiguous()


class TokenLogprobsFunction(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], targets [N]) -> (logprobs [N], entropy [N]); grad: hidden, and the
    weight only when it requires grad (a trainable head, full-fine-tune SFT)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, backend, chunk_size, entropy):
        inv_temp = 1.0 / float(temperature)
        if backend == "triton":  # the entropy accumulator costs nothing measurable in registers
            zt, lse, ez, ent = logprobs_fwd_triton(hidden, weight, targets, inv_temp)
        else:
            zt, lse, ez, ent = logprobs_fwd_torch(hidden, weight, targets, inv_temp, chunk_size, entropy)
        if not entropy:  # not returned to the caller, so no gradient can arrive through it
            ent = torch.zeros_like(lse)
        valid = targets != ignore_index
        ctx.save_for_backward(hidden, weight, targets, lse, ez, valid)
        ctx.inv_temp, ctx.backend, ctx.chunk_size = inv_temp, backend, chunk_size
        ctx.set_materialize_grads(False)
        return torch.where(valid, zt - lse, 0.0), torch.where(valid, ent, 0.0)

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, targets, lse, ez, valid = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dh or need_dw) or (g_lp is None and g_ent is None):
            return (None,) * 8
        g_lp, g_ent = _valid_grads(valid, g_lp, g_ent, lse.dtype)
        if ctx.backend == "triton":
            N, V = hidden.shape[0], weight.shape[0]
            chunk = ctx.chunk_size or max(64, ((1 << 26) // V) // 64 * 64)  # dz chunk ~2**26 elements
            dh, dw = logprobs_bwd_triton(hidden, weight, targets, lse, ez, g_lp, g_ent, ctx.inv_temp,
                                         min(chunk, N), need_dw)
        else:
            dh, dw = logprobs_bwd_torch(hidden, weight, targets, lse, ez, g_lp, g_ent, ctx.inv_temp,
                                        ctx.chunk_size, need_dw)
        return dh if need_dh else None, dw, None, None, None, None, None, None


# ------------------------------------------------------------------------------------- public API


def _check_common(temperature, targets, lead_shape):
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if tuple(targets.shape) != tuple(lead_shape):
        raise ValueError(f"targets {tuple(targets.shape)} must match the leading dims {tuple(lead_shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64/int32, got {targets.dtype}")


def token_logprobs(hidden, weight, targets, temperature=1.0, ignore_index=-100,
                   return_entropy=False, backend=None, chunk_size=None, *, weight_grad=False):
    """hidden [..., H] (float32/16, bf16), weight [V, H] frozen, targets [...] int64.

    Returns logprobs [...] float32 (0.0 where targets == ignore_index), or (logprobs, entropy) when
    return_entropy=True (entropy [...] float32, 0 at ignored rows). Logits are hidden @ weight.T /
    temperature, accumulated in fp32 and never materialized beyond one tile/chunk. Differentiable
    w.r.t. hidden through BOTH outputs. Targets must lie in [0, V) except for ignore_index.
    ``chunk_size``: tokens per chunk of the torch backend and of the triton backward (None: auto).
    The head is frozen by default: a weight that requires grad is an error (pass ``weight.detach()``)
    unless ``weight_grad=True`` (trainable head, full-fine-tune SFT), which also returns d weight
    (an fp32 [V, H] accumulator in backward).
    """
    _check_common(temperature, targets, hidden.shape[:-1])
    if weight.requires_grad and torch.is_grad_enabled() and not weight_grad:
        raise ValueError("weight requires grad but the head is frozen by default; pass weight.detach(), "
                         "or weight_grad=True for a trainable head")
    backend = resolve_backend(backend, hidden)
    lead = targets.shape
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long()  # (N, H), (N,)
    lp, ent = TokenLogprobsFunction.apply(flat_h, weight, flat_t, temperature, ignore_index, backend,
                                          chunk_size, return_entropy)
    lp, ent = lp.reshape(lead), ent.reshape(lead)
    return (lp, ent) if return_entropy else lp


def token_logprobs_reference(hidden, weight, targets, temperature=1.0, ignore_index=-100,
                             return_entropy=False):
    """Naive: log_softmax(hidden @ weight.T / T) + gather, fp32 (fp64 for fp64 inputs)."""
    ct = _ct(hidden, weight)
    logits = hidden.to(ct) @ weight.to(ct).T  # (..., V): the full logits
    return _logprobs_of_logits(logits, targets, temperature, ignore_index, return_entropy)


def _logprobs_of_logits(logits, targets, temperature=1.0, ignore_index=-100, return_entropy=False):
    """The reference's core on materialized logits [..., V] (any float dtype; fp32 maths, fp64 for fp64)."""
    logp = torch.log_softmax(logits.to(_ct(logits)) / temperature, dim=-1)  # (..., V)
    valid = targets != ignore_index
    lp = logp.gather(-1, torch.where(valid, targets, 0).long().unsqueeze(-1)).squeeze(-1)
    lp = torch.where(valid, lp, 0.0)
    if not return_entropy:
        return lp
    ent = -(logp.exp() * logp).sum(-1)
    return lp, torch.where(valid, ent, 0.0)


def kl_penalty(logprobs, ref_logprobs, estimator="k1"):
    """Per-token KL(pi || ref) estimate from sampled-token log-probs (elementwise, differentiable).

    k1: logp - ref (unbiased, can be negative); k1_clamp: clamp(logp - ref, min=0) (the original
    LLaVA-RLHF / AlpacaFarm recipe); k2: (logp - ref)^2 / 2; k3: exp(ref - logp) - (ref - logp) - 1
    (unbiased, >= 0), written with expm1 so it stays accurate when logp ~ ref.
    """
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k1_clamp":
        return d.clamp(min=0)
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
