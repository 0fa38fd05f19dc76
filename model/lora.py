"""Decoder linears: one frozen base weight (NF4 or full precision) + a bank of named LoRA adapters.

Every q/k/v/o/gate/up/down of the decoder is a :class:`LoRALinear`. All of them share one
:class:`AdapterState` owned by the model, so selecting a role is one attribute write, never a
change of ``requires_grad`` or of train/eval mode. ``active=None`` is the bare base: the PPO
reference. The math goes through ``factrl.kernels.nf4_lora`` so the fused Triton kernel runs on
GPU and the PyTorch reference on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from factrl.kernels.nf4 import NF4Weight, quantize_nf4

NF4_BUFFERS = ("qweight", "absmax", "absmax2", "code2", "offset", "code")


@dataclass
class AdapterState:
    """Which adapter the model's linears apply.

    active:   adapter name, or None for the base alone.
    segments: grouped mode — ``[(name or None, n_rows), ...]`` over the batch dimension, so one
              pass over the base weights serves several roles (e.g. policy and value rows).
    """

    active: Optional[str] = None
    segments: Optional[list[tuple[Optional[str], int]]] = None
    names: dict[str, dict] = field(default_factory=dict)  # adapter name -> its LoRA settings


class LoRAAdapter(nn.Module):
    """``s · B(A(dropout(x)))`` with A ``[r, in]`` (Kaiming-uniform, as PEFT) and B ``[out, r]`` (zeros)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        return F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scaling


class LoRALinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, state: AdapterState, bias: bool = False,
                 name: str = ""):
        super().__init__()
        self.in_features, self.out_features, self.name = in_features, out_features, name
        self.state = state
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.adapters = nn.ModuleDict()
        self.nf4_shape: Optional[tuple[int, int]] = None
        self.nf4_blocksize = 64

    # ---- base weight --------------------------------------------------------------------------
    @property
    def is_quantized(self) -> bool:
        return self.nf4_shape is not None

    def set_nf4(self, w: NF4Weight) -> None:
        """Replace the base weight by an NF4 one (buffers: saved and moved with the module)."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{self.name}: NF4 weight shape {tuple(w.shape)} != "
                             f"({self.out_features}, {self.in_features})")
        if "weight" in self._parameters:
            del self._parameters["weight"]
        for k, v in w.tensors().items():
            self.register_buffer(k, v if k != "offset" else v.reshape(()), persistent=True)
        self.nf4_shape, self.nf4_blocksize = tuple(w.shape), w.blocksize

    def quantize_(self, double_quant: bool = True, blocksize: int = 64) -> None:
        self.set_nf4(quantize_nf4(self.weight.data, blocksize=blocksize, double_quant=double_quant))

    def quantize_from_(self, w: torch.Tensor, double_quant: bool = True, blocksize: int = 64) -> None:
        """Quantize a weight arriving from a checkpoint shard (the dense copy is not kept)."""
        self.set_nf4(quantize_nf4(w, blocksize=blocksize, double_quant=double_quant))

    def nf4(self) -> NF4Weight:
        g = lambda k: getattr(self, k, None)  # noqa: E731
        return NF4Weight(self.qweight, self.absmax, self.nf4_shape, self.nf4_blocksize,
                         g("absmax2"), g("code2"), g("offset"), self.code)

    def dense_weight(self, dtype=torch.float32) -> torch.Tensor:
        from factrl.kernels.nf4 import dequantize_nf4

        return dequantize_nf4(self.nf4(), dtype) if self.is_quantized else self.weight.detach().to(dtype)

    # ---- adapters -----------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0) -> LoRAAdapter:
        ad = LoRAAdapter(self.in_features, self.out_features, r, alpha, dropout)
        dev = self.qweight.device if self.is_quantized else self.weight.device
        self.adapters[name] = ad.to(dev)
        return self.adapters[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        if st.segments is not None:
            return self._forward_grouped(x, st.segments)
        ad = self.adapters[st.active] if st.active is not None and st.active in self.adapters else None
        # Fused base + LoRA for NF4 weights; otherwise (dense base, or dropout on the LoRA input
        # while training) the base pass plus the adapter's own term.
        if ad is None or not self.is_quantized or (ad.dropout is not None and self.training):
            y = self.forward_base(x)
            return y if ad is None else y + ad(x)
        from factrl.kernels.nf4_lora import nf4_lora

        return nf4_lora(x, self.nf4(), ad.lora_A, ad.lora_B, ad.scaling, bias=self.bias)

    def _forward_grouped(self, x: torch.Tensor, segments) -> torch.Tensor:
        """x ``[B, T, in]``; segments split B. One base pass; each segment its own adapter."""
        if x.shape[0] != sum(n for _, n in segments):
            raise ValueError(f"{self.name}: segments cover {sum(n for _, n in segments)} rows, batch is {x.shape[0]}")
        names = [n for n, _ in segments if n is not None and n in self.adapters]
        uniq = list(dict.fromkeys(names))
        ranks = {self.adapters[n].r for n in uniq}
        if not self.is_quantized or len(ranks) > 1:  # unfused fallback: one base pass, LoRA per segment
            base = self.forward_base(x)
            outs, start = [], 0
            for n, rows in segments:
                part = base[start:start + rows]
                if n in uniq and rows:
                    part = part + self.adapters[n](x[start:start + rows])
                outs.append(part)
                start += rows
            return torch.cat(outs, 0)
        if not uniq:
            return self.forward_base(x)
        from factrl.kernels.nf4_lora import nf4_lora

        T = x.shape[1]
        # Built and left on the host: nf4_lora range-checks host ids without a device sync, then
        # moves them to x's device.
        ids = torch.cat([torch.full((rows * T,), uniq.index(n) if n in uniq else -1, dtype=torch.int32)
                         for n, rows in segments])
        A = torch.stack([self.adapters[n].lora_A for n in uniq])  # (G, r, in)
        B = torch.stack([self.adapters[n].lora_B for n in uniq])  # (G, out, r)
        s = torch.tensor([self.adapters[n].scaling for n in uniq], device=x.device)
        return nf4_lora(x, self.nf4(), A, B, s, bias=self.bias, adapter_ids=ids)

    def forward_base(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_quantized:
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        from factrl.kernels.nf4_lora import nf4_lora

        return nf4_lora(x, self.nf4(), bias=self.bias)

    def extra_repr(self) -> str:
        kind = f"nf4{self.nf4_shape}" if self.is_quantized else "dense"
        return f"{self.name}: {self.in_features}->{self.out_features}, {kind}, adapters={list(self.adapters)}"
