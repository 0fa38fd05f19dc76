"""The model against transformers (the parity oracle), roles on one base, loading errors."""

import json
import shutil

import pytest
import torch

from factrl.model.io import (
    CheckpointError,
    load_adapter,
    load_llava,
    load_tokenizer,
    save_adapter,
    save_llava_hf,
)
from factrl.model.tiny import build_tiny_checkpoint
from factrl.trainers.config import TinyModelConfig

TEXTS = ["A chat between a curious human and an assistant. USER: <image> What color is the red circle? "
         "ASSISTANT: The circle is red. Is there a blue square? No. There are 3 shapes."] * 10


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "ckpt"
    # 8 px patches: 36 image tokens per image (parity over more image positions than the default 9).
    # MLP width 384, a multiple of the 64-element NF4 block (as 11008 and 13824 are): bitsandbytes
    # 0.50's CPU dequantize_4bit is wrong when blocks straddle rows (seen on an AVX512-BF16 machine:
    # 0.24 relative error on a 128x352 weight whose codes and absmax equal ours; our dequantization
    # of the same bytes has the expected 0.09), and this model is also the bnb oracle's.
    build_tiny_checkpoint(d, TinyModelConfig(num_layers=2, patch_size=8, intermediate_size=384), TEXTS, seed=1)
    return d


def _batch(tok, n_img=36):
    """Two rows: a full one and a LEFT-padded shorter one, both with one image."""
    img = tok.convert_tokens_to_ids("<image>")
    a = [1] + [img] * n_img + tok("What color is the circle?", add_special_tokens=False).input_ids
    b = [1] + [img] * n_img + tok("Is there a square?", add_special_tokens=False).input_ids
    T = max(len(a), len(b))
    rows, mask = [], []
    for r in (a, b):
        rows.append([tok.pad_token_id] * (T - len(r)) + r)
        mask.append([0] * (T - len(r)) + [1] * len(r))
    return torch.tensor(rows), torch.tensor(mask), torch.randn(2, 3, 48, 48)


def _hf(ckpt, **kw):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(ckpt), **kw).eval()


def _rel(a, b, mask):
    m = mask.bool()
    return ((a - b)[m].abs().max() / b[m].abs().max()).item()


def test_logits_match_transformers_fp32(ckpt):
    tok = load_tokenizer(ckpt)
    ids, mask, px = _batch(tok)
    hf = _hf(ckpt)
    ours = load_llava(ckpt).eval()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        got = ours.logits(ours(ids, mask, pixel_values=px))
    assert _rel(got, ref, mask) <= 1e-4


def test_nf4_logits_match_transformers_bnb(ckpt):
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32,
                           llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"])
    hf = _hf(ckpt, quantization_config=q, device_map="cpu")
    # On CPUs with AVX512-BF16, bnb's Linear4bit repacks itself for a fast path in eval mode that
    # computes in bf16. The oracle is bnb's reference path: dequantize_4bit, then an fp32 matmul.
    for m in hf.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    tok = load_tokenizer(ckpt)
    ids, mask, px = _batch(tok)
    ours = load_llava(ckpt, quantize=True, double_quant=True).eval()
    assert all(lin.is_quantized for _, lin in ours.linears())
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        got = ours.logits(ours(ids, mask, pixel_values=px))
        dense = load_llava(ckpt).eval()
        full = dense.logits(dense(ids, mask, pixel_values=px))
    # Quantization itself moves logits by far more than 1e-3: the check is not vacuous.
    assert _rel(full, ref, mask) > 1e-2
    assert _rel(got, ref, mask) <= 1e-3


def test_greedy_generation_matches_transformers(ckpt):
    tok = load_tokenizer(ckpt)
    ids, mask, px = _batch(tok)
    hf = _hf(ckpt)
    ours = load_llava(ckpt).eval()
    ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=20, do_sample=False,
                      min_new_tokens=20, eos_token_id=None, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    got = ours.generate(ids, mask, pixel_values=px, max_new_tokens=20, greedy=True)
    # ours stops at EOS; transformers was told not to: compare up to each row's stop.
    for r in range(2):
        n = int(got.lengths[r])
        assert got.tokens[r, :n].tolist() == ref[r, :n].tolist()
        assert n == 20 or bool(got.stopped[r])


