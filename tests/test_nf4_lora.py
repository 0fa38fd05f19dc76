"""Fused NF4 + LoRA linear (kernels/nf4_lora.py) against its PyTorch reference.

Accuracy rule: an fp64 "truth" is the reference run on fp64 copies of the same inputs (same
NF4 weight, same upstream gradient). Our result and the reference run in the test dtype are
both compared with it; ours must be within 2x the reference's own error plus one ulp of the
largest truth value (the unavoidable final rounding), elementwise-max and normwise. Every
launcher-allocated output is poisoned with NaN (``_backend.POISON_OUTPUTS``), so an unwritten
element fails. On CPU the Triton kernels run in the interpreter (fp32/fp16, and bf16 through the
interpreter's fp32 upcast); true bf16 tensor-core checks are the ``gpu`` tests.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from factrl.kernels import _backend
from factrl.kernels.nf4 import NF4Weight, dequantize_nf4, dynamic_map, quantize_blockwise_bnb, quantize_nf4
from factrl.kernels.nf4_lora import nf4_dequantize_triton, nf4_lora, nf4_lora_reference

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_backend, "POISON_OUTPUTS", True)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _check(name, ours, ref, truth, factor=2.0):
    assert ours.shape == truth.shape and ours.dtype == ref.dtype, name
    assert torch.isfinite(ours).all(), f"{name}: non-finite values (unwritten poison?)"
    eps = torch.finfo(ours.dtype).eps
    truth = truth.double()
    e_ours = (ours.double() - truth).abs().max().item()
    e_ref = (ref.double() - truth).abs().max().item()
    floor = eps * truth.abs().max().item()
    assert e_ours <= factor * e_ref + floor, \
        f"{name}: max err {e_ours:.3g} vs reference {e_ref:.3g} (+{floor:.3g})"
    n_ours = (ours.double() - truth).norm().item()
    n_ref = (ref.double() - truth).norm().item()
    nfloor = eps * truth.norm().item()
    assert n_ours <= factor * n_ref + nfloor, f"{name}: norm err {n_ours:.3g} vs reference {n_ref:.3g}"


def _make(m, k, n, r=0, g=0, dtype=torch.float32, adt=None, dq=True, bias=False, ids=None, blocksize=64,
          scaling=0.5, lead=None):
    """Inputs on DEV. g=0: single adapter (if r); g>0: grouped with adapter ids ``ids``."""
    adt = adt or dtype
    w = quantize_nf4(torch.randn(n, k) * 0.05, blocksize=blocksize, double_quant=dq).to(DEV)
    x = torch.randn(*(lead or (m,)), k).to(DEV, dtype).requires_grad_()
    a = b = idt = None
    if r:
        shape_a, shape_b = ((g, r, k), (g, n, r)) if g else ((r, k), (n, r))
        a = (torch.randn(shape_a) / k ** 0.5).to(DEV, adt).requires_grad_()
        b = (torch.randn(shape_b) / r ** 0.5).to(DEV, adt).requires_grad_()
    if g:
        idt = torch.tensor(ids, dtype=torch.int64, device=DEV)
    bvec = torch.randn(n).to(DEV, dtype) if bias else None
    return x, w, a, b, scaling, bvec, idt


def _run(fn, x, w, a, b, s, bias, ids, dy, **kw):
    y = fn(x, w, a, b, s, bias, ids, **kw)
    leaves = [t for t in (x, a, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, leaves, dy, materialize_grads=True) if leaves else ()
    return y.detach(), [gr.detach() for gr in grads]


def _d(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def _compare(x, w, a, b, s, bias, ids, ref_adapter_dtype=None):
    """Forward and every gradient of the triton path vs the reference and the fp64 truth."""
    y0 = nf4_lora_reference(x.detach(), w, None if a is None else a.detach(),
                            None if b is None else b.detach(), s, bias, ids)
    dy = torch.randn_like(y0)
    ours = _run(nf4_lora, x, w, a, b, s, bias, ids, dy, backend="triton")
    if ref_adapter_dtype is not None:  # the dtype's own error: reference with adapters in x's dtype
        ref = _ref_cast(x, w, a, b, s, bias, ids, dy, ref_adapter_dtype)
    else:
        ref = _run(nf4_lora_reference, x, w, a, b, s, bias, ids, dy)
    s64 = s.double() if torch.is_tensor(s) else s
    truth = _run(nf4_lora_reference, _d(x), w, _d(a), _d(b), s64, _d(bias), ids, dy.double())
    _check("y", ours[0], ref[0], truth[0])
    names = [nm for nm, t in (("dx", x), ("dA", a), ("dB", b)) if t is not None and t.requires_grad]
    assert len(ours[1]) == len(names)
    for nm, o, rf, tr in zip(names, ours[1], ref[1], truth[1]):
        assert o.dtype == {"dx": x, "dA": a, "dB": b}[nm].dtype, nm
        _check(nm, o, rf.to(o.dtype), tr)
    return ours


def _ref_cast(x, w, a, b, s, bias, ids, dy, dt):
    y = nf4_lora_reference(x, w, a.to(dt), b.to(dt), s, bias, ids)
    leaves = [t for t in (x, a, b) if t.requires_grad]
    return y.detach(), list(torch.autograd.grad(y, leaves, dy, materialize_grads=True))


DTYPES = [torch.float32, torch.float16]

# (M, K, N, r, double_quant, bias): K = 64 * odd, N = 123; M <= 16 takes the decode kernel.
SINGLE = [
    (5, 192, 123, 8, True, True),
    (3, 576, 123, 8, False, False),    # decode with split-K (and split projection)
    (16, 320, 123, 64, False, True),   # largest decode M
    (17, 64, 123, 8, True, True),      # smallest tiled M
    (77, 320, 123, 1, False, False),
    (130, 192, 123, 64, True, False),  # row-split adapter grads
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n,r,dq,bias", SINGLE)
def test_single_adapter(dtype, m, k, n, r, dq, bias):
    _compare(*_make(m, k, n, r, dtype=dtype, dq=dq, bias=bias))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,dq,bias", [(5, True, True), (77, False, False)])
def test_no_adapter(dtype, m, dq, bias):
    _compare(*_make(m, 192, 123, dtype=dtype, dq=dq, bias=bias))


def _segments(*parts):
    return [gid for gid, length in parts for _ in range(length)]


GROUPED = {
    # 4 groups, group 3 empty, a -1 segment; per-group scaling tensor
    "segments": (77, 192, 8, 4, _segments((0, 10), (-1, 20), (2, 30), (1, 17)), "tensor"),
    # group 2 in two segments, segment edges inside row tiles, rank 1
    "split_group": (130, 320, 1, 3, _segments((2, 7), (0, 40), (-1, 3), (2, 50), (1, 30)), "float"),
    # nothing but base rows: LoRA grads must be exactly zero
    "all_base": (40, 192, 8, 2, _segments((-1, 40)), "float"),
    # decode kernel, rank 64
    "decode": (9, 192, 64, 2, _segments((1, 4), (-1, 2), (0, 3)), "tensor"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(GROUPED))
def test_grouped_adapters(dtype, case):
    m, k, r, g, ids, sc = GROUPED[case]
    s = torch.rand(g, device=DEV) + 0.5 if sc == "tensor" else 0.7
    args = list(_make(m, k, 123, r, g, dtype=dtype, dq=case != "decode", bias=case == "segments", ids=ids))
    args[4] = s
    ours = _compare(*args)
    dx, da, db = ours[1]
    present = set(ids) - {-1}
    for gi in range(g):
        if gi not in present:  # unused adapters get exactly zero gradient
            assert da[gi].abs().max() == 0 and db[gi].abs().max() == 0
        else:
            assert da[gi].abs().max() > 0 and db[gi].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("grouped", [False, True])
def test_fp32_adapters_16bit_activations(grouped, dtype):
    g = 2 if grouped else 0
    ids = _segments((1, 30), (-1, 10), (0, 37)) if grouped else None
    args = _make(77, 192, 123, 8, g, dtype=dtype, adt=torch.float32, ids=ids, bias=True)
    _compare(*args, ref_adapter_dtype=dtype)


@pytest.mark.parametrize("m", [5, 77])
def test_bf16_through_interpreter_upcast(m):
    """bf16 on CPU runs the kernels with fp32 dots (the interpreter's bf16 dot is wrong)."""
    _compare(*_make(m, 192, 123, 8, dtype=torch.bfloat16, bias=True))


@pytest.mark.parametrize("blocksize", [32, 128])
def test_other_blocksizes(blocksize):
    _compare(*_make(33, 256, 50, 8, dtype=torch.float32, blocksize=blocksize))


def test_leading_dims_grouped():
    x, w, a, b, s, bias, _ = _make(6, 192, 123, 8, 2, lead=(2, 3), ids=[0] * 6)
    ids = torch.tensor([[0, 0, -1], [1, 1, 1]], device=DEV)
    y = nf4_lora(x, w, a, b, s, bias, ids, backend="triton")
    assert y.shape == (2, 3, 123)
    _compare(x, w, a, b, s, bias, ids.reshape(-1))


@pytest.mark.parametrize("which", ["x_only", "adapters_only"])
def test_partial_requires_grad(which):
    x, w, a, b, s, bias, ids = _make(20, 192, 123, 8)
    if which == "x_only":
        a.requires_grad_(False)
        b.requires_grad_(False)
    else:
        x.requires_grad_(False)
    _compare(x, w, a, b, s, bias, ids)


def test_saves_x_not_dequantized_weight():
    x, w, a, b, s, bias, ids = _make(20, 192, 123, 8)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = nf4_lora(x, w, a, b, s, bias, ids, backend="triton")
    n, k = w.shape
    assert all(t.numel() < n * k for t in saved), [tuple(t.shape) for t in saved]
    assert any(t.data_ptr() == x.data_ptr() for t in saved)  # x itself, no copy
    y.sum().backward()  # the saved set suffices
    assert x.grad is not None and a.grad is not None and b.grad is not None


def test_default_backend_cpu_is_torch_reference():
    x, w, a, b, s, bias, ids = (t.cpu() if torch.is_tensor(t) else t for t in _make(7, 192, 123, 8))
    w = w.to("cpu")
    y = nf4_lora(x, w, a, b, s, bias, ids)
    assert torch.equal(y, nf4_lora_reference(x, w, a, b, s, bias, ids))
    y.sum().backward()  # the torch path trains: gradients reach x and both adapters
    assert x.grad.abs().sum() > 0 and a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_argument_errors():
    x, w, a, b, s, bias, ids = _make(7, 192, 123, 8)
    with pytest.raises(ValueError):
        nf4_lora(x[:, :64], w, a, b, backend="triton")
    with pytest.raises(ValueError):
        nf4_lora(x, w, a, None, backend="triton")
    with pytest.raises(ValueError):
        nf4_lora(x, w, a, b.t(), backend="triton")
    with pytest.raises(ValueError):  # grouped without ids
        nf4_lora(x, w, a[None], b[None], backend="triton")
    with pytest.raises(ValueError):  # frozen bias only
        nf4_lora(x, w, a, b, bias=torch.zeros(123, device=DEV, requires_grad=True), backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("ids_on", ["host", "device"])
@pytest.mark.parametrize("bad", [-2, 2, 7])
def test_adapter_ids_checked_before_launch(backend, ids_on, bad):
    # An id outside -1..G-1 would make the kernels read another tensor's memory: it is refused
    # before any launch, whether the ids live on the host (free) or on the device (one sync).
    x, w, a, b, s, bias, ids = _make(9, 192, 123, 8, g=2, ids=[0, 1, -1, 0, 1, 1, 0, -1, 0])
    ids = ids.clone()
    ids[4] = bad
    ids = ids.cpu() if ids_on == "host" else ids.to(DEV)
    with pytest.raises(ValueError, match=r"adapter_ids must lie in -1\.\.1"):
        nf4_lora(x, w, a, b, s, adapter_ids=ids, backend=backend)
    ids[4] = 1  # in range again: the same call runs
    assert nf4_lora(x, w, a, b, s, adapter_ids=ids, backend=backend).shape == (9, 123)


# ------------------------------------------------------------------------------------------
# NF4 dequantization is bitsandbytes' bit for bit
# ------------------------------------------------------------------------------------------
DEQ_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DEQ_DTYPES, ids=str)
@pytest.mark.parametrize("dq", [False, True])
def test_triton_dequant_matches_bnb(dtype, dq):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = quantize_nf4(torch.randn(123, 320) * 0.02, double_quant=dq).to(DEV)
    packed, state = w.to_bnb(dtype)
    expected = bnbf.dequantize_4bit(packed, state, quant_type="nf4")
    ours = nf4_dequantize_triton(w, dtype)
    assert ours.dtype == expected.dtype == dtype
    assert torch.equal(ours, expected)


def _assert_equals_bnb(w, **kw):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w, blocksize=64, double_quant=True, **kw)
    assert torch.equal(ours.qweight, packed.reshape(-1).view(torch.uint8))
    assert torch.equal(ours.offset.reshape(()), state.offset.reshape(()))
    assert torch.equal(ours.absmax2, state.state2.absmax)
    assert torch.equal(ours.code2, state.state2.code)
    diff = (ours.absmax != state.absmax).nonzero().flatten()
    some = diff[:5]
    assert diff.numel() == 0, f"absmax codes differ from bnb's in {diff.numel()} of {ours.absmax.numel()} " \
        f"blocks, e.g. {some.tolist()}: ours {ours.absmax[some].tolist()}, bnb {state.absmax[some].tolist()}"


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", [(256, 96), (96, 256), (256, 512), (130, 200)])
def test_double_quant_equals_bnb(shape, seed):
    # Every byte of the double-quantized weight equals bitsandbytes' on CPU: 4-bit codes, nested
    # scales, offset and the uint8 absmax codes (which bnb's CPU binary takes from a lookup table,
    # not the nearest code: 22 of these 16115 blocks differed while factrl chose the nearest).
    torch.manual_seed(seed)
    _assert_equals_bnb(torch.randn(*shape) * 0.05)


