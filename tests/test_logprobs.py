"""kernels/logprobs.py: fused lm_head -> token log-probs / entropy / KL against log_softmax + gather.

Tolerances come from the dtype's own error: every result is compared with an fp64 "truth", and our
error must be within a small factor of what the naive PyTorch pipeline in the same input dtype gets
(``_naive``: logits in the input dtype, then log_softmax in fp32), plus a floor of a few ulps of
the output dtype. CPU runs fp32/fp16 (the Triton path through TRITON_INTERPRET=1); bf16 on GPU.
"""

import math

import pytest
import torch

from factrl.kernels import _backend
from factrl.kernels import logprobs as L

FACTOR = 4.0
BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # launcher-allocated buffers start as NaN: any element a kernel forgets to write fails the test
    monkeypatch.setattr(_backend, "POISON_OUTPUTS", True)


def _assert_within(ours, base, truth, what):
    ours, base, truth = ours.detach(), base.detach(), truth.detach()
    assert ours.shape == truth.shape, what
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    scale = max(1.0, truth.abs().max().item())
    err = (ours.double() - truth).abs().max().item()
    err_base = (base.double() - truth).abs().max().item()
    floor = 4 * torch.finfo(ours.dtype).eps * scale
    assert err <= FACTOR * err_base + floor, f"{what}: err {err:.3g}, naive {err_base:.3g}, floor {floor:.3g}"


def _inputs(N, H, V, dtype, scale=1.0, device="cpu"):
    """hidden/weight scaled so logits are O(scale * 3): a realistic spread of log-probs."""
    hidden = (torch.randn(N, H, device=device) * scale * 3 / math.sqrt(H)).to(dtype)
    weight = torch.randn(V, H, device=device).to(dtype)
    targets = torch.randint(0, V, (N,), device=device)
    return hidden, weight, targets


def _naive(hidden, weight, targets, temperature=1.0, ignore_index=-100, return_entropy=True):
    """What plain PyTorch does in the input dtype: logits in that dtype, log_softmax in fp32."""
    logits = (hidden @ weight.T).float()  # (N, V), rounded to the input dtype first
    return L._logprobs_of_logits(logits, targets, temperature, ignore_index, return_entropy)


def _run(fn, hidden, weight, targets, g_lp, g_ent, **kw):
    """(logprobs, entropy, d hidden) for the loss sum(g_lp * lp + g_ent * ent)."""
    h = hidden.detach().clone().requires_grad_()
    lp, ent = fn(h, weight, targets, return_entropy=True, **kw)
    loss = (lp * g_lp).sum() if g_ent is None else (lp * g_lp + ent * g_ent).sum()
    loss.backward()
    return lp, ent, h.grad


def _check_against_truth(hidden, weight, targets, backend, temperature=1.0, ignore_index=-100,
                         chunk_size=None, entropy_grad=True):
    N = targets.shape[0]
    g_lp = torch.randn(N, device=hidden.device)
    g_ent = torch.randn(N, device=hidden.device) if entropy_grad else None
    kw = dict(temperature=temperature, ignore_index=ignore_index)
    ours = _run(L.token_logprobs, hidden, weight, targets, g_lp, g_ent, backend=backend,
                chunk_size=chunk_size, **kw)
    base = _run(_naive, hidden, weight, targets, g_lp, g_ent, **kw)
    truth = _run(L.token_logprobs_reference, hidden.double(), weight.double(), targets, g_lp.double(),
                 None if g_ent is None else g_ent.double(), **kw)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    assert ours[2].dtype == hidden.dtype
    for name, o, b, t in zip(("logprobs", "entropy", "d hidden"), ours, base, truth):
        _assert_within(o, b, t, f"{backend} {hidden.dtype} {name}")
    return ours


# --------------------------------------------------------------------------- hidden @ W -> log-probs


