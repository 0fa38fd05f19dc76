"""run.report_to: tensorboard (default), wandb (optional extra, offline), none."""

import json
import sys
from types import SimpleNamespace

import pytest

from factrl.trainers.logs import Logger, read_metrics, report_targets


def test_report_to_parses_and_rejects_unknown_names():
    assert report_targets("tensorboard") == {"tensorboard"}
    assert report_targets("tensorboard, wandb") == {"tensorboard", "wandb"}
    assert report_targets("none") == set()
    with pytest.raises(ValueError, match="run.report_to.*mlflow"):
        report_targets("mlflow")


def test_tensorboard_gets_every_scalar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = Logger(tmp_path, 2, "t", progress=False)
    log.log(1, {"loss": 0.5, "eval/f1": 0.25, "name": "x"})
    log.log(2, {"loss": 0.4})
    log.close()
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("loss")] == [(1, 0.5), (2, pytest.approx(0.4))]
    assert [e.step for e in ea.Scalars("eval/f1")] == [1]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_none_writes_only_the_jsonl(tmp_path):
    log = Logger(tmp_path, 1, "t", progress=False, report_to="none")
    log.log(1, {"loss": 0.5})
    log.close()
    assert not (tmp_path / "tb").exists() and read_metrics(tmp_path / "metrics.jsonl")[0]["loss"] == 0.5


class _FakeWandb:
    """What Logger calls on the wandb module (wandb itself is an optional extra, not installed here)."""

    def __init__(self):
        self.calls = []

    def init(self, **kw):
        self.calls.append(("init", kw))
        run = SimpleNamespace(log=lambda d, step: self.calls.append(("log", d, step)),
                              finish=lambda: self.calls.append(("finish",)))
        return run


def test_wandb_runs_offline_and_gets_the_rows(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log = Logger(tmp_path / "run" / "ppo", 2, "ppo", progress=False, report_to="wandb",
                 run_config={"ppo": {"lr": 1e-5}}, project="proj")
    log.log(1, {"reward": 1.5, "eval/f1": 0.5, "note": "text"})
    log.close()
    (kind, kw), *rest = fake.calls
    assert kind == "init" and kw["mode"] == "offline" and kw["project"] == "proj" and kw["name"] == "run/ppo"
    assert kw["config"] == {"ppo": {"lr": 1e-5}} and kw["dir"] == str(tmp_path / "run" / "ppo")
    assert rest == [("log", {"reward": 1.5, "eval/f1": 0.5}, 1), ("finish",)]
    assert not (tmp_path / "run" / "ppo" / "tb").exists()  # wandb alone: no tensorboard
    assert json.loads((tmp_path / "run" / "ppo" / "metrics.jsonl").read_text())["note"] == "text"


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match="factrl\\[wandb\\]"):
        Logger(tmp_path, 1, "t", progress=False, report_to="tensorboard,wandb")


@pytest.mark.parametrize("report_to", ["tensorboard", "none"])
def test_a_stage_logs_where_run_report_to_says(tmp_path, report_to):
    import torch

    from factrl.trainers.config import load_config
    from factrl.trainers.stage import Stage

    cfg = load_config("tiny", [f"run.out_dir={tmp_path}", f"run.report_to={report_to}", "run.progress=false"])
    stage = Stage(cfg, "probe")
    stage.train(None, [torch.nn.Parameter(torch.zeros(2))], cfg.sft, 1)
    stage.log.log(1, {"loss": 1.0})
    stage.log.close()
    assert (tmp_path / "probe" / "tb").is_dir() == (report_to == "tensorboard")
    assert read_metrics(tmp_path / "probe" / "metrics.jsonl")[0]["loss"] == 1.0


def test_real_wandb_offline_run(tmp_path, monkeypatch):
    """With the optional extra installed: an offline run directory with the logged rows (no network)."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = Logger(tmp_path / "run" / "rm", 2, "rm", progress=False, report_to="wandb", run_config={"rm": {"lr": 0.1}})
    log.log(1, {"loss": 0.7})
    log.log(2, {"loss": 0.6, "eval/acc": 0.5})
    log.close()
    runs = list((tmp_path / "run" / "rm" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))  # the run's log, for `wandb sync` later
    assert not (tmp_path / "run" / "rm" / "tb").exists()
