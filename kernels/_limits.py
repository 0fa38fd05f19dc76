"""Per-architecture launch limits of the autotuned kernels: shared memory per config, and the
``early_config_prune`` hooks that drop the configs a device cannot launch.

Without pruning, a config over the per-block shared-memory limit is compiled at its first
launch, fails with OutOfResources and is skipped: seconds of compile per shape for nothing.

Shared memory per config comes from ``_shared_table.py``: what Triton's compiler itself
allocated (``metadata.shared``) for sm_80 and sm_90, measured by ``kernels/compile_check.py
--full --write-table`` without a GPU, keyed by kernel, launcher role, operand widths and config
(the most inclusive flags: an upper bound for the others). A config the table lacks gets the
coarse formula below (an upper bound on the pipelined tiles, checked against the compiler by the
same script). ``compile_check`` fails when the compiler allocates more than the number the
pruning uses, so a kept config always launches.
"""

from __future__ import annotations

import functools

# Per-block shared memory a kernel may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {90: 232448, 89: 101376, 86: 101376, 80: 166912}
R_PAD = 64  # LoRA rank the estimates assume (r = 64 of the presets; smaller ranks need less)


def config_name(meta: dict, warps: int, stages: int) -> str:
    return "/".join(f"{k}={v}" for k, v in meta.items()) + f"/w{warps}/s{stages}"


def _table() -> dict:
    try:
        from factrl.kernels._shared_table import SHARED
    except ImportError:  # not generated yet: formulas only
        return {}
    return SHARED


def formula_bytes(kernel: str, role: str, meta: dict, stages: int, a_bytes: int, b_bytes: int) -> int:
    """Coarse upper bound when the table has no entry: ``stages`` buffers of every tile loaded in
    the main loop, plus one tile of layout-conversion scratch and the LoRA operands, all summed."""
    if kernel in ("_nf4_lora_mm_kernel", "_nf4_lora_gemv_kernel"):
        if kernel == "_nf4_lora_gemv_kernel":
            bm, bj, bl = 16, meta["BLOCK_N"], meta["BLOCK_K"]
        else:
            bm, bj, bl = meta["BLOCK_M"], meta["BLOCK_J"], meta["BLOCK_L"]
        loop = stages * (bl * bm * a_bytes + bj * bl // 2)
        convert = bj * bl * a_bytes * (2 if role == "dx" else 1) + bj * bm * 4
        lora = stages * bj * R_PAD * b_bytes + R_PAD * bm * 4
        return loop + convert + lora
    if kernel == "_nf4_lora_proj_kernel":
        bm, bl = meta["BLOCK_M"], meta["BLOCK_L"]
        return stages * (bm * bl * a_bytes + bl * R_PAD * b_bytes) + bm * R_PAD * 4
    if kernel in ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel"):
        bn, bv, bk = meta["BLOCK_N"], meta["BLOCK_V"], meta["BLOCK_K"]
        return stages * (bn * bk * a_bytes + bv * bk * b_bytes) + bn * bv * 4
    raise KeyError(f"no shared-memory estimate for {kernel}")


def shared_bytes(kernel: str, role: str, meta: dict, warps: int, stages: int, a_bytes: int, b_bytes: int,
                 arch: int) -> int:
    """Shared memory of one config on ``arch`` (compute capability x 10): the compiler's number
    from the table (the nearest measured architecture at or below ``arch``), else the formula."""
    entry = _table().get((kernel, role, a_bytes, b_bytes, config_name(meta, warps, stages)))
    if entry:
        below = [a for a in entry if a <= arch]
        return entry[max(below) if below else min(entry)]
    return formula_bytes(kernel, role, meta, stages, a_bytes, b_bytes)


@functools.lru_cache(maxsize=None)
def device_arch_and_limit(index: int) -> tuple[int, int]:
    """(compute capability x 10, opt-in per-block shared memory) of CUDA device ``index``."""
    import torch

    props = torch.cuda.get_device_properties(index)
    arch = props.major * 10 + props.minor
    optin = getattr(props, "shared_memory_per_block_optin", None)
    return arch, int(optin) if optin else SHARED_LIMIT.get(arch, min(SHARED_LIMIT.values()))


def fit(configs, size, limit: int) -> list:
    """The configs with ``size(config) <= limit``; the smallest one if none is (the autotuner
    needs one; its launch then reports the error)."""
    sized = [(size(c), c) for c in configs]
    kept = [c for s, c in sized if s <= limit]
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
