"""The embedded default: a tiny LLaVA checkpoint, built by transformers itself and saved in
llava-hf format with a tokenizer trained on the data it will see. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Optional


def tiny_hf_config(tiny, vocab_size: int, image_token_id: int, pad_token_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    # Init std hidden^-1/2, not transformers' 0.02 (tuned for hidden ~4096): at hidden 128, 0.02
    # makes every q·k ~20x too small, so attention starts uniform and sits on that saddle for
    # thousands of steps - longer than the CPU budget of the tiny preset.
    init_std = tiny.hidden_size ** -0.5
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
                       num_hidden_layers=tiny.num_layers, num_attention_heads=tiny.num_heads,
                       num_key_value_heads=tiny.num_kv_heads, max_position_embeddings=tiny.max_position_embeddings,
                       rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=pad_token_id,
                       tie_word_embeddings=False, initializer_range=init_std)
    vision = CLIPVisionConfig(hidden_size=tiny.vision_hidden_size, intermediate_size=4 * tiny.vision_hidden_size,
                              num_hidden_layers=tiny.vision_layers, num_attention_heads=tiny.vision_heads,
                              image_size=tiny.image_size, patch_size=tiny.patch_size,
                              projection_dim=tiny.vision_hidden_size)
    n_patches = (tiny.image_size // tiny.patch_size) ** 2
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                       projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default", image_seq_length=n_patches,
                       pad_token_id=pad_token_id, tie_word_embeddings=False, initializer_range=init_std)


def make_image_processor(image_size: int):
    """A CLIPImageProcessor for the tiny preset: CLIP mean/std, resize + center-crop to image_size.
    (transformers 5 without torchvision: the PIL backend class, same behaviour, no warning.)"""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    return image_processor_class()(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )


def image_processor_class():
    """CLIPImageProcessor, or its PIL twin when transformers runs without torchvision (same
    behaviour, no warning)."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def pretrain_patch_features(vision, batch: Callable[[int], tuple], num_classes: dict[str, int], steps: int,
                            heldout: Optional[tuple] = None, lr: float = 2e-3, feature_layer: int = -2,
                            seed: int = 0, progress: bool = True) -> dict:
    """Supervised pretraining of a CLIP vision tower's patch features, in place.

    The recipe's CLIP tower is pretrained and frozen; a random tiny tower is neither, and training
    it through SFT's language loss collapses its patch features to global ones (a linear probe for
    a cell's colour falls from 0.99 on the random tower to 0.04 after SFT). So the tiny base gets a
    pretrained tower: one linear head per label kind on every patch feature of ``feature_layer``
    (the layer LLaVA reads, CLS dropped), cross-entropy, heads thrown away afterwards.

    batch(step) -> (pixels ``[B, 3, S, S]``, {kind: labels ``[B, P]`` long}); ``heldout`` is one
    such pair plus a bool ``[B, P]`` mask of the patches to score (e.g. those showing an object:
    empty ones are trivial). Returns the last loss and the held-out accuracy per kind.
    """
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    D = vision.config.hidden_size
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(D, n) for k, n in num_classes.items()})
    vision.requires_grad_(True)
    params = list(vision.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def logits(px):  # {kind: (B, P, n)}
        f = vision(px, output_hidden_states=True).hidden_states[feature_layer][:, 1:]
        return {k: h(f) for k, h in heads.items()}

    bar = range(steps)
    if progress:
        from tqdm import tqdm

        bar = tqdm(bar, desc="tiny vision tower", unit="step")
    vision.train()
    loss = torch.zeros(())
    for step in bar:
        px, labels = batch(step)
        out = logits(px)
        loss = sum(F.cross_entropy(out[k].flatten(0, 1), labels[k].flatten()) for k in heads)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress and step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    vision.eval()
    vision.requires_grad_(False)
    report = {"steps": steps, "loss": round(loss.item(), 4)}
    if heldout is not None:
        px, labels, scored = heldout
        with torch.no_grad():
            out = logits(px)
        report["heldout_accuracy"] = {
            k: round(float((out[k].argmax(-1) == labels[k])[scored].float().mean()), 4) for k in heads}
    return report


def build_tiny_checkpoint(out_dir, tiny, texts: Iterable[str], seed: int = 0,
                          pretrain_vision: Optional[Callable] = None) -> Path:
    """Train a tokenizer on ``texts``, instantiate a random tiny LlavaForConditionalGeneration with
    transformers, optionally pretrain its vision tower (``pretrain_vision(tower) -> report``, e.g.
    with ``pretrain_patch_features``), and save weights, tokenizer, image processor and the
    report (``vision_pretraining.json``) atomically."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from factrl.model.io import atomic_dir
    from factrl.model.tokenizer import build_tokenizer

    tok = build_tokenizer(texts, vocab_size=tiny.vocab_size)
    cfg = tiny_hf_config(tiny, len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    report = pretrain_vision(model.model.vision_tower) if pretrain_vision is not None else None
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        make_image_processor(tiny.image_size).save_pretrained(str(tmp))
        if report is not None:
            (tmp / "vision_pretraining.json").write_text(json.dumps(report, indent=1) + "\n")
    return Path(out_dir)
