"""The micro LLaVA the trainer tests share: one decoder layer, trains in seconds on CPU.
Tests append their own ``key=value`` overrides (later ones win)."""

MICRO_MODEL = ["model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
               "model.tiny.num_kv_heads=1", "model.tiny.intermediate_size=64", "model.tiny.vision_hidden_size=32",
               "model.tiny.vision_layers=2", "model.tiny.vision_heads=2", "model.lora.r=4", "run.progress=false",
               "data.max_prompt_len=200", "data.max_seq_len=320", "model.tiny.vision_pretrain_steps=20",
               # every question type: a micro world of a few dozen scenes has too few descriptions for
               # the preset's description-only RM and PPO
               "rm.question_types=[]", "ppo.question_types=[]"]


def train_sft_rm(root, overrides: list[str]):
    """Data, tiny base, SFT and RM under ``root`` (``overrides`` after the micro model's): what PPO
    tests start from."""
    from factrl.trainers.config import load_config
    from factrl.trainers.embedded import prepare
    from factrl.trainers.rm import train_rm
    from factrl.trainers.sft import train_sft

    cfg = load_config("tiny", overrides + [f"run.out_dir={root}", f"data.root={root}/data"])
    prepare(cfg)
    train_sft(cfg)
    train_rm(cfg)
    return root


def ppo_config(root, overrides: list[str], out, *extra):
    """A PPO config on the SFT base and RM that ``train_sft_rm`` left under ``root``."""
    from factrl.trainers.config import load_config

    paths = [f"run.out_dir={out}", f"data.root={root}/data", f"ppo.base={root}/sft/final",
             f"ppo.reward_adapter={root}/rm/reward_adapter"]
    return load_config("tiny", overrides + paths + list(extra))
