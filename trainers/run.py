"""A run's place and process: its directory layout, device, seeds, processes, autocast."""

from __future__ import annotations

import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RunLayout:
    """Every path a run writes, under ``run.out_dir``: one object instead of paths spelled out
    in each stage. A stage is *done* when its marker file exists (written last, atomically)."""

    root: Path

    def stage(self, name: str) -> Path:  # <root>/{sft, rm, ppo, eval}: config, metrics, checkpoints
        return self.root / name

    tiny_base = property(lambda self: self.root / "tiny_base")  # the embedded default's random base
    sft_final = property(lambda self: self.root / "sft" / "final")  # llava-hf: what RM and PPO quantize
    sft_adapter = property(lambda self: self.root / "sft" / "adapter")  # qlora only, PEFT format
    reward_adapter = property(lambda self: self.root / "rm" / "reward_adapter")  # PEFT + heads.safetensors
    policy_adapter = property(lambda self: self.root / "ppo" / "policy_adapter")
    value_adapter = property(lambda self: self.root / "ppo" / "value_adapter")
    merged_policy = property(lambda self: self.root / "ppo" / "merged")

    def done(self, stage: str) -> Path:
        return {"sft": self.sft_final / "config.json", "rm": self.reward_adapter / "adapter_config.json",
                "ppo": self.policy_adapter / "adapter_config.json"}[stage]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={name!r} but CUDA is not available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def init_distributed() -> tuple[int, int]:
    """(rank, world) — initializes a process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _multi() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Average gradients of the trainable parameters over processes (DDP on what trains)."""
    if not _multi():
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def all_sum(x: float) -> float:
    """``x`` summed over processes (itself in a single process)."""
    if not _multi():
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


@contextmanager
def autocast(device: torch.device, dtype_name: str):
    """bf16/fp16 autocast on GPU; plain fp32 on CPU."""
    if device.type == "cuda" and dtype_name in ("bfloat16", "float16"):
        with torch.autocast("cuda", dtype=getattr(torch, dtype_name)):
            yield
    else:
        yield
