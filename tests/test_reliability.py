"""Issue 17: no run destroys data, resume never trains on garbage, bad values are refused before work.

One test (or more) per observed defect, numbered as in the issue. Most drive a ``Stage`` with a toy
model (a linear layer, milliseconds a step): the stage - lock, checkpoints, manifests, resume,
config comparison, signals - is what SFT, RM and PPO share. The kill -9 property runs the real CLI.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from micro import MICRO_MODEL

from factrl.trainers.checkpoint import CheckpointError, Checkpoints
from factrl.trainers.config import ConfigError, load_config
from factrl.trainers.logs import read_metrics
from factrl.trainers.run import RunDirError, lock_out_dir
from factrl.trainers.stage import Interrupted, Stage

MICRO = [*MICRO_MODEL, "data.shapes_n=40", "sft.batch_size=4", "sft.lr=3e-3"]


# ---- a toy stage: the real Stage around a linear layer --------------------------------------------------
def toy_cfg(out, *extra):
    return load_config("tiny", [f"run.out_dir={out}", "run.progress=false", "sft.save_every=2", "sft.keep_last=2",
                                "sft.warmup_steps=1", "sft.schedule=cosine", *extra])


def toy_run(out, steps=6, *extra, die_after=None, on_step=None):
    """Train a 4->1 linear layer for ``steps`` steps as stage "sft"; ``die_after``: raise
    KeyboardInterrupt after that step (a kill right after it); ``on_step(step)`` runs mid-step."""
    cfg = toy_cfg(out, *extra)
    stage = Stage(cfg, "sft")
    model = torch.nn.Linear(4, 1)  # initialized from the seeded global RNG
    stage.train(model, list(model.parameters()), cfg.sft, steps)
    for step in range(stage.start, steps):
        x = torch.randn(8, 4)  # the global RNG: restored from the checkpoint on resume
        loss = ((model(x) - 1) ** 2).mean()
        loss.backward()
        if on_step is not None:
            on_step(step + 1)
        stage.optimizer_step(loss.detach())
        stage.end_step(step + 1, {"loss": float(loss.detach()), "lr": stage.lr})
        if die_after == step + 1:
            raise KeyboardInterrupt("simulated kill")
    stage.finish(["loss"])
    return read_metrics(out / "sft" / "metrics.jsonl")


def losses(rows):
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return toy_run(tmp_path_factory.mktemp("straight"), 6)


def killed_at(out, step, *extra):
    with pytest.raises(KeyboardInterrupt):
        toy_run(out, 6, *extra, die_after=step)


# ---- 1. the embedded world never writes into a user's data folder -------------------------------------
def test_1_shapesworld_is_not_generated_into_a_users_data_folder(tmp_path):
    from factrl.trainers.data import DataError
    from factrl.trainers.embedded import ensure_dataset

    user = tmp_path / "mydata"
    (user / "images").mkdir(parents=True)
    (user / "preference.json").write_text('["mine"]')
    (user / "images" / "cat.png").write_bytes(b"my picture")
    before = {p: p.read_bytes() for p in user.rglob("*") if p.is_file()}
    cfg = load_config("tiny", [f"data.root={user}", "data.sft_file=absent.json", f"run.out_dir={tmp_path}/run",
                               "data.shapes_n=8"])
    with pytest.raises(DataError, match="absent.json.*not generated"):
        ensure_dataset(cfg)
    assert {p: p.read_bytes() for p in user.rglob("*") if p.is_file()} == before  # nothing written
    # a new folder, or one the run owns (under run.out_dir), is generated into
    for root in (tmp_path / "new", tmp_path / "run" / "data"):
        ensure_dataset(load_config("tiny", [f"data.root={root}", f"run.out_dir={tmp_path}/run", "data.shapes_n=8"]))
        assert (root / "sft.json").is_file()


def test_1_a_world_generated_with_other_settings_is_not_used_in_their_place(tmp_path):
    """Defect: data.root kept its first world whatever data.shapes_* asked later (a `make train` after
    an experiment with data.shapes_habit=0.65 trained on the habit data, silently)."""
    from factrl.trainers.data import DataError
    from factrl.trainers.embedded import ensure_dataset

    args = [f"data.root={tmp_path}/data", f"run.out_dir={tmp_path}", "data.shapes_n=8",
            "data.shapes_habit_object=absent", "data.shapes_habit_counted=false"]
    ensure_dataset(load_config("tiny", args + ["data.shapes_habit=0.5"]))
    sft = (tmp_path / "data" / "sft.json").read_bytes()
    ensure_dataset(load_config("tiny", args + ["data.shapes_habit=0.5"]))  # the same world: reused
    with pytest.raises(DataError, match=r"shapes_habit=0.5 \(asked: 0.0\)"):
        ensure_dataset(load_config("tiny", args + ["data.shapes_habit=0"]))
    with pytest.raises(DataError, match=r"shapes_habit_counted=False \(asked: True\)"):
        ensure_dataset(load_config("tiny", args + ["data.shapes_habit=0.5", "data.shapes_habit_counted=true"]))
    with pytest.raises(DataError, match=r"shapes_habit_object='absent' \(asked: 'present'\)"):
        ensure_dataset(load_config("tiny", args + ["data.shapes_habit=0.5", "data.shapes_habit_object=present"]))
    assert (tmp_path / "data" / "sft.json").read_bytes() == sft  # nothing rewritten


# ---- 2. a reused out_dir: no fresh run on another's results, keep-last, resume past the end ---------------
def test_2_fresh_run_into_a_used_stage_dir_refuses_and_overwrite_replaces_it(tmp_path, straight):
    out = tmp_path / "run"
    toy_run(out, 6)
    with pytest.raises(RunDirError, match="run.resume=auto.*run.overwrite=true"):
        toy_run(out, 4)
    assert [p.name for p in Checkpoints(out / "sft" / "checkpoints").complete()] == ["step-00000004",
                                                                                      "step-00000006"]
    rows = toy_run(out, 4, "run.overwrite=true")  # asked for: the old run's results go
    assert losses(rows) == losses(toy_run(tmp_path / "fresh", 4))  # the same as into a new directory
    assert [p.name for p in Checkpoints(out / "sft" / "checkpoints").complete()] == ["step-00000002",
                                                                                      "step-00000004"]


def test_2_keep_last_never_deletes_a_newer_checkpoint(tmp_path):
    cfg = load_config("tiny")
    ck = Checkpoints(tmp_path / "ck", keep=2)
    for s in (200, 205):
        ck.save(s, {"x": torch.ones(1)}, cfg)
    ck.save(10, {"x": torch.zeros(1)}, cfg)  # main deleted step 10 at once (it counted 200 and 205 as newer)
    assert [p.name for p in ck.complete()] == ["step-00000010", "step-00000200", "step-00000205"]


def test_2_resume_past_the_configured_steps_refuses(tmp_path):
    out = tmp_path / "run"
    toy_run(out, 6)
    final = (out / "sft" / "metrics.jsonl").read_bytes()
    with pytest.raises(CheckpointError, match="step 6, past this run's 4 steps"):
        toy_run(out, 4, "run.resume=auto")
    assert (out / "sft" / "metrics.jsonl").read_bytes() == final


# ---- 3. a corrupt or truncated checkpoint is reported and the previous one used ------------------------
@pytest.mark.parametrize("damage", ["zeroed", "truncated"])
def test_3_bad_newest_checkpoint_is_named_and_the_previous_one_resumed(tmp_path, straight, capfd, damage):
    out = tmp_path / "run"
    killed_at(out, 4)  # checkpoints at steps 2 and 4
    state = out / "sft" / "checkpoints" / "step-00000004" / "state.pt"
    data = bytearray(state.read_bytes())
    if damage == "zeroed":
        data[100:100 + 64] = bytes(64)  # zeros inside the file (main resumed on it silently)
    else:
        data = data[:len(data) // 2]  # main crashed with torch's error, naming no file
    state.write_bytes(bytes(data))
    rows = toy_run(out, 6, "run.resume=auto")
    assert str(state.parent) in capfd.readouterr().err
    assert losses(rows) == losses(straight) and [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_3_no_usable_checkpoint_is_an_error_naming_each(tmp_path):
    cfg = load_config("tiny")
    ck = Checkpoints(tmp_path / "ck", keep=0)
    for s in (1, 2):
        ck.save(s, {"x": torch.ones(1000)}, cfg)
        (ck.root / f"step-{s:08d}" / "state.pt").write_bytes(b"torn")
    with pytest.raises(CheckpointError, match="step-00000002.*\n.*step-00000001"):
        ck.resolve("auto")
    with pytest.raises(CheckpointError, match="step-00000001"):
        ck.resolve(str(ck.root / "step-00000001"))
    # a checkpoint written before manifests had none: still accepted, a bad file is named on load
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "COMPLETE").write_text("3")
    (legacy / "state.pt").write_bytes(b"PK\x03\x04 torn")
    assert ck.resolve(str(legacy)) == legacy
    with pytest.raises(CheckpointError, match=f"{legacy}/state.pt: unreadable"):
        Checkpoints.load(legacy)


def test_3_temp_dirs_of_dead_writers_are_removed_on_start(tmp_path):
    out = tmp_path / "run"
    killed_at(out, 2)
    ckdir = out / "sft" / "checkpoints"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a pid that has exited
    leftovers = [ckdir / f".step-00000004.tmp-{pid}-x1y2", out / "sft" / f".config.yaml.tmp-{pid}"]
    leftovers[0].mkdir()
    (leftovers[0] / "state.pt").write_bytes(b"half")
    leftovers[1].write_text("half")
    # a directory moved aside just before its replacement's rename: put back
    (ckdir / "step-00000002").rename(ckdir / f".step-00000002.old-{pid}")
    toy_run(out, 6, "run.resume=auto")
    assert not any(p.exists() for p in leftovers)
    assert not [p for p in ckdir.iterdir() if p.name.startswith(".")]


# ---- 4. a changed config on resume ----------------------------------------------------------------------
def test_4_resume_with_changed_optimization_refuses_or_overrides_and_logs(tmp_path, straight):
    out = tmp_path / "run"
    killed_at(out, 2)
    for change, key in (("sft.lr=1e-5", "sft.lr"), ("sft.batch_size=2", "sft.batch_size"),
                        ("sft.schedule=constant", "sft.schedule"), ("data.max_seq_len=99", "data.max_seq_len")):
        with pytest.raises(ConfigError, match=f"{key}: .* -> "):
            toy_run(out, 6, "run.resume=auto", change)
    # harmless values (checkpoint cadence, other stages) may change: allowed, logged, the run is the same
    killed_at(tmp_path / "h", 2)
    rows = toy_run(tmp_path / "h", 6, "run.resume=auto", "sft.save_every=3", "ppo.lr=0.5")
    assert losses(rows) == losses(straight)
    log = [json.loads(line) for line in (tmp_path / "h" / "sft" / "resume.log").read_text().splitlines()]
    assert log[-1]["override"] == {} and set(log[-1]["harmless"]) == {"sft.save_every", "ppo.lr"}
    # run.resume_override: the new lr applies from the resumed step on (main kept the old schedule)
    rows = toy_run(out, 6, "run.resume=auto", "sft.lr=1e-5", "run.resume_override=true")
    old_lr, ref, lr = toy_cfg(out).sft.lr, [r["lr"] for r in straight], [r["lr"] for r in rows]
    assert lr[:2] == ref[:2]
    assert lr[2:] == pytest.approx([x * 1e-5 / old_lr for x in ref[2:]])
    log = [json.loads(line) for line in (out / "sft" / "resume.log").read_text().splitlines()]
    assert log[-1]["override"] == {"sft.lr": [toy_cfg(out).sft.lr, 1e-5]}


# ---- 5. two runs on one out_dir -------------------------------------------------------------------------
def test_5_a_second_run_on_a_locked_out_dir_refuses_and_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        from factrl.trainers.run import _proc_start

        lock = out / ".factrl.lock"
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "start": _proc_start(other.pid),
                                    "time": 0}))
        with pytest.raises(RunDirError, match=f"in use by another run \\(pid {other.pid}"):
            toy_run(out, 2)
        assert not (out / "sft").exists()  # refused before writing anything
    finally:
        other.kill()
        other.wait()
    toy_run(out, 2)  # its process is gone: the lock is stale
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert lock_out_dir(out) == lock  # re-entrant: the pipeline's stages share it


# ---- 6. invalid values are refused at load, naming the key ------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("sft.batch_size=-1", "sft.batch_size"), ("sft.batch_size=0", "sft.batch_size"),
    ("ppo.step_batch_size=-8", "ppo.step_batch_size"), ("ppo.max_response_len=0", "ppo.max_response_len"),
    ("ppo.rollout_chunk_size=0", "ppo.rollout_chunk_size"), ("sft.mode=foo", "sft.mode"),
    ("run.device=gpu", "run.device"), ("sft.lr=-1e-3", "sft.lr"), ("model.lora.r=-4", "model.lora.r"),
    ("ppo.kl_estimator=k9", "ppo.kl_estimator"), ("rm.schedule=linear", "rm.schedule"), ("sft.lr=nan", "sft.lr"),
    ("ppo.temperature=0", "ppo.temperature"), ("model.checkpoint=/nonexistent/llava", "model.checkpoint"),
    ("run.resume=/nonexistent/step-1", "run.resume"), ("data.image_aspect=stretch", "data.image_aspect"),
    ("experiment.seeds=[1,1]", "experiment.seeds"), ("sft.betas=[0.9]", "sft.betas"),
])
def test_6_invalid_values_are_config_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("tiny", [override])


def test_6_every_preset_loads_and_errors_are_listed_together():
    from factrl.trainers.config import PRESET_DIR

    for p in sorted(PRESET_DIR.glob("*.yaml")):
        load_config(p.stem)
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["sft.batch_size=0", "ppo.batch_size=-1"])
    assert "'sft.batch_size'" in str(e.value) and "'ppo.batch_size'" in str(e.value)


@pytest.mark.parametrize("gib", ["inf", "-5", "nan", "1e12", "0"])
def test_6_plan_refuses_a_bad_gpu_size(gib, capsys):
    from factrl.trainers.cli import main

    assert main(["plan", "--config", "llava-v1.5-7b", "--gpu-gib", gib]) == 2
    err = capsys.readouterr().err
    assert "--gpu-gib" in err and "Traceback" not in err
    assert main(["plan", "--config", "llava-v1.5-7b", "--gpu-gib", "80"]) == 0


def test_6_the_cli_refuses_before_any_work(tmp_path, capsys):
    from factrl.trainers.cli import main

    out = tmp_path / "run"
    assert main(["sft", f"run.out_dir={out}", f"data.root={out}/data", "sft.batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "'sft.batch_size'" in err and "Traceback" not in err  # one error, one key
    assert not out.exists()  # no data generated, no base built


# ---- 7. I/O errors name the path and leave the checkpoints intact ----------------------------------------
def test_7_a_full_disk_names_the_checkpoint_and_keeps_the_previous(tmp_path):
    """RLIMIT_FSIZE makes writes past 1 MiB fail as a full disk does (EFBIG instead of ENOSPC)."""
    script = f"""
