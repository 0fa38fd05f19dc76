"""Capabilities detected once, and the per-call backend switch.

``backend=None`` picks ``triton`` for CUDA tensors and ``torch`` otherwise; the environment
variable ``FACTRL_BACKEND`` (``triton`` | ``torch``) overrides the default. ``triton`` on CPU
tensors works only under ``TRITON_INTERPRET=1`` (the tests set it when there is no GPU).
"""

from __future__ import annotations

import importlib.util
import os

import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None and HAS_CUDA
HAS_XFORMERS = importlib.util.find_spec("xformers") is not None and HAS_CUDA
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

BACKENDS = ("triton", "torch")


def resolve_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """Choose ``triton`` or ``torch`` for one call on ``tensors``."""
    if backend is None:
        backend = os.environ.get("FACTRL_BACKEND") or None
    if backend is None:
        on_cuda = any(t is not None and t.is_cuda for t in tensors)
        return "triton" if (on_cuda and HAS_TRITON) else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' requested but triton is not installed")
        on_cpu = any(t is not None and not t.is_cuda for t in tensors)
        if on_cpu and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before import")
    return backend
