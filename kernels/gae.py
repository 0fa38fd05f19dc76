"""Generalized advantage estimation (GAE) and masked whitening, one Triton kernel per pass.

Every PPO codebase we compared (TRL, OpenRLHF, verl, LLaVA-RLHF) runs GAE as a Python loop over
reversed time: T small kernel launches per batch. Here it is one launch.

Semantics (verl's ``compute_gae_advantage_return``, with masked positions *skipped*)::

    nextvalue = 0; lastgaelam = 0                      # the value after the last valid token is 0
    for t = T-1 .. 0:
        if mask[t]:
            delta      = r[t] + gamma * nextvalue - v[t]
            lastgaelam = delta + gamma * lam * lastgaelam
            nextvalue  = v[t]
            adv[t] = lastgaelam; ret[t] = lastgaelam + v[t]
        else:                                          # carried unchanged to earlier steps
            adv[t] = ret[t] = 0

So left padding, right padding and holes all work; rewards/values at masked positions are never
read into the result (they may hold anything, NaN included).

How the kernel does it: each step is an affine map of the carried state ``(A, V)`` =
``(lastgaelam, nextvalue)``::

    valid:  A <- gamma*lam*A + gamma*V + (r - v),   V <- v
    masked: A <- A,                                 V <- V

Affine maps compose associatively, so one program per block of rows loads a coalesced tile
``[BLOCK_B, CHUNK_T]`` (time reversed inside the tile), composes the maps with
``tl.associative_scan`` and applies the composition to the state carried in from the later
chunk. A map ``(A, V) -> (c*A + g*V + a, k*V + b)`` is 5 numbers (the V row never reads A), so
the scan carries 5 tensors. Chunks run from the end of the sequence to its start; each chunk's
loads are issued before the previous chunk's scan so memory latency overlaps compute.
All math is fp32 whatever the input dtype; outputs are fp32.

Masked whitening (``masked_whiten``): mean/variance over the valid tokens of the whole tensor
(as TRL/verl whiten advantages), in three small launches: per-block (count, mean, M2) partials,
one program that merges them with Chan's parallel formula (no ``E[x^2]-E[x]^2`` cancellation),
and an elementwise apply. No host sync anywhere.

Fewer than two valid tokens (documented behaviour, tested): the variance is taken as 0, so with
one valid token the result there is ``0`` (``x`` itself when ``shift_mean=False``) and with none
the result is all zeros. No NaN, no error (raising would need a device->host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from factrl.kernels._backend import new_output, resolve_backend

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _gae_combine(c1, g1, k1, a1, b1, c2, g2, k2, a2, b2):
    # Forward scan over a time-reversed tile: (1) is the already composed map of the *later*
    # steps h, (2) the map of the next *earlier* step f. Returns f o h:
    #   f(h(A, V)) = (c2*c1) A + (c2*g1 + g2*k1) V + (c2*a1 + g2*b1 + a2),  V: (k2*k1) V + (k2*b1 + b2)
    return c2 * c1, c2 * g1 + g2 * k1, k2 * k1, c2 * a1 + g2 * b1 + a2, k2 * b1 + b2


@triton.jit
def _gae_load_chunk(r_ptr, v_ptr, m_ptr, rows64, row_ok, t, stride_r, stride_v, stride_m):
    ok = row_ok[:, None] & (t >= 0)[None, :]  # (BLOCK_B, CHUNK_T)
    r = tl.load(r_ptr + rows64[:, None] * stride_r + t[None, :], mask=ok, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + rows64[:, None] * stride_v + t[None, :], mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + rows64[:, None] * stride_m + t[None, :], mask=ok, other=0)
    valid = (m != 0) & ok  # out-of-range steps count as masked: the identity map
    return r, v, valid


@triton.jit
def _gae_fwd_kernel(
    r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr,  # [B, T] each, unit stride along T
    B, T, stride_r, stride_v, stride_m, stride_o,
    gamma, gamma_lam,  # fp32 scalars
    BLOCK_B: tl.constexpr, CHUNK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)  # B*T may pass 2**31
    j = tl.arange(0, CHUNK_T)  # 0 = the latest step of the chunk
    is_first = (j == CHUNK_T - 1)[None, :]  # the chunk's earliest step: its state is the carry
    state_a = tl.zeros([BLOCK_B], dtype=tl.float32)  # lastgaelam after the later chunks
    state_v = tl.zeros([BLOCK_B], dtype=tl.float32)  # nextvalue (0 after the episode end)

    t = T - 1 - j
    r, v, valid = _gae_load_chunk(r_ptr, v_ptr, m_ptr, rows64, row_ok, t, stride_r, stride_v, stride_m)
    n_chunks = tl.cdiv(T, CHUNK_T)
    for ci in range(0, n_chunks):
        # Issue the loads of the next (earlier) chunk first; fully masked past the start.
        t_next = t - CHUNK_T
        r_n, v_n, valid_n = _gae_load_chunk(r_ptr, v_ptr, m_ptr, rows64, row_ok, t_next,
                                            stride_r, stride_v, stride_m)
        # Per-step maps (BLOCK_B, CHUNK_T); masked steps are the identity.
        c = tl.where(valid, gamma_lam, 1.0)
        g = tl.where(valid, gamma, 0.0)
        k = tl.where(valid, 0.0, 1.0)
        a = tl.where(valid, r - v, 0.0)
        b = tl.where(valid, v, 0.0)
        c, g, k, a, b = tl.associative_scan((c, g, k, a, b), axis=1, combine_fn=_gae_combine)
        # Apply each step's suffix composition to the state carried in from the later chunk.
        A = c * state_a[:, None] + g * state_v[:, None] + a
        V = k * state_v[:, None] + b
        ok = row_ok[:, None] & (t >= 0)[None, :]
        offs = rows64[:, None] * stride_o + t[None, :]
        tl.store(adv_ptr + offs, tl.where(valid, A, 0.0), mask=ok)
        tl.store(ret_ptr + offs, tl.where(valid, A + v, 0.0), mask=ok)
        state_a = tl.sum(tl.where(is_first, A, 0.0), axis=1)
        state_v = tl.sum(tl.where(is_first, V, 0.0), axis=1)
        t = t_next
        r, v, valid = r_n, v_n, valid_n


@triton.jit
def _whiten_stats_kernel(x_ptr, m_ptr, part_ptr, N, P, BLOCK: tl.constexpr):
    # One block of the flattened tensor -> (count, mean, M2) at part[0|1|2, pid]; part is [3, P].
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    valid = (tl.load(m_ptr + offs, mask=ok, other=0) != 0) & ok
    n = tl.sum(valid.to(tl.float32), axis=0)
    mean = tl.sum(tl.where(valid, x, 0.0), axis=0) / tl.maximum(n, 1.0)
    d = tl.where(valid, x - mean, 0.0)  # two-pass inside the block: no cancellation
    tl.store(part_ptr + pid, n)
    tl.store(part_ptr + P + pid, mean)
    tl.store(part_ptr + 2 * P + pid, tl.sum(d * d, axis=0))


@triton.jit
def _whiten_combine_kernel(part_ptr, stats_ptr, P, eps, UNBIASED: tl.constexpr, BLOCK_P: tl.constexpr):
    # Single program. Chan et al.: mean = sum n_i mean_i / n;  M2 = sum M2_i + n_i (mean_i - mean)^2.
    i = tl.arange(0, BLOCK_P)
    n_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    s_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ok = p0 + i < P
        n_i = tl.load(part_ptr + p0 + i, mask=ok, other=0.0)
        mean_i = tl.load(part_ptr + P + p0 + i, mask=ok, other=0.0)
        n_acc += n_i
        s_acc += n_i * mean_i
    n = tl.sum(n_acc, axis=0)
    mean = tl.sum(s_acc, axis=0) / tl.maximum(n, 1.0)
    m2_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ok = p0 + i < P
        n_i = tl.load(part_ptr + p0 + i, mask=ok, other=0.0)
        mean_i = tl.load(part_ptr + P + p0 + i, mask=ok, other=0.0)
        m2_i = tl.load(part_ptr + 2 * P + p0 + i, mask=ok, other=0.0)
        dm = mean_i - mean
        m2_acc += m2_i + n_i * dm * dm
    m2 = tl.sum(m2_acc, axis=0)
    if UNBIASED:
        denom = n - 1.0
    else:
        denom = n
    var = tl.where(n >= 2.0, m2 / tl.maximum(denom, 1.0), 0.0)  # < 2 valid tokens: variance 0
    tl.store(stats_ptr, mean)
    tl.store(stats_ptr + 1, 1.0 / tl.sqrt_rn(var + eps))  # sqrt_rn: IEEE, not the approximate sqrt


@triton.jit
def _whiten_apply_kernel(x_ptr, m_ptr, stats_ptr, out_ptr, N, SHIFT_MEAN: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    valid = tl.load(m_ptr + offs, mask=ok, other=0) != 0
    mean = tl.load(stats_ptr)
    rstd = tl.load(stats_ptr + 1)
    y = (x - mean) * rstd
    if not SHIFT_MEAN:
        y = y + mean
    tl.store(out_ptr + offs, tl.where(valid, y, 0.0), mask=ok)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _check_inputs(rewards, values, mask):
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, T], got shape {tuple(rewards.shape)}")
    if values.shape != rewards.shape or mask.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same [B, T] shape")
    if not (rewards.is_floating_point() and values.is_floating_point()):
        raise TypeError(f"rewards and values must be floating point, got {rewards.dtype}, {values.dtype}")
    if not (rewards.device == values.device == mask.device):
        raise ValueError(f"inputs on different devices: {rewards.device}, {values.device}, {mask.device}")


def _mask_for_kernel(mask: torch.Tensor) -> torch.Tensor:
    # Kernels test ``!= 0``; bool is reinterpreted as uint8 (no copy) so every dtype loads the same way.
    mask = mask.detach()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _row_major(x: torch.Tensor) -> torch.Tensor:
    # The kernels take a row stride but need unit stride along T.
    return x if x.stride(-1) == 1 else x.contiguous()


def _gae_config(B: int, T: int) -> tuple[int, int, int]:
    """(BLOCK_B, CHUNK_T, num_warps). Rows per program are few enough to keep ~256 programs busy
    (every program is a sequential chain over its chunks); tiles stay <= 2048 elements because
    the scan keeps 5 fp32 values per element in registers."""
    block_b = min(16, triton.next_power_of_2(triton.cdiv(B, 256)))
    chunk_t = max(16, min(256, triton.next_power_of_2(T), 2048 // block_b))
    num_warps = 4 if block_b * chunk_t <= 1024 else 8
    return block_b, chunk_t, num_warps


def gae_triton(rewards, values, mask, gamma=1.0, lam=1.0, block_b=None, chunk_t=None, num_warps=None):
    """Launcher for :func:`gae` (``backend='triton'``). Tile sizes may be forced (tests, tuning)."""
    _check_inputs(rewards, values, mask)
    B, T = rewards.shape
    adv = new_output((B, T), torch.float32, rewards.device)
    ret = new_output((B, T), torch.float32, rewards.device)
    if B == 0 or T == 0:
        return adv, ret
    r, v, m = _row_major(rewards.detach()), _row_major(values.detach()), _row_major(_mask_for_kernel(mask))
    bb, ct, nw = _gae_config(B, T)
    bb, ct, nw = block_b or bb, chunk_t or ct, num_warps or nw
    grid = (triton.cdiv(B, bb),)
    _gae_fwd_kernel[grid](r, v, m, adv, ret, B, T, r.stride(0), v.stride(0), m.stride(0), adv.stride(0),
                          float(gamma), float(gamma) * float(lam), BLOCK_B=bb, CHUNK_T=ct, num_warps=nw)
    return adv, ret


def masked_whiten_triton(x, mask, shift_mean=True, unbiased=True, eps=1e-8, block=4096, block_p=1024):
    """Launcher for :func:`masked_whiten` (``backend='triton'``): stats, combine, apply."""
    if x.shape != mask.shape:
        raise ValueError(f"x {tuple(x.shape)} and mask {tuple(mask.shape)} must have the same shape")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    out = new_output(x.shape, torch.float32, x.device)
    N = x.numel()
    if N == 0:
        return out
    xf = x.detach().contiguous().view(-1)
    mf = _mask_for_kernel(mask).contiguous().view(-1)
    P = triton.cdiv(N, block)
    part = new_output((3, P), torch.float32, x.device)  # (count, mean, M2) per block
    stats = new_output((2,), torch.float32, x.device)  # (mean, rstd)
    _whiten_stats_kernel[(P,)](xf, mf, part, N, P, BLOCK=block, num_warps=8)
    _whiten_combine_kernel[(1,)](part, stats, P, float(eps), UNBIASED=bool(unbiased), BLOCK_P=block_p,
                                 num_warps=4)
    _whiten_apply_kernel[(P,)](xf, mf, stats, out.view(-1), N, SHIFT_MEAN=bool(shift_mean), BLOCK=block,
                               num_warps=8)
    return out


# ---------------------------------------------------------------------------------------------
# Vectorized torch path (the CPU default): no Python loop over T
# ---------------------------------------------------------------------------------------------


def gae_torch(rewards, values, mask, gamma=1.0, lam=1.0):
    """GAE in O(log T) vectorized torch ops: the next valid value by a reverse ``cummin`` over
    indices, then the scalar recurrence ``A_t = delta_t + a_t A_{t+1}`` by a doubling scan."""
    _check_inputs(rewards, values, mask)
    B, T = rewards.shape
    r, v = rewards.detach().float(), values.detach().float()
    valid = mask.detach() != 0
    if B == 0 or T == 0:
        z = torch.zeros(B, T, dtype=torch.float32, device=r.device)
        return z, z.clone()
    pos = torch.arange(T, device=r.device).expand(B, T)
    idx = torch.where(valid, pos, T)  # (B, T): own index if valid, T (= "after the end") if not
    first_at_or_after = idx.flip(1).cummin(1).values.flip(1)  # (B, T)
    nxt = torch.cat([first_at_or_after[:, 1:], idx.new_full((B, 1), T)], dim=1)  # first valid s > t
    v_pad = torch.cat([torch.where(valid, v, 0.0), v.new_zeros(B, 1)], dim=1)  # (B, T+1), v[T] = 0
    next_value = v_pad.gather(1, nxt)  # (B, T)
    acc = torch.where(valid, r + gamma * next_value - v, 0.0)  # delta, 0 where masked
    coef = torch.where(valid, torch.tensor(gamma * lam, dtype=torch.float32, device=r.device), 1.0)
    d = 1
    while d < T:  # Hillis-Steele: acc[t] composes steps t .. t+2d-1 after this round
        acc = torch.cat([acc[:, : T - d] + coef[:, : T - d] * acc[:, d:], acc[:, T - d:]], dim=1)
        if 2 * d < T:
            coef = torch.cat([coef[:, : T - d] * coef[:, d:], coef[:, T - d:]], dim=1)
        d *= 2
    adv = torch.where(valid, acc, 0.0)
    ret = torch.where(valid, acc + v, 0.0)
    return adv, ret


def masked_whiten_torch(x, mask, shift_mean=True, unbiased=True, eps=1e-8):
    """Masked whitening in torch without boolean indexing (no host sync)."""
    if x.shape != mask.shape:
        raise ValueError(f"x {tuple(x.shape)} and mask {tuple(mask.shape)} must have the same shape")
    xf = x.detach().float()
    valid = mask.detach() != 0
    n = valid.sum().float()
    mean = torch.where(valid, xf, 0.0).sum() / n.clamp(min=1.0)
    centered = torch.where(valid, xf - mean, 0.0)
    m2 = (centered * centered).sum()
    var = torch.where(n >= 2, m2 / (n - 1.0 if unbiased else n).clamp(min=1.0), 0.0)
    y = centered * torch.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return torch.where(valid, y, 0.0)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def gae(rewards, values, mask, gamma=1.0, lam=1.0, backend=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), fp32 ``[B, T]``, 0 where ``mask`` is 0.

    rewards, values: float ``[B, T]`` (any float dtype; fp32 math). mask: ``[B, T]`` bool or
    numeric, nonzero = valid. See the module docstring for the exact recurrence.
    """
    backend = resolve_backend(backend, rewards)
    if backend == "triton":
        return gae_triton(rewards, values, mask, gamma, lam)
    return gae_torch(rewards, values, mask, gamma, lam)