import resource, signal, torch
from factrl.trainers.checkpoint import Checkpoints
from factrl.trainers.config import load_config
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
ck = Checkpoints(__import__("pathlib").Path({str(tmp_path / "ck")!r}), keep=2)
ck.save(1, {{"x": torch.ones(1000)}}, load_config("tiny"))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    ck.save(2, {{"x": torch.ones(1 << 20)}}, load_config("tiny"))
except OSError as e:
    print("ERR", e.filename, "|", e)
print("LATEST", ck.latest().name, sorted(p.name for p in ck.root.iterdir()))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    err = next(line for line in r.stdout.splitlines() if line.startswith("ERR"))
    assert str(tmp_path / "ck" / "step-00000002") in err and "previous checkpoints are intact" in err
    assert "LATEST step-00000001 ['step-00000001']" in r.stdout  # no temp dir left behind


# ---- 8. bad inputs are named when they load ---------------------------------------------------------------
def test_8_a_corrupt_image_is_an_error_naming_the_record_or_skipped(tmp_path):
    from PIL import Image

    from factrl.model.tokenizer import build_tokenizer
    from factrl.trainers.data import DataError, load_sft

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "images" / "good.png")
    (tmp_path / "images" / "bad.png").write_text("not an image")
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]
    recs = [{"id": "g", "image": "good.png", "conversations": conv}, {"id": "b", "image": "bad.png",
                                                                      "conversations": conv}]
    (tmp_path / "sft.json").write_text(json.dumps(recs))
    tok = build_tokenizer(["What is it? A square."], vocab_size=64)
    with pytest.raises(DataError, match="record 1: field 'image': not a readable image: .*bad.png"):
        load_sft(tmp_path / "sft.json", tok, 4, 10_000, image_folder=str(tmp_path / "images"))
    ok = load_sft(tmp_path / "sft.json", tok, 4, 10_000, skip_bad=True, image_folder=str(tmp_path / "images"))
    assert [e.id for e in ok] == ["g"] and ok.stats.n_skipped == 1


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from factrl.trainers.embedded import ensure_tiny_base

    root = tmp_path_factory.mktemp("base")
    return ensure_tiny_base(load_config("tiny", MICRO + [f"run.out_dir={root}", f"data.root={root}/data"]))


