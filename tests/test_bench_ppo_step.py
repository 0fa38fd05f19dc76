"""benchmarks/bench_ppo_step.py --smoke: one PPO step (rollout, scoring, training) at tiny shapes on
CPU, with factrl plan's bytes in the same rows."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ppo_step.py"


def test_ppo_step_smoke_reports_every_phase_beside_the_plan(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_ppo_step", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    summary = mod.main(["--smoke", "--results", str(tmp_path)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["smoke"] is True
    rows = {r["phase"]: r for r in summary["table"]}
    for phase in ("rollout", "scoring", "training"):
        r = rows[phase]
        assert r["tokens"] > 0 and r["seconds"] > 0 and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"],
                                                                                             rel=1e-2)
    assert rows["rollout"]["tokens"] == 2 * 3  # rollout chunk x new tokens: EOS never cuts a row short
    # the plan's numbers for the same settings sit in the same rows
    for phase in ("model", "rollout", "training", "plan peak"):
        assert rows[phase]["plan_bytes"] > 0
    assert "CUDA" in rows["peer rollout (transformers+bnb)"]["skipped"]
    saved = [json.loads(line) for line in (tmp_path / Path(summary["file"]).name).read_text().splitlines()]
    assert {r["phase"] for r in saved} >= {"rollout", "scoring", "training"}