@settings(max_examples=100, deadline=None, database=None)  # no .hypothesis/ folder in the repo
@given(rows=st.integers(1, 300), cols=st.integers(1, 300), log_scale=st.floats(-5, 2),
       dist=st.sampled_from(["normal", "uniform", "cubed", "outlier"]), seed=st.integers(0, 2**31 - 1))
def test_double_quant_equals_bnb_fuzzed(rows, cols, log_scale, dist, seed):
    if rows * cols % 2:
        cols += 1
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if dist == "uniform":
        w = torch.rand(rows, cols, generator=g) * 2 - 1
    elif dist == "cubed":  # heavy tails: absmax spread over decades
        w = w ** 3
    elif dist == "outlier":
        w.view(-1)[torch.randint(0, w.numel(), (3,), generator=g)] *= 100
    _assert_equals_bnb(w * 10.0 ** log_scale)


def _nested_inputs():
    """fp32 values for blocks of 256 whose absmax is exactly 1, so the scaled x is the value itself:
    bnb's CPU LUT bin edges +-4 ulps, the dynamic map's codes and midpoints +-1 ulp, 0, +-1."""
    code = dynamic_map()
    k = torch.arange(1, 65536, dtype=torch.float32)
    edges = (k - 0.5) / 32767.5 - 1.0  # where uint16((x + 1) * 0.5 * 65535 + 0.5) steps
    mids = (code[:-1] + code[1:]) * 0.5
    xs = [edges, code, mids, torch.tensor([0.0, -0.0, 1.0, -1.0])]
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    for base in (edges, code, mids):
        lo, hi = base, base
        for _ in range(4 if base is edges else 1):
            lo, hi = torch.nextafter(lo, down), torch.nextafter(hi, up)
            xs += [lo, hi]
    x = torch.cat(xs).clamp(-1, 1)
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))]
    x = torch.nn.functional.pad(x, (0, (-x.numel()) % 255)).view(-1, 255)
    return torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).reshape(-1)  # (n_blocks * 256,)


