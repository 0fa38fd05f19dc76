"""Per-architecture launch limits of the autotuned kernels: shared memory per config, and the
``early_config_prune`` hooks that drop the configs a device cannot launch.

Without pruning, a config over the per-block shared-memory limit is compiled at its first
launch, fails with OutOfResources and is skipped: seconds of compile per shape for nothing.

Shared memory per config comes from ``_shared_table.py``: what Triton's compiler itself
allocated (``metadata.shared``) for sm_80 and sm_90, measured without a GPU by ``python -m
factrl.kernels.compile_check --all-configs --write-table kernels/_shared_table.py``, keyed by
kernel, launcher role, operand widths and config (taken with the most inclusive flags, grouped
LoRA and bias: an upper bound for the others). A config the table lacks is kept (the autotuner
then skips it if it cannot launch, as before): a formula guessed from block sizes was 1.5-3x the
compiler's numbers and would have pruned the best configs. ``compile_check`` fails when a kept
config's compiled shared memory is over the limit, or above its table entry (a stale table).
"""

from __future__ import annotations

import functools

# Per-block shared memory a kernel may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {90: 232448, 89: 101376, 86: 101376, 80: 166912}


def config_name(meta: dict, warps: int, stages: int) -> str:
    return "/".join(f"{k}={v}" for k, v in meta.items()) + f"/w{warps}/s{stages}"


def _table() -> dict:
    try:
        from factrl.kernels._shared_table import SHARED
    except ImportError:  # not generated yet: nothing is pruned
        return {}
    return SHARED


def shared_bytes(kernel: str, role: str, meta: dict, warps: int, stages: int, a_bytes: int, b_bytes: int,
                 arch: int) -> int | None:
    """Shared memory of one config on ``arch`` (compute capability x 10) as the compiler allocated
    it (the nearest measured architecture at or below ``arch``); None when not measured."""
    entry = _table().get((kernel, role, a_bytes, b_bytes, config_name(meta, warps, stages)))
    if not entry:
        return None
    below = [a for a in entry if a <= arch]
    return entry[max(below) if below else min(entry)]


@functools.lru_cache(maxsize=None)
def device_arch_and_limit(index: int) -> tuple[int, int]:
    """(compute capability x 10, opt-in per-block shared memory) of CUDA device ``index``."""
    import torch

    props = torch.cuda.get_device_properties(index)
    arch = props.major * 10 + props.minor
    optin = getattr(props, "shared_memory_per_block_optin", None)
    return arch, int(optin) if optin else SHARED_LIMIT.get(arch, min(SHARED_LIMIT.values()))


def fit(configs, size, limit: int) -> list:
    """The configs with ``size(config) <= limit`` or no measured size; the smallest one if none
    is left (the autotuner needs one; its launch then reports the error)."""
    sized = [(size(c), c) for c in configs]
    kept = [c for s, c in sized if s is None or s <= limit]
    return kept or [min(sized, key=lambda sc: sc[0])[1]]


def pruner(kernel: str, tensor_arg: str, b_arg: str, role=lambda named_args, kwargs: "-"):
    """An ``early_config_prune`` for ``triton.autotune``: drops the configs whose shared memory
    (operand widths from ``named_args[tensor_arg]`` and ``named_args[b_arg]``) exceeds the limit
    of the device holding ``named_args[tensor_arg]``. CPU tensors (the interpreter) keep all."""

    def prune(configs, named_args, **kwargs):
        t = named_args[tensor_arg]
        if not getattr(t, "is_cuda", False):
            return configs
        arch, limit = device_arch_and_limit(t.device.index or 0)
        r = role(named_args, kwargs)
        a, b = t.element_size(), named_args[b_arg].element_size()
        return fit(configs, lambda c: shared_bytes(kernel, r, c.kwargs, c.num_warps, c.num_stages, a, b, arch),
                   limit)

    return prune
