"""The micro LLaVA the trainer tests share: one decoder layer, trains in seconds on CPU.
Tests append their own ``key=value`` overrides (later ones win)."""

MICRO_MODEL = ["model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
               "model.tiny.num_kv_heads=1", "model.tiny.intermediate_size=64", "model.tiny.vision_hidden_size=32",
               "model.tiny.vision_layers=2", "model.tiny.vision_heads=2", "model.lora.r=4", "run.progress=false",
               "data.max_prompt_len=200", "data.max_seq_len=320", "model.tiny.vision_pretrain_steps=20"]