def test_nested_cpu_rule_equals_bnb_blockwise():
    # bnb's own quantize_blockwise on values chosen to sit on its LUT's bin edges and the map's
    # midpoints, plus an all-zero block and a short last block.
    bnbf = pytest.importorskip("bitsandbytes.functional")
    x = torch.cat([_nested_inputs(), torch.zeros(256), torch.randn(77) * 1e-3])
    code = dynamic_map()
    q_bnb, state = bnbf.quantize_blockwise(x, code=code, blocksize=256)
    q, absmax = quantize_blockwise_bnb(x, code, 256, rule="cpu")
    assert torch.equal(absmax, state.absmax)
    diff = (q != q_bnb).nonzero().flatten()
    assert diff.numel() == 0, f"{diff.numel()} of {x.numel()} codes differ, e.g. x={x[diff[:4]].tolist()}"


def test_nested_cpu_lut_index_is_the_same_fused_or_not():
    # bnb's x86-64 binary computes the LUT index (t * 65535 + 0.5, t = (x + 1) / 2) with one FMA,
    # aarch64 with a separate multiply and add; factrl uses the latter. Every reachable t is a
    # multiple of 2^-25 in [0, 1] (x + 1 is a multiple of 2^-24): all of them give the same index.
    for lo in range(0, 2**25 + 1, 2**23):
        j = torch.arange(lo, min(lo + 2**23, 2**25 + 1), dtype=torch.int32)
        t = j.float() * 2.0**-25
        fused = (t.double() * 65535.0 + 0.5).float().long()  # exact in fp64, then one rounding
        assert torch.equal(fused, (t * 65535.0 + 0.5).long())


