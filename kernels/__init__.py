"""factrl.kernels: fused Triton kernels with PyTorch references (one file per op)."""

from factrl.kernels._backend import HAS_CUDA, HAS_TRITON, resolve_backend
from factrl.kernels.nf4 import NF4Weight, dequantize_nf4, quantize_nf4

__all__ = ["HAS_CUDA", "HAS_TRITON", "resolve_backend", "NF4Weight", "dequantize_nf4", "quantize_nf4"]
