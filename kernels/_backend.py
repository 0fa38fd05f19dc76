"""Capabilities detected once, the per-call backend switch, and launchers' output buffers.

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
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Tests set this to fill launcher-allocated outputs with NaN, so an element a kernel forgot to
# write cannot pass by accident (torch.empty often hands back zeros). Read at each allocation.
POISON_OUTPUTS = False

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
        if on_cpu and not TRITON_INTERPRET:
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before import")
    return backend


def new_output(shape, dtype, device) -> torch.Tensor:
    """A launcher's output buffer, uninitialized (every element is written by a kernel): all NaN
    when ``POISON_OUTPUTS`` is set."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