def _dquantize_scalar(code, x):
    """csrc/kernels.cu:160-200 (dQuantize<0>) line by line, in numpy fp32."""
    import numpy as np

    code = code.numpy()
    x = np.float32(x)
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = np.float32(-1.0), np.float32(1.0)
    val = code[pivot]
    i = 64
    while i > 0:
        if x > val:
            lower_pivot, lower, pivot = pivot, val, pivot + i
        else:
            upper_pivot, upper, pivot = pivot, val, pivot - i
        val = code[pivot]
        i >>= 1
    if upper_pivot == 255:
        upper = code[upper_pivot]
    if lower_pivot == 0:
        lower = code[lower_pivot]
    if x > val:
        return upper_pivot if x > (upper + val) * np.float32(0.5) else pivot
    return lower_pivot if x < (lower + val) * np.float32(0.5) else pivot


def test_nested_cuda_rule_is_the_kernels_search():
    # The vectorised CUDA rule equals a line-by-line port of bnb's dQuantize on the awkward
    # values (ties on midpoints included) and, away from ties, is the nearest code.
    code = dynamic_map()
    x = _nested_inputs()
    q, absmax = quantize_blockwise_bnb(x, code, 256, rule="cuda")
    assert torch.equal(absmax, torch.ones_like(absmax))
    pick = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(1))[:3000]
    mids = (code[:-1] + code[1:]) * 0.5
    pick = torch.cat([pick, torch.isin(x, mids).nonzero().flatten()[:500]])  # every tie kind
    expected = torch.tensor([_dquantize_scalar(code, v) for v in x[pick].tolist()], dtype=torch.uint8)
    assert torch.equal(q[pick], expected)
    lo, hi = torch.searchsorted(mids, x), torch.searchsorted(mids, x, right=True)
    assert torch.equal(q.long()[lo == hi], lo[lo == hi])
    assert bool((q.long()[lo != hi] % 2 == 0).all())  # a tie takes the even code
    q0, _ = quantize_blockwise_bnb(torch.zeros(300), code, 256, rule="cuda")
    assert bool((q0 == 0).all())  # 0 * (1 / 0) = NaN: every comparison fails, code 0, as on CPU


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(256, 96), (96, 256), (256, 512), (130, 200), (4096, 4096)])
def test_double_quant_equals_bnb_cuda(shape):
    # On CUDA the default rule is bnb's kernel's. It scales by MUFU.RCP (approximate, <= 1 ulp)
    # where factrl uses the correctly rounded 1/absmax2; a differing code needs x within an ulp
    # of a midpoint (none among the CPU-checked shapes when the reciprocal is moved by +-1 ulp).
    if not CUDA:
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    _assert_equals_bnb(torch.randn(*shape, device="cuda") * 0.05)


