"""A run's place and process: its directory layout, device, seeds, processes, autocast."""

from __future__ import annotations

import json
import os
import random
import socket
import time
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


class RunDirError(RuntimeError):
    """The out_dir is another run's: locked by a live process, or holding results a fresh run would mix with."""


LOCK = ".factrl.lock"


def _proc_start(pid: int) -> str:
    """The process' start time in clock ticks (/proc), so a reused pid is not taken for the locker."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        pass
    return not start or not _proc_start(pid) or _proc_start(pid) == start


def lock_out_dir(root: Path) -> Path:
    """Make ``root`` this process' run directory: ``<root>/.factrl.lock`` holds pid, host and start
    time; a lock of a live process refuses (RunDirError), a stale one (its process is gone, on this
    host) is taken over. Re-entrant in one process (the pipeline runs its stages one by one); the
    lock is dropped when the process exits, or found stale after a kill -9. Rank 0 only under torchrun."""
    if int(os.environ.get("RANK", "0")) != 0:
        return root / LOCK
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid())}
    for _ in range(3):
        tmp = root / f"{LOCK}.{me['pid']}"
        tmp.write_text(json.dumps({**me, "time": time.time()}))
        try:  # link: the lock appears complete or not at all
            os.link(tmp, path)
        except FileExistsError:
            try:
                held = json.loads(path.read_text())
                pid, host, start = int(held["pid"]), str(held["host"]), str(held.get("start", ""))
            except (OSError, ValueError, KeyError, TypeError):  # torn by a kill mid-write: nobody holds it
                path.unlink(missing_ok=True)
                continue
            if (pid, host, start) == (me["pid"], me["host"], me["start"]):
                return path
            if host != me["host"] or _alive(pid, start):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("time", 0)))
                raise RunDirError(f"{root} is in use by another run (pid {pid} on {host}, since {since}): two runs "
                                  f"would mix their checkpoints and metrics. Wait for it, or delete {path} if that "
                                  "process is gone")
            print(f"[factrl] {path}: stale lock of pid {pid} (gone), taking it over")
            path.unlink(missing_ok=True)
            continue
        finally:
            tmp.unlink(missing_ok=True)
        import atexit

        atexit.register(_unlock, path, me["pid"])
        return path
    raise RunDirError(f"{path}: could not take the run lock")


def _unlock(path: Path, pid: int) -> None:
    try:
        if json.loads(path.read_text()).get("pid") == pid == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from factrl.trainers.config import ConfigError

        raise ConfigError(f"run.device={name!r} but CUDA is not available (run.device=cpu or auto)")
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


def all_reduce_grads(params: Iterable[torch.nn.Parameter], average: bool = True) -> None:
    """Gradients of the trainable parameters combined over processes (DDP on what trains):
    averaged when each process' loss is a mean over its own rows (PPO), summed when it is already
    its share of a mean over the global batch (the supervised loop divides by a global count)."""
    if not _multi():
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            if average:
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