def gae_reference(rewards, values, mask, gamma=1.0, lam=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward Python loop over reversed time (verl-style, masked steps skipped).

    Computes in fp32, or fp64 when given fp64 inputs (the tests' exact "truth")."""
    _check_inputs(rewards, values, mask)
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    r, v = rewards.detach().to(dtype), values.detach().to(dtype)
    valid = mask.detach() != 0
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=dtype, device=r.device)
    lastgaelam = torch.zeros(B, dtype=dtype, device=r.device)
    nextvalues = torch.zeros(B, dtype=dtype, device=r.device)
    for t in reversed(range(T)):
        m = valid[:, t]
        delta = r[:, t] + gamma * nextvalues - v[:, t]
        cur = delta + gamma * lam * lastgaelam
        adv[:, t] = torch.where(m, cur, 0.0)
        lastgaelam = torch.where(m, cur, lastgaelam)
        nextvalues = torch.where(m, v[:, t], nextvalues)
    return adv, torch.where(valid, adv + v, 0.0)


def masked_whiten(x, mask, shift_mean=True, unbiased=True, eps=1e-8, backend=None) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the valid tokens of the whole tensor, fp32, 0 where masked.

    ``shift_mean=False`` adds the mean back (TRL's option); ``unbiased`` divides M2 by n-1
    instead of n. Fewer than two valid tokens: variance 0 (see the module docstring).
    """
    backend = resolve_backend(backend, x)
    if backend == "triton":
        return masked_whiten_triton(x, mask, shift_mean, unbiased, eps)
    return masked_whiten_torch(x, mask, shift_mean, unbiased, eps)


def masked_whiten_reference(x, mask, shift_mean=True, unbiased=True, eps=1e-8) -> torch.Tensor:
    """Straightforward: gather the valid tokens, ``mean()`` and ``var()`` them (fp32, fp64 for fp64)."""
    if x.shape != mask.shape:
        raise ValueError(f"x {tuple(x.shape)} and mask {tuple(mask.shape)} must have the same shape")
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.detach().to(dtype)
    valid = mask.detach() != 0
    vals = xf[valid]
    if vals.numel() == 0:
        return torch.zeros_like(xf)
    mean = vals.mean()
    var = vals.var(correction=1 if unbiased else 0) if vals.numel() >= 2 else torch.zeros_like(mean)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return torch.where(valid, y, 0.0)


def masked_mean(x, mask, dim=None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is nonzero (over ``dim``, or everything).

    Differentiable in ``x``. Masked entries are never read into the sum (NaN there is harmless).
    An empty selection gives 0, not NaN. Float ``x`` keeps its dtype; integer ``x`` gives fp32.
    """
    valid = mask != 0
    xf = x if x.is_floating_point() else x.float()
    total = torch.where(valid, xf, torch.zeros((), dtype=xf.dtype, device=xf.device))
    # Integer counts: exact at any length, and ``float / int`` keeps the float dtype.
    if dim is None:
        return total.sum() / valid.sum().clamp(min=1)
    return total.sum(dim) / valid.sum(dim).clamp(min=1)
