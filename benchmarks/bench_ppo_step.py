"""One PPO step at LLaVA-1.5-7B/13B shapes, phase by phase, beside ``factrl plan``'s estimate.

The model is factrl's own (``model/llava.py``) with random weights made on the device: each
decoder linear is drawn N(0, 0.02²) and quantized to NF4 (double quant) one at a time, so no
dense copy of the model ever exists and no checkpoint is read; the CLIP ViT-L/14-336 tower
(576 image tokens), projector, embeddings and lm_head are random bf16. Three rank-64 LoRA
adapters (policy, value, reward; fp32 master weights) and the value/reward heads sit on it,
as in ``trainers/ppo.py``. Phases:

  rollout   the policy generates ``--new-tokens`` for ``--rollout-chunk`` prompts (EOS suppressed,
            so every row runs the full length): generated tokens/s
  scoring   the grouped base pass (policy, reference, value rows in one pass over W) with the
            fused log-probs and the value head, then the reward role's pass, ``--batch-size``
            rows at a time: sequence tokens/s (rows x Q+P+R per role)
  training  one PPO epoch over a step chunk of ``--step-chunk`` rows, ``--batch-size`` rows per
            micro-batch: grouped policy+value forward with gradient checkpointing, clipped
            losses, backward, one AdamW step: sequence tokens/s (rows x Q+P+R)
  peer      the rollout through transformers ``generate`` on the same shapes with bitsandbytes
            4-bit linears (GPU only; skipped, with the reason, without CUDA or bitsandbytes)

Every phase runs once untimed first (Triton autotuning and compiles happen there) and once
timed. Peak memory per phase is ``torch.cuda.max_memory_allocated`` (CPU: the process' peak RSS
growth). ``factrl plan``'s bytes for the same settings are printed in the same rows: the static
part, the rollout's KV cache and the training micro-batch's activations.

    python benchmarks/bench_ppo_step.py [--preset llava-v1.5-7b llava-v1.5-13b] [--smoke]

``--smoke``: tiny shapes on CPU in seconds (the test suite runs it). The last stdout line is one
JSON object; rows are appended to ``results/ppo_step-<device>.jsonl`` as each preset finishes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from factrl.kernels.logprobs import token_logprobs  # noqa: E402
from factrl.kernels.nf4 import quantize_nf4  # noqa: E402
from factrl.model.plan import ARCH, Arch, GiB, plan  # noqa: E402

# A LLaVA in miniature for --smoke: 2 decoder layers, a 2-layer tower of 4 patches.
SMOKE_ARCH = dict(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=128, vocab=320, vision_hidden=32,
                  vision_layers=2, vision_intermediate=128, image_size=28, patch_size=14)
BOS, EOS, PAD = 1, 2, 0
ROLES = ("policy", "value", "reward")


def build_model(a: Arch, device, dtype, r: int, seed: int = 0):
    """factrl's LlavaModel at ``a``'s shapes, decoder linears NF4 from the start (see the module doc)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from factrl.model.llava import LlavaModel, TextConfig

    text = TextConfig(a.vocab, a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads)
    vcfg = CLIPVisionConfig(hidden_size=a.vision_hidden, intermediate_size=a.vision_intermediate,
                            num_hidden_layers=a.vision_layers, num_attention_heads=max(1, a.vision_hidden // 64),
                            image_size=a.image_size, patch_size=a.patch_size, projection_dim=a.vision_hidden)
    torch.manual_seed(seed)
    with torch.device("meta"):  # shapes only: nothing of the dense model is allocated
        model = LlavaModel(text, vcfg, image_token_id=a.vocab - 1, pad_token_id=PAD, eos_token_id=EOS)
    for _, lin in model.linears():  # one dense linear alive at a time, on the device
        w = torch.randn(lin.out_features, lin.in_features, device=device) * 0.02
        lin.set_nf4(quantize_nf4(w, double_quant=True))
        del w
    with torch.device(device):
        model.vision = CLIPVisionModel(vcfg).to(dtype).requires_grad_(False)
    for mod in model.modules():  # what is still on meta: embeddings, norms, projector, lm_head
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta:
                t = torch.empty(p.shape, device=device, dtype=dtype)
                t.zero_() if name == "bias" else (t.fill_(1.0) if p.dim() == 1 else t.normal_(0.0, 0.02))
                setattr(mod, name, nn.Parameter(t, requires_grad=False))
    for role in ROLES:
        model.add_adapter(role, r=r, alpha=16.0)
        with torch.no_grad():  # nonzero B, as after training (the kernels do the same work either way)
            for _, lin in model.linears():
                lin.adapters[role].lora_B.normal_(0.0, 1e-3)
    model.add_head("value", zero_init=False)
    model.add_head("reward", zero_init=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device) -> tuple[float, int]:
    """(seconds, peak bytes above what was allocated before) of one call, after one untimed call."""
    fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base
    holder = {}

    def timed():
        t0 = time.perf_counter()
        fn()
        holder["s"] = time.perf_counter() - t0

    peak = common.peak_memory_bytes(timed)
    return holder["s"], peak


def prompts(a: Arch, batch: int, prompt_len: int, device, gen):
    """``[B, P + Q]`` ids: BOS, P ``<image>`` tokens, Q - 1 random text tokens; pixels ``[B, 3, S, S]``."""
    P = a.n_patches
    text = torch.randint(3, a.vocab - 1, (batch, prompt_len - 1), device=device, generator=gen)
    img = torch.full((batch, P), a.vocab - 1, device=device)
    ids = torch.cat([torch.full((batch, 1), BOS, device=device), img, text], 1)
    px = torch.randn(batch, 3, a.image_size, a.image_size, device=device, generator=gen)
    return ids, px


def run_preset(name: str, a: Arch, args, device, dtype) -> list[dict]:
    gen = torch.Generator(device).manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(a, device, dtype, args.rank)
    model.gradient_checkpointing = True
    build_s = time.perf_counter() - t0
    B, Q, R = args.rollout_chunk, args.prompt_len, args.new_tokens
    ids, px = prompts(a, B, Q, device, gen)
    seq = ids.shape[1] + R
    p = plan(a, args.rank, ["q", "k", "v", "o", "gate", "up", "down"], Q, R, gpu_gib=args.gpu_gib,
             rollout_chunk=B, step_chunk=args.batch_size)
    static = sum(p["static_bytes"].values())
    kv, act = list(p["dynamic_bytes"].values())
    base_bytes = torch.cuda.memory_allocated() if device.type == "cuda" else None
    rows = []

    def row(phase, seconds, peak, tokens, plan_bytes, **extra):
        rows.append(dict(preset=name, phase=phase, seconds=round(seconds, 4), tokens=tokens,
                         tokens_per_s=round(tokens / seconds, 2) if seconds > 0 else None,
                         peak_gib=None if peak is None or peak < 0 else round(peak / GiB, 3),
                         plan_gib=None if plan_bytes is None else round(plan_bytes / GiB, 3),
                         peak_bytes=peak, plan_bytes=None if plan_bytes is None else int(plan_bytes),
                         rollout_chunk=B, prompt_len=Q, new_tokens=R, seq_len=seq, step_chunk=args.step_chunk,
                         batch_size=args.batch_size, **extra))

    rows.append(dict(preset=name, phase="model", seconds=round(build_s, 2), tokens=None, tokens_per_s=None,
                     peak_gib=None if base_bytes is None else round(base_bytes / GiB, 3),
                     plan_gib=round(static / GiB, 3), peak_bytes=base_bytes, plan_bytes=int(static), seq_len=seq))

    # 1. rollout: the policy samples R tokens for every prompt
    out = {}

    def rollout():
        with torch.no_grad(), model.adapter("policy"):
            feats = model.encode_images(px.to(dtype))
            out["g"] = model.generate(ids, image_features=feats, max_new_tokens=R, generator=gen,
                                      suppress_ids=(EOS, PAD, model.image_token_id))
            out["feats"] = feats

    s, peak = measure(rollout, device)
    row("rollout", s, peak, B * R, kv, what="generated tokens")
    full = torch.cat([ids, out["g"].tokens], 1)  # (B, P+Q+R)
    feats = out["feats"]
    targets = full[:, -R:]
    start = full.shape[1] - R - 1  # position start+j predicts response token j

    # 2. scoring: policy / reference / value rows in one grouped pass, then the reward role
    def scoring():
        with torch.no_grad():
            for i in range(0, B, args.batch_size):
                sl = slice(i, i + args.batch_size)
                n = full[sl].shape[0]
                with model.adapter_segments([("policy", n), (None, n), ("value", n)]):
                    h = model(full[sl].repeat(3, 1), image_features=feats[sl].repeat(3, 1, 1))
                h_pol, h_ref, h_val = h.split(n)
                w = model.lm_head.weight
                token_logprobs(h_pol[:, start:start + R], w, targets[sl])
                token_logprobs(h_ref[:, start:start + R], w, targets[sl])
                model.head("value", h_val[:, start:start + R])
                with model.adapter("reward"):
                    hr = model(full[sl], image_features=feats[sl])
                model.head("reward", hr)[:, -1]

    s, peak = measure(scoring, device)
    row("scoring", s, peak, 4 * B * seq, None, what="sequence tokens, 4 roles")

    # 3. training: one PPO epoch over a step chunk, one optimizer step
    params = model.adapter_parameters("policy") + model.adapter_parameters("value") + \
        list(model.heads["value"].parameters())
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-6)
    rows_chunk = min(args.step_chunk, B)
    old_lp = torch.zeros(rows_chunk, R, device=device)
    adv = torch.randn(rows_chunk, R, device=device, generator=gen)

    def training():
        model.train()
        for i in range(0, rows_chunk, args.batch_size):
            sl = slice(i, min(rows_chunk, i + args.batch_size))
            n = full[sl].shape[0]
            with model.adapter_segments([("policy", n), ("value", n)]):
                h = model(full[sl].repeat(2, 1), image_features=feats[sl].repeat(2, 1, 1))
            h_pol, h_val = h.split(n)
            lp = token_logprobs(h_pol[:, start:start + R], model.lm_head.weight, targets[sl])
            ratio = torch.exp(lp - old_lp[sl])
            pg = torch.max(-adv[sl] * ratio, -adv[sl] * ratio.clamp(0.8, 1.2)).mean()
            vf = (model.head("value", h_val[:, start:start + R]) - adv[sl]).pow(2).mean()
            ((pg + 0.1 * vf) * n / rows_chunk).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()

    s, peak = measure(training, device)
    row("training", s, peak, 2 * rows_chunk * seq, act, what="sequence tokens, 2 roles, fwd+bwd")
    rows.append(dict(preset=name, phase="plan peak", seconds=None, tokens=None, tokens_per_s=None, peak_gib=None,
                     plan_gib=round(p["peak_bytes"] / GiB, 3), plan_bytes=int(p["peak_bytes"]), seq_len=seq))
    return rows  # the model goes with this frame, before the peer is built


