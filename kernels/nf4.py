"""The NF4 weight format, bit-compatible with bitsandbytes (``quant_type="nf4"``).

Layout (as in bitsandbytes): a weight ``[out, in]`` is flattened row-major and cut into blocks of
``blocksize`` (64) consecutive elements along ``in``. Each element is the index of the nearest
entry of the 16-value NF4 table after dividing by its block's absmax; two indices share a
byte, element ``2j`` in the high nibble. The per-block absmax is fp32, or with double
quantization: ``absmax = code2[qabsmax] * absmax2[block // 256] + offset`` (uint8 codes into
bitsandbytes' signed dynamic map, one fp32 scale per 256 blocks, one global offset).

This file is pure PyTorch: it quantizes (mirroring bitsandbytes' own torch path) and
dequantizes bit for bit like ``bitsandbytes.functional.dequantize_4bit``. The fused kernels
read :class:`NF4Weight` directly; nothing here materializes more than one weight at a time.
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


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a 2-D weight like ``bitsandbytes.functional.quantize_4bit(w, quant_type='nf4')``."""
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
    # Double quantization: absmax - mean, blocks of 256 scaled into the dynamic map.
    offset = absmax.mean()
    centered = absmax - offset
    absmax2 = _blockwise_absmax(centered, NESTED_BLOCKSIZE)
    s2 = absmax2.clamp(min=1e-38).repeat_interleave(NESTED_BLOCKSIZE)[: centered.numel()]
    code2 = dynamic_map().to(w.device)
    qabs = torch.bucketize(torch.clamp(centered / s2, -1, 1), (code2[:-1] + code2[1:]) / 2, out_int32=True)
    return NF4Weight(packed, qabs.to(torch.uint8), tuple(w.shape), blocksize, absmax2, code2, offset, code)


def dequantize_nf4(w: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[out, in]`` in ``dtype``; fp32 math as bitsandbytes, so results match it bit for bit."""
    q = w.qweight
    idx = torch.stack((q >> 4, q & 0xF), dim=1).reshape(-1).long()  # (out*in,)
    n = w.shape[0] * w.shape[1]
    vals = w.code[idx[:n]]
    absmax = w.block_absmax().repeat_interleave(w.blocksize)[:n]
    return (vals * absmax).view(w.shape).to(dtype)
