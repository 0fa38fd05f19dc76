"""The embedded default: a tiny LLaVA checkpoint, built by transformers itself and saved in
llava-hf format with a tokenizer trained on the data it will see. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable


def tiny_hf_config(tiny, vocab_size: int, image_token_id: int, pad_token_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=vocab_size, hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
                       num_hidden_layers=tiny.num_layers, num_attention_heads=tiny.num_heads,
                       num_key_value_heads=tiny.num_kv_heads, max_position_embeddings=tiny.max_position_embeddings,
                       rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=pad_token_id,
                       tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=tiny.vision_hidden_size, intermediate_size=4 * tiny.vision_hidden_size,
                              num_hidden_layers=tiny.vision_layers, num_attention_heads=tiny.vision_heads,
                              image_size=tiny.image_size, patch_size=tiny.patch_size,
                              projection_dim=tiny.vision_hidden_size)
    n_patches = (tiny.image_size // tiny.patch_size) ** 2
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                       projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default", image_seq_length=n_patches,
                       pad_token_id=pad_token_id, tie_word_embeddings=False)


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


def build_tiny_checkpoint(out_dir, tiny, texts: Iterable[str], seed: int = 0) -> Path:
    """Train a tokenizer on ``texts``, instantiate a random tiny LlavaForConditionalGeneration with
    transformers, and save the three (weights, tokenizer, image processor) atomically."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from factrl.model.io import atomic_dir
    from factrl.model.tokenizer import build_tokenizer

    tok = build_tokenizer(texts, vocab_size=tiny.vocab_size)
    cfg = tiny_hf_config(tiny, len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        make_image_processor(tiny.image_size).save_pretrained(str(tmp))
    return Path(out_dir)