def peer_rollout(name: str, a: Arch, args, device, dtype) -> dict:
    """The same rollout through transformers ``generate`` with bitsandbytes NF4 linears."""
    base = dict(preset=name, phase="peer rollout (transformers+bnb)", tokens=args.rollout_chunk * args.new_tokens)
    if device.type != "cuda":
        return {**base, "skipped": "needs CUDA"}
    try:
        import bitsandbytes as bnb
    except ImportError:
        return {**base, "skipped": "bitsandbytes is not installed"}
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                       bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    vis = CLIPVisionConfig(hidden_size=a.vision_hidden, intermediate_size=a.vision_intermediate,
                           num_hidden_layers=a.vision_layers, num_attention_heads=max(1, a.vision_hidden // 64),
                           image_size=a.image_size, patch_size=a.patch_size, projection_dim=a.vision_hidden)
    cfg = LlavaConfig(vision_config=vis, text_config=text, image_token_index=a.vocab - 1,
                      image_seq_length=a.n_patches, vision_feature_layer=-2, vision_feature_select_strategy="default")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = LlavaForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    lang = getattr(hf, "model", hf).language_model  # transformers >= 4.52 | older: hf.language_model.model
    layers = lang.layers if hasattr(lang, "layers") else lang.model.layers
    for layer in layers:  # swap every decoder linear for a bnb NF4 one (double quant), one at a time
        for parent in (layer.self_attn, layer.mlp):
            for nm, lin in list(parent.named_children()):
                if isinstance(lin, nn.Linear):
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                          compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
                    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)
                    setattr(parent, nm, q.to(device))
    torch.cuda.empty_cache()
    gen = torch.Generator(device).manual_seed(0)
    ids, px = prompts(a, args.rollout_chunk, args.prompt_len, device, gen)

    def go():
        with torch.no_grad():
            hf.generate(input_ids=ids, pixel_values=px.to(dtype), max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens, do_sample=True)

    s, peak = measure(go, device)
    return {**base, "seconds": round(s, 4), "tokens_per_s": round(base["tokens"] / s, 2),
            "peak_gib": round(peak / GiB, 3), "what": "generated tokens"}


