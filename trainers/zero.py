"""DeepSpeed ZeRO for the supervised stages (``run.distributed=deepspeed``): SFT (full, qlora) and RM.

Only this file imports deepspeed, and only when a stage selects it (``import_deepspeed``), so the
package runs without it. The engine owns what ZeRO partitions — the fp32 master weights, Adam
states, gradients (stage 2) and parameters (stage 3) — and factrl keeps what it owns elsewhere:
the data order (``batch_indices``), the loss normalization, the schedule (``lr_lambda``), the
config, the checkpoint directory with its manifest and ``COMPLETE`` marker, and the llava-hf export.

Launch with torchrun (``torchrun --nproc_per_node N -m factrl.trainers.cli sft ...``) or DeepSpeed's
launcher (``deepspeed --no_local_rank --num_gpus N --module factrl.trainers.cli sft ...``); on CPU
the process group is gloo (the CI tests: two processes, ``DS_ACCELERATOR=cpu``).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch

from factrl.trainers.config import Config, ConfigError

INSTALL = ("pip install 'factrl[deepspeed]' (or pip install 'deepspeed>=0.19'); it installs without CUDA: its ops "
           "are built on first use, and factrl needs none of them (AdamW runs as torch_adam)")

# Keys of a DeepSpeed JSON that factrl sets from the stage's own config (a JSON may leave them "auto").
OURS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
        "optimizer", "scheduler")


def import_deepspeed():
    """deepspeed, or a ConfigError saying how to install it. On a machine without CUDA, DeepSpeed's
    CPU accelerator (set before the import: DeepSpeed reads it once)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(f"run.distributed=deepspeed needs DeepSpeed, which is not importable here ({e}). "
                          f"Install it: {INSTALL}") from e
    return deepspeed


def init_process_group() -> tuple[int, int]:
    """(rank, world) through ``deepspeed.init_distributed``: nccl on CUDA, gloo on CPU. A single
    process started without a launcher gets the environment a launcher would give (world 1)."""
    if "WORLD_SIZE" not in os.environ:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed = import_deepspeed()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def bf16_enabled(cfg: Config, quantized: bool) -> bool:
    want = cfg.run.deepspeed.bf16
    if want == "auto":  # an NF4 base's fp32 absmax must not be cast to bf16 with the module
        return torch.cuda.is_available() and cfg.model.dtype == "bfloat16" and not quantized
    return want == "true"


def ds_config(cfg: Config, loop, world: int, quantized: bool) -> dict:
    """The DeepSpeed config of a stage: ZeRO from ``run.deepspeed`` (or its JSON), the rest from the
    stage's loop config, so one process x accumulation and N processes train alike."""
    d = cfg.run.deepspeed
    if d.config:
        base = json.loads(Path(d.config).read_text())
    else:
        # The original's SFT runs ZeRO-3 in bf16 (LLaVA-RLHF SFT/scripts/13b-v1.5-336/sft.sh:21-22,30:
        # `deepspeed train/train.py --deepspeed ./scripts/zero3.json ... --bf16 True`; that JSON is not
        # in the repository we read). overlap_comm overlaps GPU streams: off on CPU.
        zero = {"stage": d.zero_stage, "contiguous_gradients": True, "overlap_comm": torch.cuda.is_available()}
        if d.offload_optimizer != "none":
            zero["offload_optimizer"] = {"device": d.offload_optimizer, "pin_memory": torch.cuda.is_available()}
        if d.offload_param != "none":
            zero["offload_param"] = {"device": d.offload_param, "pin_memory": torch.cuda.is_available()}
        if d.zero_stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        base = {"zero_optimization": zero, "bf16": {"enabled": bf16_enabled(cfg, quantized)}}
    ours = {
        "train_micro_batch_size_per_gpu": loop.batch_size,
        "gradient_accumulation_steps": loop.grad_accum,
        "train_batch_size": loop.batch_size * loop.grad_accum * world,
        "gradient_clipping": loop.grad_clip,
        # torch.optim.AdamW itself: the single-process trainer's optimizer, and no op to build
        "optimizer": {"type": "AdamW", "params": {"lr": loop.lr, "betas": list(loop.betas), "eps": 1e-8,
                                                  "weight_decay": loop.weight_decay, "torch_adam": True}},
    }
    for k in OURS:
        if k in base and base[k] != "auto" and base[k] != ours.get(k):
            raise ConfigError(f"run.deepspeed.config={d.config}: {k!r} = {base[k]!r}, but factrl sets it from the "
                              f"stage's config ({ours.get(k, 'its lr schedule')!r}); use \"auto\" or leave it out")
        base.pop(k, None)
    stage = int(base.get("zero_optimization", {}).get("stage", 0))
    if quantized and stage == 3:
        raise ConfigError("run.deepspeed: ZeRO-3 partitions parameters, but an NF4 base's weights are packed "
                          "buffers that it cannot gather; use run.deepspeed.zero_stage=2 for qlora SFT and the RM "
                          "(its adapters are what trains: optimizer states and gradients are partitioned)")
    return {**base, **ours, "steps_per_print": 1 << 30, "wall_clock_breakdown": False,
            # a client-side AdamW with offload: DeepSpeed would otherwise insist on its compiled CPU Adam
            "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True}


class LossModule(torch.nn.Module):
    """What the engine forwards: the stage's loss function on ``model``. Under ZeRO-3 every weight
    is gathered by the forward hooks of the module that owns it; the weights a loss reads outside
    their own module's forward (the lm_head weight given to the fused log-prob kernel, the scalar
    heads) are registered as external parameters of this module, gathered for its forward and
    backward."""

    def __init__(self, model: torch.nn.Module, loss_fn, external: list):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn
        self.external = external

    def forward(self, batch: dict, norm: float):
        return self.loss_fn(batch, norm)


def initialize(cfg: Config, model, params: list, loop, world: int, loss_fn, lr_lambda_fn, quantized: bool):
    """The engine training ``params`` of ``model`` (a ``LossModule`` around ``loss_fn``) with the
    stage's AdamW and a LambdaLR of ``lr_lambda_fn`` built on DeepSpeed's own optimizer."""
    deepspeed = import_deepspeed()
    conf = ds_config(cfg, loop, world, quantized)
    external = [model.lm_head.weight, *model.heads.parameters()]
    module = LossModule(model, loss_fn, external)
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda_fn)  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, config=conf, lr_scheduler=sched)
    if engine.zero_optimization_stage() == 3:
        for p in external:
            deepspeed.zero.register_external_parameter(module, p)
    return engine


def full_state(engine):
    """A context in which every parameter of the engine's model is whole on every process
    (ZeRO-3 gathers the partitions; nothing to do below stage 3). Gathers the whole model at once:
    memory for one full copy in the engine's dtype per device, after training."""
    import contextlib

    if engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    return import_deepspeed().zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
