"""Checkpoints that really resume: trainable weights, optimizer, schedule, step, guard counters
and every RNG state, written atomically; only complete ones count."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from factrl.model.io import atomic_dir
from factrl.trainers.config import Config, save_config

MANIFEST = "MANIFEST.json"


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    for k, g in (generators or {}).items():
        st[f"gen/{k}"] = g.get_state()
    return st


def set_rng_state(st: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    for k, g in (generators or {}).items():
        if f"gen/{k}" in st:
            g.set_state(st[f"gen/{k}"])


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (torn, corrupt, or not of this run), named by path."""


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(d: Path) -> None:
    """``MANIFEST.json``: size and sha256 of every file under the checkpoint directory ``d`` (by
    relative path: a DeepSpeed checkpoint keeps its partitions in a subdirectory)."""
    files = {p.relative_to(d).as_posix(): {"size": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(d.rglob("*")) if p.is_file() and p.relative_to(d).as_posix() not in (MANIFEST, "COMPLETE")}
    (d / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_checkpoint(d: Path) -> Optional[str]:
    """None if ``d`` is complete and every file matches its manifest, else what is wrong. A
    checkpoint written before manifests existed has none: accepted (its load still names it)."""
    if not (d / "COMPLETE").is_file():
        return "incomplete (no COMPLETE)"
    if not (d / MANIFEST).is_file():
        return None
    try:
        files = json.loads((d / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST}: {e}"
    for name, want in files.items():
        p = d / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != want["size"]:
            return f"{name} has {p.stat().st_size} bytes, the manifest says {want['size']} (truncated?)"
        if file_digest(p) != want["sha256"]:
            return f"{name} does not match its sha256 in {MANIFEST} (corrupted)"
    return None


def remove_dead_temps(d: Path) -> None:
    """Temp files and directories ``atomic_dir`` leaves when its writer is killed
    (``.<name>.tmp-<pid>*``), in ``d`` and ``d/checkpoints``: the caller holds the run lock, so no
    live writer owns them (only this process' own are spared). A ``.<name>.old-*`` (moved aside
    just before the rename) goes back in place when the rename never happened, else is removed."""
    for folder in (d, d / "checkpoints"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = re.fullmatch(r"\.(.+)\.(tmp|old)-(\d+)(-.*)?", p.name)
            if not m or int(m.group(3)) == os.getpid():
                continue
            target = folder / m.group(1)
            if m.group(2) == "old" and not target.exists():
                os.replace(p, target)
                print(f"[factrl] restored {target} (its replacement was interrupted)")
            else:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                print(f"[factrl] removed {p} (left by an interrupted writer)")


@dataclass
class Checkpoints:
    """``<dir>/step-00000042/{state.pt, config.yaml, MANIFEST.json, COMPLETE}``, written into a temp
    dir that replaces the step dir in one rename; only directories with COMPLETE count, and resume
    takes the newest whose files match their manifest (sizes and sha256). Keeps the last ``keep``
    of them up to the step just written (a newer one is never deleted)."""

    root: Path
    keep: int = 2

    def save(self, step: int, state: dict, cfg: Config) -> Path:
        final = self.root / f"step-{step:08d}"
        try:
            with atomic_dir(final) as tmp:
                torch.save(state, tmp / "state.pt")
                save_config(cfg, tmp / "config.yaml")
                write_manifest(tmp)
                (tmp / "COMPLETE").write_text(str(step))
        except (OSError, RuntimeError) as e:  # torch's writer says "iostream error" for a full disk
            if isinstance(e, RuntimeError) and not re.search(r"iostream|write|file|inline_container", str(e), re.I):
                raise
            free = shutil.disk_usage(self.root).free if self.root.is_dir() else -1
            err = getattr(e, "errno", None) or (errno.ENOSPC if 0 <= free < (64 << 20) else errno.EIO)
            raise OSError(err, f"writing checkpoint {final} failed: {os.strerror(err)} ({e}; {free / 2**20:.0f} MiB "
                               "free there); the previous checkpoints are intact", str(final)) from e
        self._prune(final)
        return final

    def _prune(self, final: Path) -> None:
        if self.keep > 0:
            older = [p for p in self.complete() if p.name < final.name]
            for old in older[:max(0, len(older) - (self.keep - 1))]:
                shutil.rmtree(old, ignore_errors=True)

    def save_engine(self, step: int, engine, client_state: dict, cfg: Config, rank: int) -> Path:
        """A DeepSpeed checkpoint, written by every process (each its ZeRO partition) into the one
        ``atomic_dir`` rank 0 opens, with the engine's files under ``engine/`` and the same config,
        manifest and ``COMPLETE`` as ``save``; the rename happens once every process has written.
        ``client_state``: step (the data position), guard counters, RNG states (rank 0's, as ``save``)."""
        import torch.distributed as dist

        def write(tmp: str) -> None:  # every process; returns when every partition is on disk
            engine.save_checkpoint(tmp, tag="engine", client_state=client_state, save_latest=False)
            dist.barrier()

        final = self.root / f"step-{step:08d}"
        if rank == 0:
            with atomic_dir(final) as tmp:
                dist.broadcast_object_list([str(tmp)], src=0)
                write(str(tmp))
                save_config(cfg, tmp / "config.yaml")
                write_manifest(tmp)
                (tmp / "COMPLETE").write_text(str(step))
        else:
            name = [None]
            dist.broadcast_object_list(name, src=0)
            write(name[0])
        dist.barrier()  # the rename is done: every process may read the checkpoint
        if rank == 0:
            self._prune(final)
        return final

    @staticmethod
    def load_engine(path: Path, engine) -> dict:
        """Load a ``save_engine`` checkpoint into ``engine`` (weights, optimizer, schedule); its client state."""
        try:
            loaded, client = engine.load_checkpoint(str(path), tag="engine", load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        except Exception as e:
            raise CheckpointError(f"{path}: DeepSpeed could not load it ({type(e).__name__}: {e}); a ZeRO "
                                  "checkpoint resumes with the number of processes that wrote it") from e
        if loaded is None:
            raise CheckpointError(f"{path}: no DeepSpeed checkpoint under engine/ (written without run.distributed="
                                  "deepspeed? resume with the distributed mode that wrote it)")
        return client

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / "COMPLETE").is_file())

    def latest(self) -> Optional[Path]:
        c = self.complete()
        return c[-1] if c else None

    def resolve(self, resume: str) -> Optional[Path]:
        """``none`` → None; ``auto`` → the newest complete checkpoint that passes its manifest
        (bad ones are reported by path and skipped; None if there is none at all); else a path,
        which must pass."""
        if resume in ("", "none"):
            return None
        if resume != "auto":
            p = Path(resume)
            problem = verify_checkpoint(p)
            if problem:
                raise CheckpointError(f"run.resume={resume}: {problem}")
            return p
        bad = []
        for p in reversed(self.complete()):
            problem = verify_checkpoint(p)
            if problem is None:
                return p
            print(f"[factrl] checkpoint {p} is unusable: {problem}; trying the previous one", file=sys.stderr)
            bad.append(f"{p}: {problem}")
        if bad:
            raise CheckpointError("no usable checkpoint to resume from:\n  " + "\n  ".join(bad))
        return None

    @staticmethod
    def load(path: Path) -> dict:
        try:
            return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        except Exception as e:  # torch raises RuntimeError, pickle errors, EOFError ... for a torn file
            raise CheckpointError(f"{path / 'state.pt'}: unreadable checkpoint ({type(e).__name__}: {e})") from e


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in module.named_parameters()}
    return {names[id(p)]: p.detach().clone() for p in module.parameters() if p.requires_grad}


def load_trainable_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    missing = [k for k in state if k not in params]
    if missing:
        raise KeyError(f"checkpoint holds parameters the model lacks: {missing[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