COLS = ["preset", "phase", "seconds", "tokens", "tokens_per_s", "peak_gib", "plan_gib", "peak_bytes", "plan_bytes",
        "skipped"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, seconds)")
    ap.add_argument("--preset", nargs="+", default=["llava-v1.5-7b"], choices=sorted(ARCH))
    ap.add_argument("--rollout-chunk", type=int, default=16, help="prompts generated together (ppo.rollout_chunk_size)")
    ap.add_argument("--prompt-len", type=int, default=128, help="text tokens per prompt (data.max_prompt_len)")
    ap.add_argument("--new-tokens", type=int, default=128, help="response tokens generated (ppo.max_response_len)")
    ap.add_argument("--step-chunk", type=int, default=8, help="rows in the PPO epoch of the training phase")
    ap.add_argument("--batch-size", type=int, default=4, help="rows per forward (ppo.batch_size)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="the GPU size the plan checks against")
    ap.add_argument("--results", default=str(common.RESULTS), help="folder of the results .jsonl")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.smoke:
        presets = {"smoke": Arch(**SMOKE_ARCH)}
        args.rollout_chunk, args.prompt_len, args.new_tokens, args.step_chunk, args.batch_size = 2, 4, 3, 2, 1
        args.rank = 4
    else:
        if not torch.cuda.is_available():
            print("No CUDA GPU: 7B/13B shapes need one; run with --smoke for the CPU check.")
        presets = {n: Arch(**ARCH[n]) for n in args.preset}
    rows = []
    for name, a in presets.items():
        got = run_preset(name, a, args, device, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            got.append(peer_rollout(name, a, args, device, dtype))
        except Exception as e:  # the peer's own failure (a transformers/bnb version) must not hide ours
            got.append(dict(preset=name, phase="peer rollout (transformers+bnb)",
                            skipped=f"{type(e).__name__}: {e}"[:300]))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows += got
        common.print_table(got, COLS)
        common.write_results("ppo_step", got, results_dir=Path(args.results))
    summary = common.write_results("ppo_step", [], extra={"smoke": args.smoke, "table": rows},
                                   results_dir=Path(args.results))
    print(json.dumps(summary, default=str))
    return summary


if __name__ == "__main__":
    main()
