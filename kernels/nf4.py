"""The NF4 weight format, bit-compatible with bitsandbytes (``quant_type="nf4"``).

Layout (as in bitsandbytes): a weight ``[out, in]`` is flattened row-major and cut into blocks of
``blocksize`` (64) consecutive elements along ``in``. Each element is the index of the nearest
entry of the 16-value NF4 table after dividing by its block's absmax; two indices share a
byte, element ``2j`` in the high nibble. The per-block absmax is fp32, or with double
quantization: ``absmax = code2[qabsmax] * absmax2[block // 256] + offset`` (uint8 codes into
bitsandbytes' signed dynamic map, one fp32 scale per 256 blocks, one global offset).

This file is pure PyTorch: it quantizes like ``bitsandbytes.functional.quantize_4bit`` (for the
nested absmax codes it replicates bnb's CPU binary or its CUDA kernel, which choose differently:
see :func:`quantize_blockwise_bnb`) and dequantizes bit for bit like
``bitsandbytes.functional.dequantize_4bit``. The fused kernels read :class:`NF4Weight` directly;
nothing here materializes more than one weight at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
NESTED_BLOCKSIZE = 256


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map(signed=True)``), 256 fp32."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@dataclass
class NF4Weight:
    """A frozen NF4 weight ``[out, in]``.

    qweight: uint8 ``[out * in // 2]``, two codes per byte, element 2j in the high nibble.
    absmax:  fp32 ``[n_blocks]``, or uint8 ``[n_blocks]`` codes when double-quantized.
    absmax2: fp32 ``[ceil(n_blocks / 256)]`` (double quantization only).
    code2:   fp32 ``[256]`` dynamic map (double quantization only).
    offset:  fp32 scalar added after the nested dequantization (double quantization only).
    """

    qweight: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    blocksize: int = 64
    absmax2: Optional[torch.Tensor] = None
    code2: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None
    code: torch.Tensor = None  # fp32 [16], the NF4 table on the weight's device

    def __post_init__(self):
        if self.code is None:
            self.code = NF4_CODE.to(self.qweight.device)
        self.shape = tuple(int(s) for s in self.shape)

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "absmax": self.absmax, "code": self.code}
        if self.double_quant:
            out.update(absmax2=self.absmax2, code2=self.code2, offset=self.offset.reshape(1))
        return out

    def to(self, device) -> "NF4Weight":
        t = {k: v.to(device) for k, v in self.tensors().items()}
        return NF4Weight(t["qweight"], t["absmax"], self.shape, self.blocksize, t.get("absmax2"),
                         t.get("code2"), t["offset"].reshape(()) if "offset" in t else None, t["code"])

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.tensors().values())

    def block_absmax(self) -> torch.Tensor:
        """fp32 ``[n_blocks]`` absmax, undoing double quantization exactly as bitsandbytes does."""
        if not self.double_quant:
            return self.absmax.float()
        n = self.absmax.numel()
        scale = self.absmax2.repeat_interleave(NESTED_BLOCKSIZE)[:n]
        return self.code2[self.absmax.long()] * scale + self.offset

    # ---- bitsandbytes interop -------------------------------------------------------------
    def to_bnb(self, dtype=torch.float16):
        """(packed ``[n/2, 1]`` uint8, ``bitsandbytes.functional.QuantState``)."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.absmax2, code=self.code2, blocksize=NESTED_BLOCKSIZE,
                                dtype=torch.float32)
        state = QuantState(absmax=self.absmax, shape=torch.Size(self.shape), dtype=dtype,
                           blocksize=self.blocksize, code=self.code, quant_type="nf4",
                           offset=self.offset, state2=state2)
        return self.qweight.reshape(-1, 1), state

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, state) -> "NF4Weight":
        if state.quant_type != "nf4":
            raise ValueError(f"expected an nf4 quant state, got {state.quant_type!r}")
        nested = state.state2 is not None
        return cls(packed.reshape(-1).view(torch.uint8), state.absmax, tuple(state.shape), state.blocksize,
                   state.state2.absmax if nested else None, state.state2.code if nested else None,
                   state.offset if nested else None, state.code.float())


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = flat.numel()
    pad = (-n) % blocksize
    if pad:  # the last, short block takes the absmax of what it has (zero padding cannot win)
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, blocksize).abs().amax(dim=1)