@pytest.mark.parametrize("dtype", DEQ_DTYPES, ids=str)
@pytest.mark.parametrize("dq", [False, True])
def test_from_bnb_roundtrip_bit_exact(dtype, dq):
    bnb = pytest.importorskip("bitsandbytes")
    w = (torch.randn(96, 192) * 0.03).to(DEV, dtype)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
    expected = bnb.functional.dequantize_4bit(packed, state, quant_type="nf4")
    nf = NF4Weight.from_bnb(packed, state)
    assert nf.double_quant == dq
    assert torch.equal(dequantize_nf4(nf, dtype), expected)
    assert torch.equal(nf4_dequantize_triton(nf, dtype), expected)


# ------------------------------------------------------------------------------------------
# GPU-only: bf16 tensor cores, autotuned tile shapes (skipped without CUDA)
# ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m,k,n,r,dq,bias",
                         SINGLE + [(1, 4096, 1000, 64, True, False), (300, 1024, 1000, 64, True, True)])
def test_gpu_single_adapter(dtype, m, k, n, r, dq, bias):
    _compare(*_make(m, k, n, r, dtype=dtype, dq=dq, bias=bias))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(GROUPED))
def test_gpu_grouped_adapters(dtype, case):
    test_grouped_adapters(dtype, case)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,dq,bias", [(5, True, True), (77, False, False), (2048, True, False)])
def test_gpu_no_adapter(dtype, m, dq, bias):
    _compare(*_make(m, 192 if m < 1000 else 1024, 123, dtype=dtype, dq=dq, bias=bias))