CASES = [  # (N, H, V, temperature, chunk_size)
    (5, 77, 1000, 1.0, None),
    (37, 33, 1000, 0.7, 16),  # several token chunks, a partial last one
    (19, 130, 517, 1.6, 8),
    (3, 20, 32001, 0.9, None),  # V = 32001: partial last vocab tile
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,H,V,temperature,chunk_size", CASES)
def test_token_logprobs_matches_reference(backend, dtype, N, H, V, temperature, chunk_size):
    hidden, weight, targets = _inputs(N, H, V, dtype)
    targets[0] = V - 1  # the last (partial) vocab tile holds a target
    _check_against_truth(hidden, weight, targets, backend, temperature, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprob_only_gradient(backend):
    # entropy unused by the loss: its gradient arrives as None (materialize_grads=False)
    hidden, weight, targets = _inputs(23, 45, 300, torch.float32)
    _check_against_truth(hidden, weight, targets, backend, 1.3, entropy_grad=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_only_gradient(backend):
    hidden, weight, targets = _inputs(11, 40, 300, torch.float32)
    h = hidden.clone().requires_grad_()
    h_ref = hidden.double().requires_grad_()
    g = torch.randn(11)
    (L.token_logprobs(h, weight, targets, 0.8, return_entropy=True, backend=backend)[1] * g).sum().backward()
    (L.token_logprobs_reference(h_ref, weight.double(), targets, 0.8, return_entropy=True)[1] * g.double()
     ).sum().backward()
    base = _run(_naive, hidden, weight, targets, torch.zeros(11), g, temperature=0.8)[2]
    assert h.grad.abs().max() > 0
    _assert_within(h.grad, base, h_ref.grad, f"{backend} entropy-only d hidden")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_extreme_logits_stay_finite_and_correct(backend, temperature):
    # logits of size ~1e4: exp overflows without the running max; entropy needs (z - m) accumulation
    hidden, weight, targets = _inputs(9, 64, 700, torch.float32, scale=3e3)
    lp, ent, dh = _check_against_truth(hidden, weight, targets, backend, temperature)
    logits = hidden.double() @ weight.double().T
    assert logits.abs().max() > 5e3
    assert lp.min() < -1e3  # some targets really are far out in the tail
    assert torch.isfinite(dh).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [-100, 7])
def test_ignored_targets(backend, ignore_index):
    hidden, weight, targets = _inputs(21, 30, 260, torch.float32)
    targets[targets == ignore_index] = 8
    ignored = torch.zeros(21, dtype=torch.bool)
    ignored[[0, 4, 5, 20]] = True
    targets[ignored] = ignore_index
    lp, ent, dh = _check_against_truth(hidden, weight, targets, backend, 1.2, ignore_index=ignore_index,
                                       chunk_size=8)
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all() and (dh[ignored] == 0).all()
    assert (lp[~ignored] < 0).all() and (ent[~ignored] > 0).all() and (dh[~ignored].abs().sum(1) > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_targets_ignored(backend):
    hidden, weight, _ = _inputs(6, 16, 100, torch.float32)
    targets = torch.full((6,), -100)
    h = hidden.clone().requires_grad_()
    lp, ent = L.token_logprobs(h, weight, targets, return_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    assert (lp == 0).all() and (ent == 0).all() and (h.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims(backend):
    B, T, H, V = 2, 7, 24, 150
    hidden = torch.randn(B, T, H) * 0.5
    weight = torch.randn(V, H)
    targets = torch.randint(0, V, (B, T))
    targets[1, -3:] = -100
    lp, ent = L.token_logprobs(hidden, weight, targets, 0.9, return_entropy=True, backend=backend)
    lp_flat, ent_flat = L.token_logprobs(hidden.reshape(-1, H), weight, targets.reshape(-1), 0.9,
                                         return_entropy=True, backend=backend)
    assert lp.shape == (B, T) and ent.shape == (B, T)
    lp32 = L.token_logprobs(hidden, weight, targets.int(), 0.9, backend=backend)  # int32 targets too
    torch.testing.assert_close(lp32, lp, atol=0, rtol=0)
    torch.testing.assert_close(lp.reshape(-1), lp_flat, atol=0, rtol=0)
    torch.testing.assert_close(ent.reshape(-1), ent_flat, atol=0, rtol=0)
    ref = L.token_logprobs_reference(hidden, weight, targets, 0.9)
    assert ref.shape == (B, T)
    truth = L.token_logprobs_reference(hidden.double(), weight.double(), targets, 0.9)
    _assert_within(lp, ref, truth, "[B, T]")


def test_torch_backend_gradcheck_fp64():
    # the chunked backward (token and vocab chunks, both outputs) against finite differences
    torch.manual_seed(1)
    h = (torch.randn(7, 6, dtype=torch.float64) * 0.7).requires_grad_()
    w = torch.randn(10, 6, dtype=torch.float64)
    t = torch.tensor([0, 9, 3, -100, 5, 5, 1])
    old = L._TORCH_VCHUNK
    try:
        L._TORCH_VCHUNK = 4  # three vocab chunks, the last partial
        fn = lambda x: L.token_logprobs(x, w, t, 0.6, return_entropy=True, backend="torch", chunk_size=3)
        assert torch.autograd.gradcheck(fn, (h,), eps=1e-6, atol=1e-7)
    finally:
        L._TORCH_VCHUNK = old


@pytest.mark.parametrize("n_split", [1, 2, 5])
def test_triton_vocab_splits_agree(n_split):
    # the split-V grid merges partials in _combine; any split count must give the same numbers
    hidden, weight, targets = _inputs(17, 40, 1300, torch.float32)
    truth = L.token_logprobs_reference(hidden.double(), weight.double(), targets, return_entropy=True)
    base = L.token_logprobs_reference(hidden, weight, targets, return_entropy=True)
    zt, lse, ez, ent = L.logprobs_fwd_triton(hidden, weight, targets, 1.0, n_split=n_split)
    _assert_within(zt - lse, base[0], truth[0], f"n_split={n_split} logprobs")
    _assert_within(ent, base[1], truth[1], f"n_split={n_split} entropy")
    _assert_within(lse - ez, base[1], truth[1], f"n_split={n_split} lse - E[z]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_trainable_head_weight_grad(backend, dtype):
    # weight_grad=True (full-fine-tune SFT trains lm_head): d weight through both outputs, vs the
    # reference's autograd d weight; several token and vocab chunks, ignored rows contribute nothing
    N, H, V = 29, 40, 700
    hidden, weight, targets = _inputs(N, H, V, dtype)
    targets[[2, 11]] = -100
    g_lp, g_ent = torch.randn(N), torch.randn(N)

    def run(fn, h, w, **kw):
        h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        lp, ent = fn(h, w, targets, 0.8, return_entropy=True, **kw)
        (lp * g_lp.to(lp.dtype) + ent * g_ent.to(lp.dtype)).sum().backward()
        return h.grad, w.grad

    ours = run(L.token_logprobs, hidden, weight, backend=backend, chunk_size=8, weight_grad=True)
    base = run(_naive, hidden, weight)
    truth = run(L.token_logprobs_reference, hidden.double(), weight.double())
    assert ours[1].dtype == dtype
    _assert_within(ours[0], base[0], truth[0], f"{backend} {dtype} d hidden (trainable head)")
    _assert_within(ours[1], base[1], truth[1], f"{backend} {dtype} d weight")


def test_frozen_head_and_argument_checks():
    hidden, weight, targets = _inputs(4, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="frozen"):
        L.token_logprobs(hidden, weight.clone().requires_grad_(), targets)
    with torch.no_grad():  # a weight that requires grad is fine when no graph is built
        L.token_logprobs(hidden, weight.clone().requires_grad_(), targets)
    with pytest.raises(ValueError, match="temperature"):
        L.token_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="targets"):
        L.token_logprobs(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="estimator"):
        L.kl_penalty(torch.zeros(3), torch.zeros(3), "k4")


def test_cpu_defaults_to_chunked_torch_backend(monkeypatch):
    # backend=None on CPU must take the chunked torch path, never the naive reference
    monkeypatch.delenv("FACTRL_BACKEND", raising=False)
    calls = []
    orig = L.logprobs_fwd_torch
    monkeypatch.setattr(L, "logprobs_fwd_torch", lambda *a, **k: calls.append(1) or orig(*a, **k))
    hidden, weight, targets = _inputs(4, 8, 20, torch.float32)
    L.token_logprobs(hidden, weight, targets)
    assert calls == [1]


def test_torch_backend_never_materializes_full_logits(monkeypatch):
    # tile bound: the largest fp32 intermediate has at most chunk x _TORCH_VCHUNK elements
    monkeypatch.setattr(L, "_TORCH_VCHUNK", 64)
    N, H, V, chunk = 40, 16, 300, 8
    hidden, weight, targets = _inputs(N, H, V, torch.float32)
    biggest = [0]

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                biggest[0] = max(biggest[0], out.numel())
            return out

    h = hidden.clone().requires_grad_()
    with Spy():
        lp, ent = L.token_logprobs(h, weight, targets, return_entropy=True, backend="torch", chunk_size=chunk)
        (lp + ent).sum().backward()
    assert biggest[0] <= max(chunk * 64, N * H, V * H)
    assert biggest[0] < N * V


# ------------------------------------------------------------------------------------------- KL


def test_kl_estimators_hand_worked():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    d = torch.tensor([0.5, -1.0, 0.0])
    torch.testing.assert_close(L.kl_penalty(lp, ref, "k1"), d)
    torch.testing.assert_close(L.kl_penalty(lp, ref, "k1_clamp"), torch.tensor([0.5, 0.0, 0.0]))
    torch.testing.assert_close(L.kl_penalty(lp, ref, "k2"), torch.tensor([0.125, 0.5, 0.0]))
    k3 = torch.tensor([math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1, 0.0])
    torch.testing.assert_close(L.kl_penalty(lp, ref, "k3"), k3)
    # k3 for tiny differences (logp ~ ref, the common case): exp(-d) - 1 + d cancels catastrophically
    # in fp32 (error ~ ulp(1) = 1e-7 on a 5e-9 result); expm1(-d) + d keeps ~1e-3 relative accuracy.
    d32 = torch.tensor([1e-4, -3e-4, 2e-5])
    exact = torch.expm1(-d32.double()) + d32.double()
    tiny = L.kl_penalty(d32, torch.zeros(3), "k3")
    naive = torch.exp(-d32) - 1 + d32
    rel = ((tiny.double() - exact) / exact).abs().max()
    assert rel < 1e-3
    assert ((naive.double() - exact) / exact).abs().max() > 100 * rel


@pytest.mark.parametrize("estimator", L.KL_ESTIMATORS)
def test_kl_penalty_gradients(estimator):
    lp = (torch.randn(50, dtype=torch.float64) * 0.5).requires_grad_()
    ref = torch.randn(50, dtype=torch.float64) * 0.5
    assert torch.autograd.gradcheck(lambda x: L.kl_penalty(x, ref, estimator), (lp,))
    d = lp.detach() - ref
    grad = torch.autograd.grad(L.kl_penalty(lp, ref, estimator).sum(), lp)[0]
    expected = {"k1": torch.ones_like(d), "k1_clamp": (d > 0).double(), "k2": d,
                "k3": 1 - torch.exp(-d)}[estimator]
    torch.testing.assert_close(grad, expected)


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N,H,V,temperature",
                         [(1000, 512, 32000, 1.0), (257, 640, 32001, 0.7), (64, 128, 128256, 1.0)])
def test_gpu_triton_matches_reference(dtype, N, H, V, temperature):
    hidden, weight, targets = _inputs(N, H, V, dtype, device="cuda")
    targets[:5] = -100
    targets[5] = V - 1
    _check_against_truth(hidden, weight, targets, "triton", temperature)


@pytest.mark.gpu
def test_gpu_triton_extreme_bf16():
    hidden, weight, targets = _inputs(300, 256, 32000, torch.bfloat16, scale=3e3, device="cuda")
    _check_against_truth(hidden, weight, targets, "triton", 1.0)


@pytest.mark.gpu
def test_gpu_peak_memory_below_naive():
    # N=8k, V=32000, H=1024 bf16: naive holds fp32 logits (1 GB) plus copies; ours a dz chunk
    hidden, weight, targets = _inputs(8192, 1024, 32000, torch.bfloat16, device="cuda")

    def peak(fn):
        h = hidden.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(h, weight, targets).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    ours = peak(lambda h, w, t: L.token_logprobs(h, w, t))
    naive = peak(lambda h, w, t: L._logprobs_of_logits((h @ w.T), t))
    assert ours * 8 <= naive, (ours, naive)


# ------------------------------------------------------------------ 64-bit offsets: rows * stride > 2**31
_BIG_STRIDE = 2 ** 30 + 64  # fits int32; row 2 then starts 2**31 + 128 elements in


def _sparse_rows(tmp_path, name, rows, stride):
    """``rows`` (n, H) as a view with row stride ``stride`` into a sparse file: gigabytes of
    address space, only the written pages exist. The view starts 2**31 elements in, so an offset
    that wrapped around int32 lands inside the file (zeros): a wrong result, not a crash."""
    n, H = rows.shape
    start = 2 ** 31
    size = start + (n - 1) * stride + H
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size * rows.element_size())
    store = torch.from_file(str(path), shared=True, size=size, dtype=rows.dtype)
    path.unlink()  # the mapping stays; nothing is left on disk
    view = store.as_strided((n, H), (stride, 1), start)
    view.copy_(rows)
    return view


@pytest.mark.skipif(not _backend.TRITON_INTERPRET, reason="interpreter only: on a GPU the views need 30 GB")
def test_logit_tile_offsets_are_64_bit(tmp_path):
    # hidden, weight and dz rows 2**30 elements apart: rows * stride passes 2**31 from row 2 on, in
    # _logit_tile's hidden and weight loads (forward and backward) and in the backward dz store.
    N, H, V = 4, 64, 4
    hidden, weight, targets = _inputs(N, H, V, torch.float16)
    h_big = _sparse_rows(tmp_path, "h", hidden, _BIG_STRIDE)
    w_big = _sparse_rows(tmp_path, "w", weight, _BIG_STRIDE)
    want = L.logprobs_fwd_triton(hidden, weight, targets, 1.0, n_split=1)
    got = L.logprobs_fwd_triton(h_big, w_big, targets, 1.0, n_split=1)
    for name, a, b in zip(("target logit", "lse", "E[z]", "entropy"), got, want):
        assert torch.equal(a, b), f"forward {name} differs with large row strides"
    lse, ez = want[1], want[2]
    g_lp, g_ent = torch.randn(N), torch.randn(N)
    dz_want = torch.zeros(N, V, dtype=torch.float16)
    dz_big = _sparse_rows(tmp_path, "dz", dz_want, _BIG_STRIDE)
    for h, w, dz in ((hidden, weight, dz_want), (h_big, w_big, dz_big)):
        L._logprobs_bwd_kernel[(1, 1)](h, w, targets, lse, ez, g_lp, g_ent, dz, N, V, H, h.stride(0), w.stride(0),
                                       dz.stride(0), 1.0, HAS_GENT=True, UPCAST=False, PRECISION="tf32")
    assert torch.isfinite(dz_want).all() and dz_want.abs().sum() > 0
    assert torch.equal(dz_big, dz_want), "backward dz differs with large row strides"