# ---- bitsandbytes' 8-bit blockwise quantizer (the nested absmax of double quantization) --------
# bnb chooses the uint8 code differently on CPU and on CUDA; both are replicated here, operation
# for operation in fp32. Sources: bitsandbytes-foundation/bitsandbytes at 95f9af30 (0.50.2.dev0;
# the installed 0.50.2 wheel's x86-64 CPU binary was disassembled and its codes compared too).
# Both rules first scale a block by ``1.0f / absmax`` and then multiply (never divide):
# csrc/cpu_ops.cpp:618,661 and csrc/kernels.cu:332,349.
NESTED_RULES = ("cuda", "cpu")


def _scaled_blocks(a: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x ``[n_blocks, blocksize]`` = a * (1 / absmax), absmax fp32 ``[n_blocks]``)."""
    flat = a.reshape(-1).float()
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)  # zero padding cannot win
    absmax = blocks.abs().amax(dim=1)
    # cpu: IEEE division (vdivss). cuda: built with --use_fast_math (CMakeLists.txt:190), so this
    # is MUFU.RCP (rcp.approx.ftz.f32, <= 1 ulp; seen in the sm_90 SASS of kQuantizeBlockwise<float,
    # 256, 2, 0, General8bit>); here it is the correctly rounded reciprocal.
    return blocks * (1.0 / absmax)[:, None], absmax


def _quantize_blockwise_cpu(a: torch.Tensor, code: torch.Tensor, blocksize: int):
    """bnb's CPU binary (csrc/cpu_ops.cpp ``quantize_cpu_impl``, lines 575-665): not the nearest
    code but a 65536-entry lookup table over [-1, 1], each bin taking the code nearest its centre.
    Bins are 2/65535 wide, coarser than the map near zero: x in [-3.05e-5, 0) gets code 123
    (-2.1e-5), [0, 3.05e-5) gets 131 (+2.1e-5), and codes 124..130 (zero among them) never occur."""
    n = a.numel()
    x, absmax = _scaled_blocks(a, blocksize)
    # build_quantize_lut (lines 501-519): entry i holds the number of code midpoints below
    # -1 + 2i/65535, i.e. the first code whose upper midpoint is >= that value.
    i = torch.arange(65536, dtype=torch.float32, device=a.device)
    lut_val = (i + i) / 65535.0 - 1.0  # -1.0f + (2.0f * i) / (kLUTSize - 1)
    mids = (code[:-1] + code[1:]) * 0.5  # 0.5f * (codebook[i] + codebook[i + 1])
    lut = torch.searchsorted(mids, lut_val)  # (65536,), counts midpoints strictly below
    # norm_to_lut_index (lines 569-572): uint16((clamp(x, -1, 1) + 1) * 0.5 * 65535 + 0.5). The
    # x86-64 binary fuses the last multiply-add (vfmadd213ss), aarch64 does not (vmlaq_f32, line
    # 226); both give the same index for every reachable input (t = (x+1)/2 is a multiple of
    # 2^-25: all 2^25 + 1 of them checked in tests/test_nf4_lora.py), so plain fp32 ops suffice.
    zero = absmax == 0  # lines 611-616: an all-zero block stores code 0 (its x is 0 * inf = NaN)
    t = (torch.clamp(x.masked_fill(zero[:, None], 0.0), -1.0, 1.0) + 1.0) * 0.5
    idx = (t * 65535.0 + 0.5).long()  # static_cast truncates; the value is >= 0.5
    q = lut[idx].masked_fill(zero[:, None], 0)
    return q.reshape(-1)[:n].to(torch.uint8), absmax


def _quantize_blockwise_cuda(a: torch.Tensor, code: torch.Tensor, blocksize: int):
    """bnb's CUDA kernel (csrc/kernels.cu ``kQuantizeBlockwise`` line 271 with ``dQuantize<0>``
    line 160; blocksize 256 -> kQuantizeBlockwise<T, 256, 2, 0, General8bit>, csrc/ops.cu:53): a
    7-step binary search from pivot 127, then the nearer of the last pivot and its neighbour by an
    fp32 midpoint ``(a + b) * 0.5f`` (lines 190, 196): the nearest code, an x exactly on a
    midpoint taking the last pivot, which is always even (127 +- 64 +- ... +- 1)."""
    n = a.numel()
    x, absmax = _scaled_blocks(a, blocksize)
    x = x.reshape(-1)  # an all-zero block gives 0 * inf = NaN: every comparison is false -> code 0
    pivot = torch.full_like(x, 127, dtype=torch.long)
    upper_pivot = torch.full_like(pivot, 255)
    lower_pivot = torch.zeros_like(pivot)
    lower = torch.full_like(x, -1.0)
    upper = torch.full_like(x, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):  # kernels.cu:170-181
        up = x > val
        lower_pivot = torch.where(up, pivot, lower_pivot)
        lower = torch.where(up, val, lower)
        upper_pivot = torch.where(up, upper_pivot, pivot)
        upper = torch.where(up, upper, val)
        pivot = torch.where(up, pivot + step, pivot - step)
        val = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)  # lines 183-186
    lower = torch.where(lower_pivot == 0, code[0], lower)
    above = x > val  # lines 188-199 (the non-stochastic branch)
    q = torch.where(above, torch.where(x > (upper + val) * 0.5, upper_pivot, pivot),
                    torch.where(x < (lower + val) * 0.5, lower_pivot, pivot))
    # FTZ (fast math) would also flush a subnormal x to 0; x = v * (1 / absmax2) is never one here.
    return q[:n].to(torch.uint8), absmax


def quantize_blockwise_bnb(a: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE,
                           rule: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``bitsandbytes.functional.quantize_blockwise(a, code, blocksize=blocksize)`` for fp32 ``a``:
    (uint8 codes shaped like ``a``, fp32 absmax ``[n_blocks]``). ``rule`` picks whose code choice
    to reproduce, ``"cuda"`` (the kernel real checkpoints are quantized with) or ``"cpu"`` (bnb's
    CPU binary); by default the one bnb itself would run for ``a``'s device."""
    rule = rule or ("cuda" if a.is_cuda else "cpu")
    if rule not in NESTED_RULES:
        raise ValueError(f"rule must be one of {NESTED_RULES}, got {rule!r}")
    fn = _quantize_blockwise_cuda if rule == "cuda" else _quantize_blockwise_cpu
    q, absmax = fn(a, code.to(a.device, torch.float32), blocksize)
    return q.view(a.shape), absmax


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 nested_rule: Optional[str] = None) -> NF4Weight:
    """Quantize a 2-D weight like ``bitsandbytes.functional.quantize_4bit(w, quant_type='nf4')``.

    ``nested_rule`` (double quantization only): ``"cuda"`` or ``"cpu"``, whose choice of the uint8
    absmax codes to reproduce (see :func:`quantize_blockwise_bnb`); by default that of the device
    ``w`` lives on, so the result equals bnb's on the same device."""
    if w.dim() != 2:
        raise ValueError(f"quantize_nf4 expects a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if w.numel() % 2:
        raise ValueError(f"NF4 packs two values per byte: numel {w.numel()} of {tuple(w.shape)} is odd")
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    absmax = _blockwise_absmax(flat, blocksize)
    scale = absmax.clamp(min=1e-38).repeat_interleave(blocksize)[:n]
    scaled = torch.clamp(flat * (1.0 / scale), -1, 1)
    code = NF4_CODE.to(w.device)
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    if not double_quant:
        return NF4Weight(packed, absmax, tuple(w.shape), blocksize, code=code)
    # Double quantization (bitsandbytes/functional.py:938-940): absmax - mean, in blocks of 256,
    # into the signed dynamic map.
    offset = absmax.mean()
    code2 = dynamic_map().to(w.device)
    qabs, absmax2 = quantize_blockwise_bnb(absmax - offset, code2, NESTED_BLOCKSIZE, nested_rule)
    return NF4Weight(packed, qabs, tuple(w.shape), blocksize, absmax2, code2, offset, code)


def dequantize_nf4(w: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[out, in]`` in ``dtype``; fp32 math as bitsandbytes, so results match it bit for bit."""
    q = w.qweight
    idx = torch.stack((q >> 4, q & 0xF), dim=1).reshape(-1).long()  # (out*in,)
    n = w.shape[0] * w.shape[1]
    vals = w.code[idx[:n]]
    absmax = w.block_absmax().repeat_interleave(w.blocksize)[:n]
    return (vals * absmax).view(w.shape).to(dtype)
