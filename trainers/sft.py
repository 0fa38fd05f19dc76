"""SFT: answer-only next-token loss on LLaVA conversations (``factrl sft``, ``make train-sft``).

Modes: ``full`` trains the decoder, embeddings, lm_head and projector (the vision tower stays
frozen — the original recipe — unless ``sft.train_vision_tower``); ``qlora`` trains a LoRA
adapter on the NF4 base (the projector stays as it is). The loss reads token log-probs from
``factrl.kernels.logprobs`` — never a full-vocab log_softmax. Output: ``<out>/sft/final`` in
llava-hf format (plus the PEFT adapter for qlora).
"""

from __future__ import annotations

import torch

from factrl.kernels.logprobs import token_logprobs
from factrl.trainers.config import Config
from factrl.trainers.data import IGNORE_INDEX, collate_sft, load_sft
from factrl.trainers.loop import supervised_loop
from factrl.trainers.run import autocast
from factrl.trainers.setup import base_checkpoint, load_assets, to_device
from factrl.trainers.stage import Stage, trainable_adapter

ADAPTER = "sft"


def sequence_logprobs(model, batch: dict, head_trainable: bool = False) -> torch.Tensor:
    """log π(label_t+1 | ≤t) for every position ``[B, T-1]`` (0 where the label is ignored)."""
    h = model(batch["input_ids"], batch["attention_mask"], pixel_values=batch.get("pixel_values"))
    w = model.lm_head.weight if head_trainable else model.lm_head.weight.detach()
    return token_logprobs(h[:, :-1], w, batch["labels"][:, 1:], ignore_index=IGNORE_INDEX,
                          weight_grad=head_trainable)


def train_sft(cfg: Config) -> dict:
    # 1. the stage: device, seed, processes, config saved
    mode = cfg.sft.mode
    if mode not in ("full", "qlora"):
        raise ValueError(f"sft.mode={mode!r}: expected 'full' or 'qlora'")
    stage = Stage(cfg, "sft")
    device, layout = stage.device, stage.layout

    # 2. model + data
    base = base_checkpoint(cfg, layout)
    a = load_assets(cfg, base, quantize=(mode == "qlora"), device=device)
    model, tok = a.model, a.tokenizer
    examples = load_sft(a.data_root / cfg.data.sft_file, tok, a.num_image_tokens, cfg.data.max_seq_len,
                        skip_bad=cfg.data.skip_bad_records, image_folder=str(a.data_root / cfg.data.image_folder),
                        system=cfg.data.system_prompt)
    st = examples.stats
    print(f"[factrl] sft: {st.n_loaded} examples from {st.file} ({st.n_too_long} too long, {st.n_skipped} skipped)")

    # 3. what trains
    model.requires_grad_(False)
    if mode == "full":
        for m in (model.layers, model.norm, model.embed_tokens, model.lm_head, model.projector):
            m.requires_grad_(True)
        if cfg.sft.train_vision_tower:
            model.vision.requires_grad_(True)
        active = None
    else:
        # Only the adapter trains, so the PEFT adapter alone reproduces the merged checkpoint
        # (qlora is for pretrained checkpoints, whose projector is already trained).
        trainable_adapter(model, ADAPTER, cfg.model.lora)
        active = ADAPTER
    head_trainable = model.lm_head.weight.requires_grad
    params = [p for p in model.parameters() if p.requires_grad]

    # 4. the loss: mean negative log-likelihood over the answer tokens of the global batch
    def make_batch(idx):
        return to_device(collate_sft([examples[i] for i in idx], tok.pad_token_id, a.images), device)

    def count(b):
        return float((b["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss_fn(b, norm):
        with model.adapter(active), autocast(device, cfg.model.dtype):
            lp = sequence_logprobs(model, b, head_trainable)
        return -lp.sum() / norm, {"tokens": count(b)}

    # 5. optimise (resume, accumulation, DDP, NaN guard, checkpoints: trainers/loop.py)
    metrics = supervised_loop(stage, cfg.sft, model, params, len(examples), make_batch, count, loss_fn)

    # 6. the SFT checkpoint in llava-hf format (+ the adapter in PEFT format for qlora)
    from factrl.model.io import save_adapter, save_llava_hf

    with stage.whole_weights():  # ZeRO-3: gathered from every process' partition
        if stage.rank == 0:  # one writer; the others wait for it
            if mode == "qlora":
                save_adapter(model, ADAPTER, layout.sft_adapter, base_path=str(base))
            save_llava_hf(model, layout.sft_final, tok, a.processor,
                          merge_adapter=ADAPTER if mode == "qlora" else None)
    stage.barrier()
    return {"stage": "sft", "final": str(layout.sft_final), **metrics}
