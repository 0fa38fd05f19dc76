"""End to end: `factrl pipeline` (what `make train` runs) on a micro configuration."""

import json
import subprocess
import sys

from micro import MICRO_MODEL

from factrl.trainers.config import load_config

MICRO = [*MICRO_MODEL, "data.shapes_n=48", "sft.max_steps=6", "rm.max_steps=3", "rm.eval_every=0",
         "ppo.rollout_batch_size=16", "ppo.rollout_chunk_size=16", "ppo.step_batch_size=8", "ppo.batch_size=8",
         "ppo.max_response_len=6", "ppo.total_steps=2", "eval.max_items=8", "eval.max_new_tokens=8"]


def test_pipeline_end_to_end_via_cli(tmp_path):
    cmd = [sys.executable, "-m", "factrl.trainers.cli", "pipeline", *MICRO, f"run.out_dir={tmp_path}/run",
           f"data.root={tmp_path}/run/data"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])  # the last line is one JSON object
    assert last["pipeline"] == "done"
    for col in ("sft", "ppo"):
        for k in ("hallucination_rate", "pope_f1_random", "chair_i", "rm_accuracy"):
            assert k in last[col]
        assert 0.0 <= last[col]["hallucination_rate"] <= 1.0
    # the image-blind baseline is scored on the same sets; it is no policy, so it has no RM accuracy
    assert 0.0 <= last["blind"]["pope_accuracy_random"] <= 1.0 and last["blind"]["rm_accuracy"] is None
    run = tmp_path / "run"
    for f in ("sft/final/config.json", "rm/reward_adapter/adapter_config.json",
              "ppo/policy_adapter/adapter_config.json", "eval/table.txt", "sft/config.yaml", "ppo/curves.png",
              "rm/metrics.jsonl"):
        assert (run / f).is_file(), f
    assert "hallucination rate" in (run / "eval/table.txt").read_text()
    # a second run reuses every finished stage
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r2.returncode == 0 and r2.stdout.count("exists, skipping") == 3
    # the resolved config travels with the outputs
    saved = load_config(str(run / "ppo" / "config.yaml"))
    assert saved.ppo.total_steps == 2 and saved.run.out_dir == str(run)