def test_peft_export_matches_transformers(ckpt, tmp_path):
    from peft import PeftModel

    tok = load_tokenizer(ckpt)
    ids, mask, px = _batch(tok)
    ours = load_llava(ckpt).eval()
    ours.add_adapter("policy", r=4, alpha=8.0, targets=("q", "v", "down"))
    with torch.no_grad():  # B is zero-initialised: give it values so the adapter matters
        for p in ours.adapter_parameters("policy"):
            p.normal_(0, 0.05)
    save_adapter(ours, "policy", tmp_path / "policy", base_path=str(ckpt))
    peft_model = PeftModel.from_pretrained(_hf(ckpt), str(tmp_path / "policy")).eval()
    with torch.no_grad(), ours.adapter("policy"):
        got = ours.logits(ours(ids, mask, pixel_values=px))
        base = _hf(ckpt)(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        ref = peft_model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    assert _rel(ref, base, mask) > 1e-3  # the adapter changes the logits
    assert _rel(got, ref, mask) <= 1e-4
    # and our loader reads it back exactly
    again = load_llava(ckpt).eval()
    load_adapter(again, tmp_path / "policy", "policy")
    with torch.no_grad(), again.adapter("policy"):
        assert torch.equal(again.logits(again(ids, mask, pixel_values=px)), got)


def test_roles_share_one_base_and_grads_reach_only_active_adapter(ckpt):
    m = load_llava(ckpt, quantize=True)
    for role in ("policy", "value", "reward"):
        m.add_adapter(role, r=4, alpha=8.0)
    m.add_head("value")
    m.add_head("reward")
    for p in m.adapter_parameters("reward"):
        p.requires_grad_(False)
    # exactly one copy of each base weight: one NF4 buffer set per linear, no dense weight
    storages = {}
    for _, lin in m.linears():
        assert "weight" not in dict(lin.named_parameters(recurse=False))
        ptr = lin.qweight.untyped_storage().data_ptr()
        assert ptr not in storages
        storages[ptr] = lin.name
    assert len(storages) == 7 * m.text_config.num_layers
    tok = load_tokenizer(ckpt)
    ids, mask, px = _batch(tok)
    before = {n: p.requires_grad for n, p in m.named_parameters()}
    m.train()
    with m.adapter("value"):
        # non-zero B and head (both zero-initialised) so every adapter weight receives gradient
        for p in [*m.adapter_parameters("value"), *m.heads["value"].parameters()]:
            torch.nn.init.normal_(p, 0, 0.02)
        h = m(ids, mask, pixel_values=px)
        m.head("value", h).sum().backward()
    assert m.training  # switching never changes train/eval mode
    assert {n: p.requires_grad for n, p in m.named_parameters()} == before  # nor requires_grad
    got = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    value = {n for n, p in m.named_parameters() if ".adapters.value." in n}
    assert value <= got
    assert all(".adapters.value." in n or n.startswith("heads.value") or n.startswith("projector.")
               or n.startswith("embed_tokens") or "norm" in n for n in got), sorted(got)
    assert not any(".adapters.policy." in n or ".adapters.reward." in n for n in got)
    # the reference (no adapter) differs from the value role once B != 0
    m.eval()
    with torch.no_grad():
        with m.adapter(None):
            h0 = m(ids, mask, pixel_values=px)
        with m.adapter("value"):
            h1 = m(ids, mask, pixel_values=px)
    assert not torch.allclose(h0, h1)


def test_grouped_segments_equal_separate_passes(ckpt):
    m = load_llava(ckpt, quantize=True).eval()
    for role in ("policy", "value"):
        m.add_adapter(role, r=4, alpha=8.0)
        with torch.no_grad():
            for p in m.adapter_parameters(role):
                p.normal_(0, 0.05)
    tok = load_tokenizer(ckpt)
    ids, mask, px = _batch(tok)
    ids, mask, px = torch.cat([ids, ids, ids]), torch.cat([mask, mask, mask]), torch.cat([px, px, px])
    with torch.no_grad():
        feats = m.encode_images(px)
        with m.adapter_segments([("policy", 2), (None, 2), ("value", 2)]):
            got = m(ids, mask, image_features=feats)
        for i, role in enumerate(("policy", None, "value")):
            with m.adapter(role):
                ref = m(ids[2 * i:2 * i + 2], mask[2 * i:2 * i + 2], image_features=feats[2 * i:2 * i + 2])
            torch.testing.assert_close(got[2 * i:2 * i + 2], ref, rtol=1e-5, atol=1e-5)


def test_bad_checkpoints_name_the_path(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_llava(tmp_path / "nope")
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_llava(bad)
    notllava = tmp_path / "notllava"
    shutil.copytree(ckpt, notllava)
    cfg = json.loads((notllava / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (notllava / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json.*gpt2"):
        load_llava(notllava)
    mism = tmp_path / "mismatch"
    shutil.copytree(ckpt, mism)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(mism / "model.safetensors"))
    k = next(k for k in sd if k.endswith("layers.0.self_attn.q_proj.weight"))
    sd[k] = sd[k][:, :-2].contiguous()
    save_file(sd, str(mism / "model.safetensors"))
    with pytest.raises(CheckpointError, match="q_proj.weight.*shape"):
        load_llava(mism)


def test_save_is_atomic_and_roundtrips(ckpt, tmp_path):
    m = load_llava(ckpt)
    out = tmp_path / "saved"
    save_llava_hf(m, out, tokenizer=load_tokenizer(ckpt))
    again = load_llava(out)
    for (n, a), (_, b) in zip(m.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n

    class Boom(Exception):
        pass

    import factrl.model.io as io

    orig = io.hf_config
    io.hf_config = lambda model: (_ for _ in ()).throw(Boom())
    try:
        with pytest.raises(Boom):
            save_llava_hf(m, out)
    finally:
        io.hf_config = orig
    # the failed write left the previous checkpoint intact and no temp dirs behind
    assert load_llava(out) is not None
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]


def test_plan_counts_equal_the_tiny_model():
    from factrl.model.llava import LINEAR_NAMES
    from factrl.model.plan import arch_from_model_config, count_params
    from factrl.trainers.config import ModelConfig

    mc = ModelConfig()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        build_tiny_checkpoint(d + "/c", mc.tiny, TEXTS)
        m = load_llava(d + "/c")
    arch = arch_from_model_config(mc)
    assert arch.vocab >= m.text_config.vocab_size  # the tokenizer trained on TEXTS is smaller than the cap
    arch.vocab = m.text_config.vocab_size
    c = count_params(arch, mc.lora.r, mc.lora.targets)
    m.add_adapter("policy", r=mc.lora.r, alpha=mc.lora.alpha, targets=mc.lora.targets)
    m.add_head("value")
    numel = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    assert c["decoder_linear"] == numel(lin.weight for _, lin in m.linears())
    assert c["vision"] == numel(m.vision.parameters())
    assert c["projector"] == numel(m.projector.parameters())
    assert c["embed_tokens"] == m.embed_tokens.weight.numel()
    assert c["lm_head"] == m.lm_head.weight.numel()
    assert c["norms"] == numel(p for n, p in m.named_parameters() if "norm" in n and not n.startswith("vision."))
    assert c["lora_per_adapter"] == numel(m.adapter_parameters("policy"))
    assert c["head"] == numel(m.heads["value"].parameters())
    assert len(LINEAR_NAMES) == 7


def test_gradient_checkpointing_keeps_the_role_and_the_gradients(ckpt):
    """Backward recomputes checkpointed layers after `model.adapter(...)` has exited: the
    recomputation must use the same adapter, and the gradients must equal the plain ones."""
    m = load_llava(ckpt, quantize=True).train()
    m.add_adapter("policy", r=4, alpha=8.0)
    with torch.no_grad():
        for p in m.adapter_parameters("policy"):
            p.normal_(0, 0.05)
    tok = load_tokenizer(ckpt)
    ids, mask, px = _batch(tok)
    grads = []
    for ckpt_on in (False, True):
        m.gradient_checkpointing = ckpt_on
        m.zero_grad(set_to_none=True)
        with m.adapter("policy"):
            h = m(ids, mask, pixel_values=px)
        (h.float() ** 2).mean().backward()  # backward after the role's context has exited
        grads.append([p.grad.clone() for p in m.adapter_parameters("policy")])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_tiny_base_gets_a_pretrained_vision_tower(tmp_path):
    """The tiny base's CLIP tower is pretrained on ShapesWorld's training scenes (the recipe's tower
    is pretrained, then frozen): held-out patch attributes far above chance, the report saved
    beside the weights, and the saved tower is the pretrained one - the decoder is untouched."""
    from micro import MICRO_MODEL

    from factrl.trainers.config import load_config
    from factrl.trainers.embedded import ensure_dataset, ensure_tiny_base

    def base(name, steps, *extra):
        cfg = load_config("tiny", [*MICRO_MODEL, "data.shapes_n=150", f"data.root={tmp_path}/data",
                                   f"run.out_dir={tmp_path}/{name}", f"model.tiny.vision_pretrain_steps={steps}",
                                   *extra])
        ensure_dataset(cfg)
        return ensure_tiny_base(cfg)

    pre, rand = base("pre", 300), base("rand", 0)
    acc = json.loads((pre / "vision_pretraining.json").read_text())["heldout_accuracy"]
    # chance on patches showing an object: colour 1/6, shape 1/5, size 1/2, cell 1/9
    assert acc["color"] >= 0.9 and acc["shape"] >= 0.6 and acc["size"] >= 0.8 and acc["cell"] >= 0.9, acc
    assert not (rand / "vision_pretraining.json").exists()
    a, b = load_llava(pre), load_llava(rand)
    assert all(torch.equal(p, q) for p, q in zip(a.layers.parameters(), b.layers.parameters()))
    va, vb = a.vision.state_dict(), b.vision.state_dict()
    assert any(not torch.equal(va[k], vb[k]) for k in va)
    with pytest.raises(ValueError, match="does not tile"):  # 4x4 patches straddle the 3x3 cells
        base("odd", 300, "model.tiny.patch_size=12")


def test_plan_sft_zero_partitions_what_each_stage_partitions():
    from factrl.model.plan import ARCH, Arch, count_params, plan_sft_zero

    a = Arch(**ARCH["llava-v1.5-7b"])
    c = count_params(a, 0, ())
    psi = c["decoder_linear"] + c["norms"] + c["embed_tokens"] + c["lm_head"] + c["projector"]
    p2, p3 = (plan_sft_zero(a, s, 8, 2048, 4) for s in (2, 3))
    assert p2["trained_params"] == psi
    w2, g2, o2 = list(p2["static_bytes"].values())[:3]
    w3, g3, o3, ws3 = list(p3["static_bytes"].values())[:4]
    assert (w2, g2, o2) == (2 * (psi + c["vision"]), 2 * psi / 8, 12 * psi / 8)  # ZeRO-2: weights whole
    assert (w3, g3, o3) == (2 * (psi + c["vision"]) / 8, 2 * psi / 8, 12 * psi / 8)  # ZeRO-3: all 1/N
    assert ws3 > 2 * c["lm_head"] and p3["peak_bytes"] < p2["peak_bytes"]
    assert not plan_sft_zero(a, 3, 1, 2048, 4)["fits"]  # 16 bytes x 6.8 B parameters: no single 80 GB GPU
    off = plan_sft_zero(a, 3, 8, 2048, 4, offload_optimizer=True)
    assert off["host_bytes"] == 12 * psi / 8 and off["peak_bytes"] == p3["peak_bytes"] - 12 * psi / 8
