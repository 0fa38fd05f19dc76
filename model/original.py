"""The original LLaVA layout (``LlavaLlamaForCausalLM``) → a llava-hf directory (``factrl convert``).

LLaVA and LLaVA-RLHF release their models (``sft_model``, the RL-init and RM bases) in the
layout of haotian-liu/LLaVA: one LLaMA ``config.json`` with ``mm_*`` fields, weights named
``model.layers.*``, ``model.mm_projector.{0,2}.*``, ``lm_head.weight``, in ``pytorch_model*.bin``
or ``*.safetensors`` shards, and no CLIP weights: the tower is read from the path in
``mm_vision_tower`` (``llava/model/multimodal_encoder/builder.py``). Their tokenizer has no
``<image>`` token (LLaVA splices images at the placeholder id -200). factrl reads llava-hf, so
this module rewrites such a checkpoint once, shard by shard (one source shard in memory at a
time), with the key mapping of transformers' ``convert_llava_weights_to_hf.py``:

  model.mm_projector.0 / .2      → multi_modal_projector.linear_1 / .linear_2
  model.vision_tower.vision_tower.* (when saved) or the mm_vision_tower directory → vision_tower.*
  model.*                        → language_model.model.*;   lm_head → language_model.lm_head

A tokenizer without ``<image>`` gets it appended (id = old vocabulary size) with one new row in
``embed_tokens`` (the mean row: never read, the image features replace it) and ``lm_head`` (the
mean row, so the new token takes about 1/V of the softmax mass: log-probs of real tokens move
by ~1/V, 3e-5 at 32000). llava-hf instead samples both rows around the mean and pads the
vocabulary to 64; we add no padding rows, which a policy could otherwise sample. A missing pad
token becomes ``<unk>``, as LLaVA-RLHF's (``RLHF/finetune_lora_ppo.py:474``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

from factrl.model.io import CheckpointError, atomic_dir

IMAGE_TOKEN = "<image>"


def is_original_layout(path) -> bool:
    """A LLaVA original checkpoint: its config.json names the vision tower in ``mm_vision_tower``."""
    f = Path(path) / "config.json"
    try:
        return f.is_file() and "mm_vision_tower" in json.loads(f.read_text())
    except json.JSONDecodeError:
        return False


def _read_config(src: Path) -> dict:
    f = src / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{f}: missing (not a checkpoint directory)")
    raw = json.loads(f.read_text())
    if "mm_vision_tower" not in raw:
        raise CheckpointError(f"{f}: no mm_vision_tower (not the original LLaVA layout)")
    # What llava-hf can express, and LLaVA-1.5 / LLaVA-RLHF use (their train scripts pass
    # --mm_use_im_start_end False --mm_use_im_patch_token False, mlp2x_gelu, layer -2).
    checks = {
        "mm_use_im_start_end": (False, "image start/end tokens have no llava-hf equivalent"),
        "mm_use_im_patch_token": (False, "image patch tokens have no llava-hf equivalent"),
        "mm_projector_type": ("mlp2x_gelu", "llava-hf's projector is a 2-layer GELU MLP"),
        "mm_patch_merge_type": ("flat", "LLaVA-NeXT's any-resolution patches are not supported"),
    }
    defaults = {"mm_projector_type": "linear", "mm_patch_merge_type": "flat"}  # LLaVA's own defaults
    for key, (want, why) in checks.items():
        got = raw.get(key, defaults.get(key, False))
        if got != want:
            raise CheckpointError(f"{f}: {key}={got!r} is not supported ({why}; expected {want!r})")
    if raw.get("rope_scaling"):
        raise CheckpointError(f"{f}: rope_scaling {raw['rope_scaling']!r} is not supported")
    if raw.get("mm_vision_select_feature", "patch") not in ("patch", "cls_patch"):
        raise CheckpointError(f"{f}: mm_vision_select_feature={raw['mm_vision_select_feature']!r} "
                              "(expected patch | cls_patch)")
    return raw


def find_vision_tower(src: Path, raw: dict, override: Optional[str] = None) -> Path:
    """The CLIP directory: ``override``, else ``mm_vision_tower`` as an absolute path, relative to
    the checkpoint, or (a hub name such as openai/clip-vit-large-patch14-336) its last part
    beside the checkpoint. Nothing is downloaded."""
    name = override or raw["mm_vision_tower"]
    tries = [Path(name), src / name, src.parent / name, src.parent / Path(name).name]
    for t in tries:
        if (t / "config.json").is_file():
            return t
    raise CheckpointError(f"{src / 'config.json'}: mm_vision_tower {name!r} is not a local CLIP directory "
                          f"(tried {', '.join(str(t) for t in dict.fromkeys(tries))}); download it yourself and "
                          "pass its path (factrl convert --vision-tower PATH)")


def _weight_files(src: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index).is_file():
            files = sorted(set(json.loads((src / index).read_text())["weight_map"].values()))
            break
    else:
        files = [p.name for p in sorted(src.glob("*.safetensors"))] or \
                [p.name for p in sorted(src.glob("pytorch_model*.bin"))]
    if not files:
        raise CheckpointError(f"{src}: no *.safetensors or pytorch_model*.bin weights")
    for f in files:
        if not (src / f).is_file():
            raise CheckpointError(f"{src / f}: shard listed in the index is missing")
    return [src / f for f in files]


def _read_shard(f: Path) -> dict[str, torch.Tensor]:
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(f))
    try:  # tensors only (no code runs); memory-mapped, so a shard is paged in as it is written out
        return torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{f}: not a readable torch state dict: {e}") from e


def hf_name(key: str) -> Optional[str]:
    """An original key → llava-hf (legacy layout); None for keys llava-hf does not hold."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    m = re.match(r"^model\.mm_projector\.(\d+)\.(weight|bias)$", key)
    if m:
        idx = {"0": "linear_1", "2": "linear_2"}.get(m.group(1))
        if idx is None:
            raise CheckpointError(f"unexpected projector key {key!r} (mlp2x_gelu has layers 0 and 2)")
        return f"multi_modal_projector.{idx}.{m.group(2)}"
    m = re.match(r"^model\.vision_tower\.vision_tower\.(vision_model\..*)$", key)
    if m:
        return "vision_tower." + m.group(1)
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    if key.startswith("model.") and not key.startswith(("model.vision_tower", "model.image_newline")):
        return "language_model." + key
    raise CheckpointError(f"unexpected key {key!r} in an original LLaVA checkpoint")