def test_8_truncated_safetensors_name_their_file(tmp_path, tiny_base):
    import shutil

    from factrl.model.io import CheckpointError as ModelCheckpointError
    from factrl.model.io import load_adapter, load_llava, save_adapter

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    model = load_llava(base)
    model.add_adapter("policy", 4, 8.0, 0.0, ["q", "v"])
    save_adapter(model, "policy", tmp_path / "adapter")
    for f in (base / "model.safetensors", tmp_path / "adapter" / "adapter_model.safetensors"):
        f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
    with pytest.raises(ModelCheckpointError, match=f"{base}/model.safetensors: unreadable"):
        load_llava(base)
    with pytest.raises(ModelCheckpointError, match="adapter_model.safetensors: unreadable"):
        load_adapter(load_llava(tiny_base), tmp_path / "adapter", "policy")


def test_8_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, straight, capfd):
    out = tmp_path / "run"
    killed_at(out, 3)  # steps 1-3 logged, checkpoint at 2
    with open(out / "sft" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.12')  # a kill mid-write
    rows = toy_run(out, 6, "run.resume=auto")
    assert "torn" in capfd.readouterr().err
    assert losses(rows) == losses(straight) and [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    (out / "m.jsonl").write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match="m.jsonl: line 2"):
        read_metrics(out / "m.jsonl")


# ---- 9. nothing to evaluate; per-run files ---------------------------------------------------------------
def test_9_eval_with_no_eval_sets_is_an_error(tmp_path, tiny_base):
    import shutil

    from factrl.trainers.data import DataError
    from factrl.trainers.eval_stage import evaluate_stages

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_base.parent / "data" / "scenes.json", data)  # ShapesWorld facts, but no eval sets
    cfg = load_config("tiny", MICRO + [f"run.out_dir={tmp_path}/run", f"data.root={data}", f"ppo.base={tiny_base}"])
    with pytest.raises(DataError, match="no eval sets"):
        evaluate_stages(cfg)


