"""The original LLaVA layout and LLaVA-RLHF's adapter files, built here from a tiny llava-hf
checkpoint (nothing downloaded), converted / loaded, and compared with the llava-hf path."""

import json
import subprocess
import sys

import pytest
import torch

from factrl.model.io import CheckpointError, hf_state_dict, load_adapter, load_llava, load_tokenizer
from factrl.model.tiny import build_tiny_checkpoint, make_image_processor
from factrl.trainers.config import TinyModelConfig

TEXTS = ["A chat between a curious human and an assistant. USER: <image> What color is the red circle? "
         "ASSISTANT: The circle is red. Is there a blue square? No. There are 3 shapes."] * 10
TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                       vision_hidden_size=32, vision_layers=2, vision_heads=2, image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("orig") / "hf", TINY, TEXTS, seed=3)


def _tokenizer_without_image(path):
    """A Llama-style tokenizer with no <image> token (as LLaVA's: it splices images at id -200)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(TEXTS, trainer=trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"],
                                                               show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(path))
    return len(fast)


def write_original(src, dst, image_token: bool = True, tower_in_checkpoint: bool = False):
    """``src`` (llava-hf) rewritten in haotian-liu/LLaVA's layout: a LLaMA config with mm_* fields,
    model.* / model.mm_projector.{0,2} / lm_head keys in two pytorch_model-*.bin shards with an
    index, the CLIP tower in its own directory named by mm_vision_tower (relative, beside it).
    Without ``image_token`` the tokenizer has no <image> and the vocabulary is cut to its size.
    Returns the vocabulary rows of the written checkpoint."""
    from transformers import CLIPVisionModel

    dst.mkdir(parents=True)
    m = load_llava(src)
    sd = hf_state_dict(m)
    lm, tower = {}, {}
    for k, v in sd.items():
        if k.startswith("vision_tower."):
            tower[k[len("vision_tower."):]] = v
        elif k.startswith("multi_modal_projector."):
            lm[k.replace("multi_modal_projector.linear_1", "model.mm_projector.0")
                .replace("multi_modal_projector.linear_2", "model.mm_projector.2")] = v
        elif k == "language_model.lm_head.weight":
            lm["lm_head.weight"] = v
        else:
            lm[k.replace("language_model.model.", "model.")] = v
    rows = m.text_config.vocab_size
    if image_token:
        load_tokenizer(src).save_pretrained(str(dst))
    else:
        rows = _tokenizer_without_image(dst)
        assert rows < m.text_config.vocab_size
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            lm[k] = lm[k][:rows].clone()
    if tower_in_checkpoint:
        lm.update({"model.vision_tower.vision_tower." + k: v for k, v in tower.items()})
    clip = CLIPVisionModel(m.vision_config)
    own = {k.removeprefix("vision_model."): k for k in clip.state_dict()}  # transformers 5 drops the prefix
    missing, _ = clip.load_state_dict({own[k.removeprefix("vision_model.")]: v for k, v in tower.items()},
                                      strict=False)
    assert all(k.endswith("position_ids") for k in missing)  # position_ids are not weights
    clip.save_pretrained(str(dst.parent / "clip-tower"))
    make_image_processor(m.vision_config.image_size).save_pretrained(str(dst.parent / "clip-tower"))
    keys = sorted(lm)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for f, ks in shards.items():
        torch.save({k: lm[k] for k in ks}, dst / f)
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    t = m.text_config
    (dst / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "vocab_size": rows,
        "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings, "bos_token_id": 1, "eos_token_id": 2,
        "mm_vision_tower": "clip-tower", "mm_hidden_size": m.vision_config.hidden_size,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
        "mm_patch_merge_type": "flat", "use_mm_proj": True, "torch_dtype": "float32"}))
    return rows


def _inputs(image_id: int, n_text: int, n_img: int = 16):
    """Two rows of raw ids (one left-padded), each with one image's positions; text ids in 5..n_text-1."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(5, n_text, (2, 7), generator=g)
    ids = torch.cat([text[:, :2], torch.full((2, n_img), image_id), text[:, 2:]], 1)
    mask = torch.ones_like(ids)
    mask[1, :1] = 0
    return ids, mask, torch.randn(2, 3, 32, 32, generator=g)


def _logits(path, ids, mask, px):
    m = load_llava(path).eval()
    with torch.no_grad():
        return m.logits(m(ids, mask, pixel_values=px)), m


@pytest.mark.parametrize("tower_in_checkpoint", [False, True])
def test_convert_original_layout_gives_the_llava_hf_logits(src, tmp_path, tower_in_checkpoint):
    from factrl.model.original import convert_original
    from factrl.trainers.cli import main

    orig = tmp_path / "llava-orig"
    write_original(src, orig, tower_in_checkpoint=tower_in_checkpoint)
    with pytest.raises(CheckpointError, match="factrl convert"):  # not loadable as llava-hf
        load_llava(orig)
    if tower_in_checkpoint:
        info = convert_original(orig, tmp_path / "hf")
        assert info["vision_weights"] == "checkpoint"
    else:
        assert main(["convert", str(orig), str(tmp_path / "hf")]) == 0
    tok = load_tokenizer(src)
    ids, mask, px = _inputs(tok.convert_tokens_to_ids("<image>"), len(tok))
    want, _ = _logits(src, ids, mask, px)
    got, conv = _logits(tmp_path / "hf", ids, mask, px)
    assert torch.equal(got, want)  # the same fp32 weights in the same places: bit for bit
    assert load_tokenizer(tmp_path / "hf").get_vocab() == tok.get_vocab()
    # transformers reads the converted directory too
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    m = mask.bool()
    assert ((got - ref)[m].abs().max() / ref[m].abs().max()).item() <= 1e-4


