"""``make train``: ShapesWorld → SFT (full, tiny) → RM (fact-augmented) → PPO → eval, from nothing.

Every stage writes under ``run.out_dir``; a stage whose final output exists is not redone
(delete it, or the run directory, to redo it). The last line printed is one JSON object.
"""

from __future__ import annotations

import time

from factrl.trainers.common import stage_dir
from factrl.trainers.config import Config
from factrl.trainers.setup import ensure_base_checkpoint, ensure_dataset


def run_pipeline(cfg: Config) -> dict:
    from factrl.trainers.evaluate_model import evaluate_stages
    from factrl.trainers.ppo import train_ppo
    from factrl.trainers.rm import train_rm
    from factrl.trainers.sft import train_sft

    t0 = time.time()
    times = {}
    ensure_dataset(cfg)
    ensure_base_checkpoint(cfg)
    stages = [("sft", train_sft, stage_dir(cfg, "sft") / "final" / "config.json"),
              ("rm", train_rm, stage_dir(cfg, "rm") / "reward_adapter" / "adapter_config.json"),
              ("ppo", train_ppo, stage_dir(cfg, "ppo") / "policy_adapter" / "adapter_config.json")]
    for name, fn, done in stages:
        t = time.time()
        if done.is_file():
            print(f"[factrl] {name}: {done.parent} exists, skipping (delete it to retrain)")
        else:
            print(f"[factrl] === {name} ===")
            fn(cfg)
        times[name] = round(time.time() - t, 1)
    t = time.time()
    print("[factrl] === eval ===")
    summary = evaluate_stages(cfg)
    times["eval"] = round(time.time() - t, 1)
    return {"pipeline": "done", "seconds": round(time.time() - t0, 1), "stage_seconds": times, **summary}