def test_9_samples_are_fresh_per_run_and_continued_on_resume(tmp_path, straight):
    def sample(step):  # what PPO writes every sample_every steps
        with open(tmp_path / "run" / "sft" / "samples.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "response": "x"}) + "\n")

    with pytest.raises(KeyboardInterrupt):
        toy_run(tmp_path / "run", 6, die_after=3, on_step=sample)
    toy_run(tmp_path / "run", 6, "run.resume=auto", on_step=sample)
    steps = lambda: [r["step"] for r in read_metrics(tmp_path / "run" / "sft" / "samples.jsonl")]  # noqa: E731
    assert steps() == [1, 2, 3, 4, 5, 6]  # step 3 was redone: its first sample dropped
    toy_run(tmp_path / "run", 6, "run.overwrite=true", on_step=sample)
    assert steps() == [1, 2, 3, 4, 5, 6]


# ---- 10. SIGINT / SIGTERM: the step completes, a checkpoint, one line ---------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_10_a_signal_checkpoints_the_step_and_resume_continues(tmp_path, straight, sig):
    out = tmp_path / "run"
    # what the handlers were before (a shell starting pytest in the background ignores SIGINT, so
    # not necessarily Python's default: session 6's make test run with & failed on that)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match=f"stopped by {sig.name} after step 3 of 6.*step-00000003"):
        toy_run(out, 6, on_step=lambda s: s == 3 and os.kill(os.getpid(), sig))
    assert (out / "sft" / "checkpoints" / "step-00000003" / "COMPLETE").is_file()  # not a save_every step
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
    rows = toy_run(out, 6, "run.resume=auto")
    assert losses(rows) == losses(straight)


# ---- the kill -9 property, through the CLI ---------------------------------------------------------------------
def test_kill_9_at_random_points_then_resume_is_bit_identical(tiny_base, tmp_path):
    """``factrl sft`` killed with SIGKILL at a random moment (after a random number of logged steps
    plus a random delay: during start-up, mid-step, mid-checkpoint), then resumed, for three seeds; the
    second seed's resumed run is also stopped with SIGINT (a checkpoint, one line, exit 130) and
    resumed. Losses equal an uninterrupted run's bit for bit; metrics rows unique and complete.
    Each process costs ~4 s of imports: 7 processes, about a minute."""
    import random
    import shutil
    import time

    from factrl.trainers.sft import train_sft

    args = [*MICRO, "sft.max_steps=10", "sft.save_every=2", "sft.keep_last=2", "run.resume=auto",
            f"data.root={tiny_base.parent}/data"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the in-process reference runs on one thread too

    def start(out):
        if not (out / "tiny_base").exists():
            shutil.copytree(tiny_base, out / "tiny_base")
        return subprocess.Popen([sys.executable, "-m", "factrl.trainers.cli", "sft", *args, f"run.out_dir={out}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def rows(out):
        return read_metrics(out / "sft" / "metrics.jsonl") if (out / "sft" / "metrics.jsonl").is_file() else []

    def after(p, out, n, delay=0.0):  # wait until n steps are logged, then a little longer
        while p.poll() is None and len(rows(out)) < n:
            time.sleep(0.01)
        time.sleep(delay)

    def finish(p):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]

    ref_out = tmp_path / "straight"
    shutil.copytree(tiny_base, ref_out / "tiny_base")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_sft(load_config("tiny", [*args, f"run.out_dir={ref_out}"]))
    finally:
        torch.set_num_threads(threads)
    ref = losses(rows(ref_out))
    assert len(ref) == 10
    for seed in (0, 1, 2):
        rng = random.Random(seed)
        out = tmp_path / f"kill{seed}"
        # seed 1 is killed early and without delay, so its resumed run has steps left for the SIGINT
        # however fast the machine steps (0.2 s is many micro steps on an idle machine)
        at, delay = (rng.randrange(0, 9), rng.uniform(0, 0.2)) if seed != 1 else (rng.randrange(0, 4), 0.0)
        p = start(out)
        after(p, out, at, delay)
        p.kill()
        p.wait()
        logged = len(rows(out))
        p = start(out)
        if seed == 1:  # SIGINT: the step in flight completes and is checkpointed, one line, exit 130
            assert logged <= 7  # so the resumed run has steps left after it passes the killed one's rows
            while p.poll() is None and (not rows(out) or rows(out)[-1]["step"] <= logged):
                time.sleep(0.01)  # a row past the killed run's: the resumed run is training, its handlers set
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=300)
            assert p.returncode == 130, err[-2000:]
            last = err.strip().splitlines()[-1]
            assert "Traceback" not in err and last.startswith("factrl: sft: stopped by SIGINT after step"), err
            p = start(out)
        finish(p)
        got = rows(out)
        assert [r["step"] for r in got] == list(range(1, 11)), (seed, at, delay)
        assert losses(got) == ref, (seed, at, delay)