def test_convert_appends_the_image_token_when_the_tokenizer_has_none(src, tmp_path):
    from factrl.model.original import convert_original

    orig = tmp_path / "llava-orig"
    rows = write_original(src, orig, image_token=False)
    info = convert_original(orig, tmp_path / "hf")
    assert info["image_token_added"] and info["image_token_id"] == rows and info["vocab_rows"] == rows + 1
    tok = load_tokenizer(tmp_path / "hf")
    assert tok.convert_tokens_to_ids("<image>") == rows and tok.pad_token == "<unk>"
    src_image = load_tokenizer(src).convert_tokens_to_ids("<image>")
    ids, mask, px = _inputs(src_image, rows)
    want, _ = _logits(src, ids, mask, px)
    got, conv = _logits(tmp_path / "hf", torch.where(ids == src_image, rows, ids), mask, px)
    assert conv.image_token_id == rows
    # every original token's logit is unchanged; the new row is the mean row
    assert torch.equal(got[..., :rows], want[..., :rows])
    w = conv.lm_head.weight
    torch.testing.assert_close(w[rows], w[:rows].mean(0))


def test_convert_errors_name_the_file_and_the_field(src, tmp_path):
    from factrl.model.original import convert_original

    orig = tmp_path / "llava-orig"
    write_original(src, orig)
    cfg = json.loads((orig / "config.json").read_text())
    (orig / "config.json").write_text(json.dumps({**cfg, "mm_use_im_start_end": True}))
    with pytest.raises(CheckpointError, match=r"config.json: mm_use_im_start_end=True"):
        convert_original(orig, tmp_path / "hf")
    (orig / "config.json").write_text(json.dumps({**cfg, "mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    r = subprocess.run([sys.executable, "-m", "factrl.trainers.cli", "convert", str(orig), str(tmp_path / "hf")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "openai/clip-vit-large-patch14-336" in r.stderr and "--vision-tower" in r.stderr
    assert not (tmp_path / "hf").exists()  # nothing half-written


def write_original_adapter(model, name: str, ckpt, head: str = "reward"):
    """Adapter ``name`` of ``model`` (+ head) as LLaVA-RLHF saves an RM checkpoint
    (RLHF/lora_utils.py:35-42): <ckpt>/adapter_model/lora_default/{adapter_config.json,
    adapter_model.bin} with peft's keys on LlavaLlamaForCausalLM, and <ckpt>/reward_head."""
    from factrl.model.io import HF_LINEAR

    d = ckpt / "adapter_model" / "lora_default"
    d.mkdir(parents=True)
    cfg = model.adapter_state.names[name]
    sd = {}
    for n, lin in model.linears():
        if name in lin.adapters:
            i = lin.name.split(".")[1]
            for ab in ("A", "B"):
                sd[f"base_model.model.model.layers.{i}.{HF_LINEAR[n]}.lora_{ab}.weight"] = \
                    getattr(lin.adapters[name], f"lora_{ab}").detach().clone()
    torch.save(sd, d / "adapter_model.bin")
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "/models/sft_model",
        "r": cfg["r"], "lora_alpha": cfg["alpha"], "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": [HF_LINEAR[t].split(".")[1] for t in cfg["targets"]], "inference_mode": True}))
    torch.save({k: v.detach().clone() for k, v in model.heads[head].state_dict().items()}, ckpt / "reward_head")


def test_released_adapter_and_reward_head_load_as_a_role(src, tmp_path):
    from factrl.trainers.rm import last_token_scores

    m = load_llava(src, quantize=True).eval()
    m.add_adapter("reward", r=4, alpha=8.0, targets=("q", "v", "up", "down"))
    m.add_head("reward", zero_init=False)
    with torch.no_grad():
        for p in m.adapter_parameters("reward"):
            p.normal_(0, 0.05)
    write_original_adapter(m, "reward", tmp_path / "checkpoint-200")
    again = load_llava(src, quantize=True).eval()
    load_adapter(again, tmp_path / "checkpoint-200", "reward", trainable=False)
    assert again.adapter_state.names["reward"]["targets"] == ["q", "v", "up", "down"]
    assert not any(p.requires_grad for p in again.adapter_parameters("reward"))
    tok = load_tokenizer(src)
    ids, mask, px = _inputs(tok.convert_tokens_to_ids("<image>"), len(tok))
    with torch.no_grad():
        with m.adapter("reward"):
            h = m(ids, mask, pixel_values=px)
        with again.adapter("reward"):
            h2 = again(ids, mask, pixel_values=px)
        with again.adapter(None):
            h0 = again(ids, mask, pixel_values=px)
    assert torch.equal(h2, h) and not torch.equal(h0, h)  # the adapter is read, exactly
    m1 = torch.ones_like(mask)
    assert torch.equal(last_token_scores(again, "reward", h2, m1), last_token_scores(m, "reward", h, m1))

    # a reward head of the wrong width names its file
    torch.save({"weight": torch.zeros(1, 7), "bias": torch.zeros(1)}, tmp_path / "checkpoint-200" / "reward_head")
    with pytest.raises(CheckpointError, match="reward_head: head 'reward' weight shape"):
        load_adapter(load_llava(src), tmp_path / "checkpoint-200", "reward")
