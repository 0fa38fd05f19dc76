"""Issue 17: no run destroys data, resume never trains on garbage, bad values are refused before work.

One test (or more) per observed defect, numbered as in the issue. Most drive a ``Stage`` with a toy
model (a linear layer, milliseconds a step): the stage - lock, checkpoints, manifests, resume,
config comparison, signals - is what SFT, RM and PPO share. The kill -9 property runs the real CLI.
"""

import pytest
from micro import MICRO_MODEL

from factrl.trainers.config import ConfigError, load_config

MICRO = [*MICRO_MODEL, "data.shapes_n=40", "sft.batch_size=4", "sft.lr=3e-3"]


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
