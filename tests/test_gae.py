"""GAE + masked whitening: hand-worked cases, random cases vs the reference loop, properties.

Tolerances: the fp32 result of every path is compared with an fp64 "truth" (the reference loop
run on fp64 copies of the same inputs); its error must stay within a small factor of the
error the fp32 reference loop itself makes, plus a few ulps of the result's scale. The Triton
kernel runs under TRITON_INTERPRET=1 on CPU, where its scan is slow (Python per element), so
the Triton cases use fewer/smaller shapes than the torch ones; the GPU tests run the big ones.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factrl.kernels import _backend
from factrl.kernels import gae as G
from factrl.kernels._backend import HAS_TRITON

EPS32 = torch.finfo(torch.float32).eps
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # Launcher-allocated outputs start as NaN: an element the kernel forgets to write fails.
    monkeypatch.setattr(_backend, "POISON_OUTPUTS", True)


def run_gae(backend, r, v, m, gamma, lam, **cfg):
    if backend == "triton":
        return G.gae_triton(r, v, m, gamma, lam, **cfg)
    if backend == "torch":
        return G.gae_torch(r, v, m, gamma, lam)
    return G.gae_reference(r, v, m, gamma, lam)


def make_mask(B, T, kind, device="cpu"):
    """bool [B, T]. right: valid prefix; left: valid suffix; holes: random; mixed: rows of every
    kind, including all-masked and full rows."""
    pos = torch.arange(T, device=device)
    if kind == "right":
        return pos[None, :] < torch.randint(0, T + 1, (B, 1), device=device)
    if kind == "left":
        return pos[None, :] >= torch.randint(0, T + 1, (B, 1), device=device)
    if kind == "holes":
        return torch.rand(B, T, device=device) < 0.7
    assert kind == "mixed"
    rows = [make_mask(1, T, k, device) for k in ("right", "left", "holes")]
    rows += [torch.zeros(1, T, dtype=torch.bool, device=device),
             torch.ones(1, T, dtype=torch.bool, device=device)]
    # right-padded response after a left-padded query with a hole: the general case
    mid = (pos >= T // 4) & (pos < (3 * T) // 4) & (pos != T // 2)
    rows.append(mid[None, :])
    return torch.cat([rows[i % len(rows)] for i in range(B)], dim=0)


def assert_near_truth(ours, ref32, truth, factor=4.0):
    """max|ours - truth| <= factor * max|ref32 - truth| + 8 ulp(scale)."""
    scale = truth.abs().max().clamp(min=1.0).item() if truth.numel() else 1.0
    err_ref = (ref32.double() - truth).abs().max().item() if truth.numel() else 0.0
    err = (ours.double() - truth).abs().max().item() if truth.numel() else 0.0
    bound = factor * err_ref + 8 * EPS32 * scale
    assert err <= bound, f"error {err:.3g} > bound {bound:.3g} (reference fp32 error {err_ref:.3g})"


def check_gae(adv, ret, r, v, m, gamma, lam):
    valid = m != 0
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    assert adv.shape == r.shape and ret.shape == r.shape
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert (adv[~valid] == 0).all() and (ret[~valid] == 0).all()
    truth_a, truth_r = G.gae_reference(r.double(), v.double(), m, gamma, lam)
    ref_a, ref_r = G.gae_reference(r, v, m, gamma, lam)
    assert_near_truth(adv, ref_a, truth_a)
    assert_near_truth(ret, ref_r, truth_r)


# ---------------------------------------------------------------------------------------------
# Hand-worked, B=2, T=4
# ---------------------------------------------------------------------------------------------
# Row 0 is right-padded: mask [1, 1, 1, 0]; rewards [0, 0, 1, (9)]; values [0.5, 0.25, 0.5, (7)].
# Row 1 is left-padded with a hole: mask [0, 1, 0, 1]; rewards [(5), 0, (3), 1];
#   values [(2), 0.5, (4), 0.25]. Numbers in () sit at masked positions and must never matter.
# Recurrence (masked steps skipped): delta_t = r_t + gamma*V_next - v_t, A_t = delta_t + gamma*lam*A_next,
# where V_next / A_next come from the next *valid* step (0 after the last one).
#
# gamma=1, lam=1:
#   row 0: t2: delta = 1 + 0 - 0.5 = 0.5, A = 0.5
#          t1: delta = 0 + 0.5 - 0.25 = 0.25, A = 0.25 + 0.5 = 0.75
#          t0: delta = 0 + 0.25 - 0.5 = -0.25, A = -0.25 + 0.75 = 0.5
#   row 1: t3: delta = 1 + 0 - 0.25 = 0.75, A = 0.75
#          t1 (t2 skipped, V_next = v3 = 0.25): delta = 0 + 0.25 - 0.5 = -0.25, A = -0.25 + 0.75 = 0.5
# gamma=1, lam=0.95 (gamma*lam = 0.95):
#   row 0: t2: A = 0.5;  t1: delta = 0.25, A = 0.25 + 0.95*0.5 = 0.725
#          t0: delta = -0.25, A = -0.25 + 0.95*0.725 = -0.25 + 0.68875 = 0.43875
#   row 1: t3: A = 0.75; t1: delta = -0.25, A = -0.25 + 0.95*0.75 = 0.4625
# gamma=0.95, lam=1 (gamma*lam = 0.95):
#   row 0: t2: delta = 1 - 0.5 = 0.5, A = 0.5
#          t1: delta = 0.95*0.5 - 0.25 = 0.225, A = 0.225 + 0.95*0.5 = 0.7
#          t0: delta = 0.95*0.25 - 0.5 = -0.2625, A = -0.2625 + 0.95*0.7 = 0.4025
#   row 1: t3: A = 0.75; t1: delta = 0.95*0.25 - 0.5 = -0.2625, A = -0.2625 + 0.95*0.75 = 0.45
#   (lam=1 => returns are discounted rewards-to-go: row 0 = [0.95^2, 0.95, 1], row 1 t1 = 0.95)
# gamma=0.95, lam=0.95 (gamma*lam = 0.9025):
#   row 0: t2: A = 0.5;  t1: delta = 0.225, A = 0.225 + 0.9025*0.5 = 0.67625
#          t0: delta = -0.2625, A = -0.2625 + 0.9025*0.67625 = -0.2625 + 0.610315625 = 0.347815625
#   row 1: t3: A = 0.75; t1: delta = -0.2625, A = -0.2625 + 0.9025*0.75 = -0.2625 + 0.676875 = 0.414375
# returns = A + v on valid steps.
HAND_R = [[0.0, 0.0, 1.0, 9.0], [5.0, 0.0, 3.0, 1.0]]
HAND_V = [[0.5, 0.25, 0.5, 7.0], [2.0, 0.5, 4.0, 0.25]]
HAND_M = [[1, 1, 1, 0], [0, 1, 0, 1]]
HAND_ADV = {
    (1.0, 1.0): [[0.5, 0.75, 0.5, 0.0], [0.0, 0.5, 0.0, 0.75]],
    (1.0, 0.95): [[0.43875, 0.725, 0.5, 0.0], [0.0, 0.4625, 0.0, 0.75]],
    (0.95, 1.0): [[0.4025, 0.7, 0.5, 0.0], [0.0, 0.45, 0.0, 0.75]],
    (0.95, 0.95): [[0.347815625, 0.67625, 0.5, 0.0], [0.0, 0.414375, 0.0, 0.75]],
}
HAND_RET = {
    (1.0, 1.0): [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]],
    (1.0, 0.95): [[0.93875, 0.975, 1.0, 0.0], [0.0, 0.9625, 0.0, 1.0]],
    (0.95, 1.0): [[0.9025, 0.95, 1.0, 0.0], [0.0, 0.95, 0.0, 1.0]],
    (0.95, 0.95): [[0.847815625, 0.92625, 1.0, 0.0], [0.0, 0.914375, 0.0, 1.0]],
}


@pytest.mark.parametrize("gamma,lam", list(HAND_ADV))
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_hand_worked(backend, gamma, lam):
    r, v = torch.tensor(HAND_R), torch.tensor(HAND_V)
    m = torch.tensor(HAND_M, dtype=torch.bool)
    adv, ret = run_gae(backend, r, v, m, gamma, lam)
    # fp32 inputs (0.95 is not exact in fp32): a few ulps of 1
    torch.testing.assert_close(adv, torch.tensor(HAND_ADV[(gamma, lam)]), atol=4 * EPS32, rtol=0)
    torch.testing.assert_close(ret, torch.tensor(HAND_RET[(gamma, lam)]), atol=4 * EPS32, rtol=0)


# ---------------------------------------------------------------------------------------------
# Random cases against the reference
# ---------------------------------------------------------------------------------------------
SIZES = [1, 7, 129, 1000]


# Every (B, T) with every mask kind; the 1000 x 1000 case only with "mixed" (which holds rows of
# every kind) to keep the fp64 reference loop's time down.
TORCH_CASES = [(B, T, kind) for B in SIZES for T in SIZES for kind in ("right", "left", "holes", "mixed")
               if B * T < 10**6 or kind == "mixed"]


@pytest.mark.parametrize("B,T,kind", TORCH_CASES)
def test_random_torch(B, T, kind):
    r, v = torch.randn(B, T), torch.randn(B, T)
    m = make_mask(B, T, kind)
    for gamma, lam in [(0.99, 0.95), (1.0, 1.0)]:
        adv, ret = G.gae_torch(r, v, m, gamma, lam)
        check_gae(adv, ret, r, v, m, gamma, lam)


# (B, T, kind, gamma, lam, launcher config). Interpreter-sized; includes partial row blocks,
# many chunks per row (cross-chunk carry), T not a multiple of the chunk, and gamma = lam = 1.
TRITON_CASES = [
    (1, 1, "holes", 0.99, 0.95, {}),
    (1, 1000, "left", 0.99, 0.95, {}),
    (1, 1000, "holes", 1.0, 1.0, {}),
    (7, 7, "mixed", 0.95, 0.95, {}),
    (7, 129, "mixed", 1.0, 1.0, {}),
    (129, 7, "mixed", 0.99, 0.95, {}),
    (7, 1000, "mixed", 0.99, 0.95, {"block_b": 4, "chunk_t": 64}),
    (7, 1000, "right", 1.0, 1.0, {"block_b": 8, "chunk_t": 128}),
    (129, 129, "mixed", 0.99, 0.95, {"block_b": 16, "chunk_t": 32}),
    (9, 100, "mixed", 0.5, 0.0, {"block_b": 2, "chunk_t": 16}),  # lam = 0: one-step TD
]


@pytest.mark.skipif(not HAS_TRITON, reason="no triton")
@pytest.mark.parametrize("B,T,kind,gamma,lam,cfg", TRITON_CASES)
def test_random_triton(B, T, kind, gamma, lam, cfg):
    r, v = torch.randn(B, T), torch.randn(B, T)
    m = make_mask(B, T, kind)
    adv, ret = G.gae_triton(r, v, m, gamma, lam, **cfg)
    check_gae(adv, ret, r, v, m, gamma, lam)


def test_default_config_shapes():
    # The launch heuristic: power-of-two tiles, <= 2048 elements, ~256 programs for big B.
    for B in [1, 7, 64, 512, 4096, 100_000]:
        for T in [1, 7, 128, 1000, 4096]:
            bb, ct, nw = G._gae_config(B, T)
            assert bb & (bb - 1) == 0 and ct & (ct - 1) == 0 and 16 <= ct <= 256
            assert bb * ct <= 2048 and nw in (4, 8)
    assert G._gae_config(512, 1024)[0] == 2 and -(-4096 // G._gae_config(4096, 1024)[0]) == 256


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rdtype,vdtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                           (torch.float64, torch.float64)])
def test_input_dtypes_use_fp32_math(backend, rdtype, vdtype):
    # Low-precision inputs are upcast on load: the result equals the fp32 computation on the
    # upcast inputs (fp64 inputs are computed in fp32 too: the output is always fp32).
    B, T = 5, 40
    r, v = torch.randn(B, T).to(rdtype), torch.randn(B, T).to(vdtype)
    m = make_mask(B, T, "mixed")
    adv, ret = run_gae(backend, r, v, m, 0.99, 0.95)
    r32, v32 = r.float(), v.float()
    check_gae(adv, ret, r32, v32, m, 0.99, 0.95)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_dtypes_agree(backend):
    B, T = 6, 37
    r, v = torch.randn(B, T), torch.randn(B, T)
    m = make_mask(B, T, "mixed")
    want = run_gae(backend, r, v, m, 0.97, 0.9)
    for md in [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.int32]:
        got = run_gae(backend, r, v, m.to(md), 0.97, 0.9)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), md
    # nonzero = valid, not just 1
    got = run_gae(backend, r, v, m.float() * -2.5, 0.97, 0.9)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf - inf at masked steps, discarded
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_masked_positions_never_read(backend):
    # Garbage (NaN, inf) at masked positions must not change anything.
    B, T = 6, 50
    r, v = torch.randn(B, T), torch.randn(B, T)
    m = make_mask(B, T, "mixed")
    clean = run_gae(backend, r, v, m, 0.99, 0.95)
    junk = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(B * T)[: B * T].view(B, T)
    r2, v2 = torch.where(m, r, junk), torch.where(m, v, junk.flip(1))
    dirty = run_gae(backend, r2, v2, m, 0.99, 0.95)
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    B, T = 5, 33
    big_r, big_v = torch.randn(B, 2 * T), torch.randn(T, B)
    r, v = big_r[:, ::2], big_v.t()  # strided along T / transposed
    m = make_mask(B, 2 * T, "holes")[:, 1::2]
    adv, ret = run_gae(backend, r, v, m, 0.99, 0.95)
    check_gae(adv, ret, r.contiguous(), v.contiguous(), m.contiguous(), 0.99, 0.95)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_empty(backend, shape):
    r = torch.randn(shape)
    adv, ret = run_gae(backend, r, r, torch.ones(shape, dtype=torch.bool), 0.99, 0.95)
    assert adv.shape == shape and ret.shape == shape


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_bad_inputs(backend):
    r = torch.randn(3, 4)
    m = torch.ones(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError):
        run_gae(backend, r, torch.randn(3, 5), m, 1.0, 1.0)
    with pytest.raises(ValueError):
        run_gae(backend, r, r, m[:, :3], 1.0, 1.0)
    with pytest.raises(ValueError):
        run_gae(backend, r[0], r[0], m[0], 1.0, 1.0)
    with pytest.raises(TypeError):
        run_gae(backend, r.long(), r, m, 1.0, 1.0)


def test_public_dispatch(monkeypatch):
    # CPU tensors default to the vectorized torch path; backend='triton' goes to the kernel.
    monkeypatch.delenv("FACTRL_BACKEND", raising=False)
    r, v = torch.randn(3, 20), torch.randn(3, 20)
    m = make_mask(3, 20, "mixed")
    calls = []
    monkeypatch.setattr(G, "gae_torch", lambda *a: calls.append("torch") or (None, None))
    monkeypatch.setattr(G, "gae_triton", lambda *a: calls.append("triton") or (None, None))
    monkeypatch.setattr(G, "masked_whiten_torch", lambda *a: calls.append("wtorch"))
    monkeypatch.setattr(G, "masked_whiten_triton", lambda *a: calls.append("wtriton"))
    G.gae(r, v, m, 0.9, 0.9)
    G.masked_whiten(r, m)
    if HAS_TRITON:
        G.gae(r, v, m, 0.9, 0.9, backend="triton")
        G.masked_whiten(r, m, backend="triton")
        assert calls == ["torch", "wtorch", "triton", "wtriton"]
    else:
        assert calls == ["torch", "wtorch"]
    with pytest.raises(ValueError):
        G.gae(r, v, m, backend="cuda")


# ---------------------------------------------------------------------------------------------
# Property: gamma = lam = 1 => advantage = reward-to-go - value on valid tokens
# ---------------------------------------------------------------------------------------------


@st.composite
def episodes(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 24))
    floats = st.floats(-10, 10, allow_nan=False, width=32)
    r = torch.tensor(draw(st.lists(floats, min_size=B * T, max_size=B * T)), dtype=torch.float32).view(B, T)
    v = torch.tensor(draw(st.lists(floats, min_size=B * T, max_size=B * T)), dtype=torch.float32).view(B, T)
    m = torch.tensor(draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))).view(B, T)
    return r, v, m


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@settings(max_examples=30, deadline=None, database=None,  # no .hypothesis/ folder in the repo
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ep=episodes())
def test_property_lambda1_gamma1_is_reward_to_go(backend, ep):
    r, v, m = ep
    adv, ret = run_gae(backend, r, v, m, 1.0, 1.0)
    # reward-to-go over valid tokens, in fp64, by a reverse cumulative sum
    r64 = torch.where(m, r.double(), 0.0)
    rtg = r64.flip(1).cumsum(1).flip(1)
    want = torch.where(m, rtg - v.double(), 0.0)
    bound = 8 * EPS32 * (r.abs().sum(1, keepdim=True).double() + v.abs().double() + 1.0)  # fp32 sum error
    assert ((adv.double() - want).abs() <= bound).all()
    assert ((ret.double() - torch.where(m, rtg, 0.0)).abs() <= bound + 8 * EPS32 * v.abs().double()).all()


# ---------------------------------------------------------------------------------------------
# Masked whitening
# ---------------------------------------------------------------------------------------------


def run_whiten(backend, x, m, shift_mean, unbiased, **cfg):
    if backend == "triton":
        return G.masked_whiten_triton(x, m, shift_mean, unbiased, **cfg)
    if backend == "torch":
        return G.masked_whiten_torch(x, m, shift_mean, unbiased)
    return G.masked_whiten_reference(x, m, shift_mean, unbiased)


def direct_whiten(x, m, shift_mean, unbiased, eps=1e-8):
    """fp64 truth straight from the definition."""
    valid = m != 0
    vals = x[valid].double()
    n = vals.numel()
    mean = vals.sum() / n
    var = ((vals - mean) ** 2).sum() / (n - 1 if unbiased else n)
    y = (x.double() - mean) / torch.sqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return torch.where(valid, y, 0.0)


WHITEN_CASES = [  # (B, T, mask kind, offset, launcher config)
    (7, 129, "mixed", 0.0, {}),
    (129, 1000, "holes", 0.0, {}),
    (129, 1000, "mixed", 1000.0, {"block": 1024, "block_p": 16}),  # 126 partials, 8 combine steps
    (1, 1000, "left", -3.0, {"block": 64, "block_p": 4}),
]


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("B,T,kind,offset,cfg", WHITEN_CASES)
def test_whiten_vs_direct(B, T, kind, offset, cfg, backend, shift_mean, unbiased):
    x = torch.randn(B, T) * 3.0 + offset  # offset: a large mean stresses the variance's cancellation
    m = make_mask(B, T, kind)
    got = run_whiten(backend, x, m, shift_mean, unbiased, **(cfg if backend == "triton" else {}))
    assert got.dtype == torch.float32 and (got[~m] == 0).all()
    truth = direct_whiten(x, m, shift_mean, unbiased)
    ref32 = G.masked_whiten_reference(x, m, shift_mean, unbiased)
    assert_near_truth(got, ref32, truth)
    if backend == "reference":  # and the reference itself is close to the fp64 definition
        scale = truth.abs().max().item()
        assert (got.double() - truth).abs().max() <= 64 * EPS32 * max(scale, abs(offset) + 1)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_whiten_normalizes(backend):
    x = torch.randn(40, 30) * 5 + 2
    m = make_mask(40, 30, "holes")
    y = run_whiten(backend, x, m, True, True)[m].double()
    assert abs(y.mean().item()) < 1e-5 and abs(y.std().item() - 1.0) < 1e-5
    y = run_whiten(backend, x, m, False, False)[m].double()
    xm = x[m].double()
    assert abs(y.mean().item() - xm.mean().item()) < 1e-4 and abs(y.std(correction=0).item() - 1.0) < 1e-5


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
def test_whiten_fewer_than_two_valid(backend, shift_mean, unbiased):
    # Documented: variance 0. No valid token -> all zeros; one -> 0 there (x when not shifting).
    x = torch.randn(3, 9) * 4 + 1
    none = torch.zeros(3, 9, dtype=torch.bool)
    y = run_whiten(backend, x, none, shift_mean, unbiased)
    assert torch.equal(y, torch.zeros(3, 9))
    one = none.clone()
    one[1, 5] = True
    y = run_whiten(backend, x, one, shift_mean, unbiased)
    want = torch.zeros(3, 9)
    want[1, 5] = 0.0 if shift_mean else x[1, 5]
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, want, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_whiten_masked_values_never_read(backend):
    x = torch.randn(8, 20)
    m = make_mask(8, 20, "mixed")
    clean = run_whiten(backend, x, m, True, True)
    dirty = run_whiten(backend, torch.where(m, x, float("nan")), m, True, True)
    assert torch.equal(clean, dirty)


@pytest.mark.parametrize("backend", BACKENDS)
def test_whiten_input_dtypes(backend):
    x = torch.randn(6, 50).to(torch.bfloat16)
    m = make_mask(6, 50, "holes").float()
    got = run_whiten(backend, x, m, True, True)
    ref = G.masked_whiten_reference(x.float(), m, True, True)
    assert_near_truth(got, ref, direct_whiten(x.float(), m, True, True))


def test_whiten_shape_mismatch():
    with pytest.raises(ValueError):
        G.masked_whiten(torch.randn(3, 4), torch.ones(3, 5))


# ---------------------------------------------------------------------------------------------
# masked_mean
# ---------------------------------------------------------------------------------------------


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, float("nan"), 4.0], [5.0, 6.0, 7.0, 8.0], [1.0, 1.0, 1.0, 1.0]])
    m = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    assert G.masked_mean(x, m).item() == pytest.approx((1 + 2 + 4 + 1) / 4)
    torch.testing.assert_close(G.masked_mean(x, m, dim=1), torch.tensor([7 / 3, 0.0, 1.0]))  # empty row -> 0
    torch.testing.assert_close(G.masked_mean(x, m.float(), dim=0), torch.tensor([1.0, 1.5, 0.0, 4.0]))
    assert G.masked_mean(x, torch.zeros_like(m)).item() == 0.0
    # integer input -> fp32; float input keeps its dtype
    assert G.masked_mean(torch.arange(4), torch.tensor([1, 0, 1, 0])).item() == 1.0
    assert G.masked_mean(x.bfloat16(), m).dtype == torch.bfloat16


def test_masked_mean_grad():
    x = torch.randn(4, 6, requires_grad=True)
    m = make_mask(4, 6, "mixed")
    G.masked_mean(x, m).backward()
    torch.testing.assert_close(x.grad, m.float() / m.sum())


# ---------------------------------------------------------------------------------------------
# GPU (bf16 inputs, the benchmark's shapes, every launch config the heuristic can pick)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T", [(1, 1), (7, 1000), (129, 129), (512, 1024), (64, 4096), (4096, 128),
                                 (3, 5000)])
def test_gpu_gae_vs_reference(B, T, dtype):
    r = torch.randn(B, T, device="cuda").to(dtype)
    v = torch.randn(B, T, device="cuda").to(dtype)
    m = make_mask(B, T, "mixed", device="cuda")
    adv, ret = G.gae(r, v, m, 0.99, 0.95)  # default backend on CUDA = triton
    r32, v32 = r.float(), v.float()
    check_gae(adv, ret, r32, v32, m, 0.99, 0.95)
    adv_t, ret_t = G.gae_torch(r, v, m, 0.99, 0.95)
    check_gae(adv_t, ret_t, r32, v32, m, 0.99, 0.95)


@pytest.mark.gpu
@pytest.mark.parametrize("block_b,chunk_t", [(1, 16), (1, 256), (2, 128), (4, 512), (16, 128), (32, 64)])
def test_gpu_gae_configs(block_b, chunk_t):
    B, T = 100, 1500
    r, v = torch.randn(B, T, device="cuda"), torch.randn(B, T, device="cuda")
    m = make_mask(B, T, "mixed", device="cuda")
    adv, ret = G.gae_triton(r, v, m, 1.0, 1.0, block_b=block_b, chunk_t=chunk_t)
    check_gae(adv, ret, r, v, m, 1.0, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("shift_mean,unbiased", [(True, True), (False, False)])
def test_gpu_whiten(shift_mean, unbiased):
    x = (torch.randn(4096, 1024, device="cuda") * 3 + 100).to(torch.bfloat16)
    m = make_mask(4096, 1024, "mixed", device="cuda")
    got = G.masked_whiten(x, m, shift_mean, unbiased)
    ref32 = G.masked_whiten_reference(x, m, shift_mean, unbiased)
    assert_near_truth(got, ref32, direct_whiten(x.float(), m, shift_mean, unbiased))
    one = torch.zeros_like(m)
    one[5, 7] = True
    assert torch.equal(G.masked_whiten(x, one, True, unbiased), torch.zeros_like(x, dtype=torch.float32))