def _tokenizer(src: Path):
    """The checkpoint's tokenizer with ``<image>`` (appended if absent) and a pad token."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    added = IMAGE_TOKEN not in tok.get_vocab()
    if added:
        tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    return tok, added


def convert_original(src, dst, vision_tower: Optional[str] = None) -> dict:
    """Write ``dst`` as a llava-hf directory (config.json, safetensors shards + index, tokenizer,
    image processor) from the original-layout checkpoint ``src``. Returns a summary."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig

    from factrl.model.tiny import image_processor_class, make_image_processor

    src = Path(src)
    raw = _read_config(src)
    tok, added = _tokenizer(src)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab_rows = max(int(raw["vocab_size"]), len(tok))
    files = _weight_files(src)
    tower_dir = find_vision_tower(src, raw, vision_tower)  # before any work: its config is always needed

    weight_map: dict[str, str] = {}
    has_tower = False
    with atomic_dir(dst) as tmp:
        # 1. the language model and projector (and the tower, when saved), shard by shard
        for n, f in enumerate(files):
            out = {}
            for k, v in _read_shard(f).items():
                name = hf_name(k)
                if name is None:
                    continue
                has_tower |= name.startswith("vision_tower.")
                if name.endswith(("embed_tokens.weight", "lm_head.weight")) and v.shape[0] < vocab_rows:
                    # the new <image> row(s): the mean row (see the module docstring)
                    extra = v.float().mean(0, keepdim=True).expand(vocab_rows - v.shape[0], -1).to(v.dtype)
                    v = torch.cat([v, extra])
                out[name] = v.contiguous()
            shard = f"model-{n + 1:05d}.safetensors"  # one per source shard
            save_file(out, str(tmp / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(out, shard))
            del out
        # 2. the CLIP tower from mm_vision_tower (its config always; its weights unless the
        # checkpoint carried them, as a run with an unfrozen tower saves)
        vc = CLIPVisionConfig.from_pretrained(str(tower_dir))
        if not has_tower:
            tower = CLIPVisionModel.from_pretrained(str(tower_dir))
            # (transformers 5 names the tower's own keys without the vision_model. prefix)
            out = {"vision_tower.vision_model." + k.removeprefix("vision_model."): v.contiguous()
                   for k, v in tower.state_dict().items() if not k.endswith("position_ids")}
            shard = "vision_tower.safetensors"
            save_file(out, str(tmp / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(out, shard))
            del tower, out
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                     indent=1))
        # 3. config: LLaMA fields + the mm_* fields in llava-hf's names
        text = LlamaConfig(vocab_size=vocab_rows, hidden_size=raw["hidden_size"],
                           intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"],
                           num_attention_heads=raw["num_attention_heads"],
                           num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
                           rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=raw.get("rope_theta", 10000.0),
                           max_position_embeddings=raw.get("max_position_embeddings", 4096),
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        n_patches = (vc.image_size // vc.patch_size) ** 2
        strategy = "default" if raw.get("mm_vision_select_feature", "patch") == "patch" else "full"
        cfg = LlavaConfig(vision_config=vc, text_config=text, image_token_index=image_id,
                          vision_feature_layer=raw.get("mm_vision_select_layer", -2),
                          vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
                          image_seq_length=n_patches, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        cfg.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        # 4. the tower's image processor (LLaVA's: CLIPImageProcessor of mm_vision_tower)
        if (tower_dir / "preprocessor_config.json").is_file():
            proc = image_processor_class().from_pretrained(str(tower_dir))
        else:  # CLIP's mean/std, resize + center-crop to the tower's size
            proc = make_image_processor(vc.image_size)
        proc.save_pretrained(str(tmp))
    # image_aspect_ratio is a data setting (data.image_aspect), reported for the user to set
    return {"src": str(src), "dst": str(dst), "image_token_id": image_id, "image_token_added": added,
            "vocab_rows": vocab_rows, "vision_tower": str(tower_dir),
            "vision_weights": "checkpoint" if has_tower else "vision tower directory",
            "image_aspect_ratio": raw.get("image_aspect_ratio", "square"), "tensors": len(weight_map)}
