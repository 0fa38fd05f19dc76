"""``make train``: ShapesWorld → SFT (full, tiny) → RM (fact-augmented) → PPO → eval, from nothing.

Every stage writes under ``run.out_dir``; a stage whose final output exists is not redone
(delete it, or the run directory, to redo it). The last line printed is one JSON object.
"""

from __future__ import annotations

import time
from pathlib import Path

from factrl.trainers.config import Config
from factrl.trainers.embedded import prepare
from factrl.trainers.run import RunLayout


def run_stage(cfg: Config, name: str, fn, label: str = "") -> None:
    """``fn(cfg)`` unless stage ``name`` of ``run.out_dir`` is done (its marker exists)."""
    done = RunLayout(Path(cfg.run.out_dir)).done(name)
    if done.is_file():
        print(f"[factrl] {label}{name}: {done.parent} exists, skipping (delete it to retrain)")
    else:
        print(f"[factrl] === {label}{name} ===")
        fn(cfg)


def train_ppo_evaluated(cfg: Config) -> dict:
    """PPO with ShapesWorld's held-out eval every ``ppo.eval_every`` steps (the world-aware callers'),
    and its checker as the reward with ``ppo.reward_source=checker``."""
    from factrl.trainers.eval_stage import ppo_eval_fn
    from factrl.trainers.ppo import train_ppo
    from factrl.trainers.shapesworld.scoring import checker_reward

    p = cfg.ppo
    reward_fn = (checker_reward(cfg.data.root, cfg.data.ppo_prompts_file, p.checker_vague)
                 if p.reward_source == "checker" else None)
    return train_ppo(cfg, eval_fn=ppo_eval_fn(cfg), reward_fn=reward_fn)


def run_pipeline(cfg: Config) -> dict:
    from factrl.trainers.eval_stage import evaluate_stages
    from factrl.trainers.rm import train_rm
    from factrl.trainers.sft import train_sft

    t0 = time.time()
    times = {}
    prepare(cfg)
    for name, fn in (("sft", train_sft), ("rm", train_rm), ("ppo", train_ppo_evaluated)):
        t = time.time()
        run_stage(cfg, name, fn)
        times[name] = round(time.time() - t, 1)
    t = time.time()
    print("[factrl] === eval ===")
    summary = evaluate_stages(cfg)
    times["eval"] = round(time.time() - t, 1)
    return {"pipeline": "done", "seconds": round(time.time() - t0, 1), "stage_seconds": times, **summary}
