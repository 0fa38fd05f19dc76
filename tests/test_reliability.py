"""Issue 17: no run destroys data, resume never trains on garbage, bad values are refused before work.

One test (or more) per observed defect, numbered as in the issue. Most drive a ``Stage`` with a toy
model (a linear layer, milliseconds a step): the stage - lock, checkpoints, manifests, resume,
config comparison, signals - is what SFT, RM and PPO share. The kill -9 property runs the real CLI.
"""

import pytest
from micro import MICRO_MODEL

from factrl.trainers.config import ConfigError, load_config

MICRO = [*MICRO_MODEL, "data.shapes_n=40", "sft.batch_size=4", "sft.lr=3e-3"]


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
