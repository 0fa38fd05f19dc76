"""``factrl plan``: a memory budget for PPO on one GPU, and the largest chunks that fit.

Every role lives on one NF4 base, so the budget is: the base once (NF4 decoder linears, bf16
embeddings/lm_head/norms, the CLIP tower and projector), three LoRA adapters (policy and value
trainable with fp32 master weights, grads and two Adam moments; reward frozen), the heads,
then what scales with the batch: the KV cache of a rollout chunk and the activations of a
training micro-batch with gradient checkpointing (the fused log-prob kernel never builds the
``[tokens, V]`` logits; without it they would dominate).

Two-base mode (``ppo.reward_base``, the recipe's 13B RM/value beside a 7B policy): each base is
counted once with its own tower; policy (+ the frozen RL-init reference) adapters on the policy
base, value (trainable) and reward (frozen) on the reward base. Rollouts run on the policy base
only; a training micro-batch holds both bases' activations at once (one loss, one backward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

GiB = 1024 ** 3

# Architectures of the presets (llava-hf/llava-1.5-{7,13}b-hf: Vicuna-1.5 + CLIP ViT-L/14-336).
CLIP_L336 = dict(vision_hidden=1024, vision_layers=24, vision_intermediate=4096, image_size=336, patch_size=14)
CLIP_L224 = dict(CLIP_L336, image_size=224)  # openai/clip-vit-large-patch14: 256 patches
VICUNA_7B = dict(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008)
VICUNA_13B = dict(hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824)
ARCH = {
    "llava-v1.5-7b": dict(**VICUNA_7B, vocab=32064, **CLIP_L336),
    "llava-v1.5-13b": dict(**VICUNA_13B, vocab=32064, **CLIP_L336),
    # LLaVA-RLHF's released bases (RLHF/scripts/7b-v1.5-224/train_rl_model.sh: the 7B-224 policy,
    # the 13B-336 RM/value), after factrl convert: 32000 Llama tokens + <image>
    "llava-rlhf-7b-v1.5-224": dict(**VICUNA_7B, vocab=32001, **CLIP_L224),
    "llava-rlhf-13b-v1.5-336": dict(**VICUNA_13B, vocab=32001, **CLIP_L336),
}


@dataclass
class Arch:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_intermediate: int
    image_size: int
    patch_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each decoder linear."""
        H, I, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return {"q": (H, H), "k": (kv, H), "v": (kv, H), "o": (H, H), "gate": (I, H), "up": (I, H), "down": (H, I)}


def arch_from_model_config(mc) -> Arch:
    t = mc.tiny
    return Arch(t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.intermediate_size, t.vocab_size,
                t.vision_hidden_size, t.vision_layers, 4 * t.vision_hidden_size, t.image_size, t.patch_size)


def count_params(a: Arch, lora_r: int, lora_targets) -> dict[str, int]:
    """Parameter counts by part (must equal the instantiated model's; a test checks it)."""
    shapes = a.linear_shapes()
    Vh, P = a.vision_hidden, a.n_patches
    vision_layer = 4 * (Vh * Vh + Vh) + (Vh * a.vision_intermediate + a.vision_intermediate) \
        + (a.vision_intermediate * Vh + Vh) + 4 * Vh  # attn q/k/v/o, fc1, fc2, two layer norms
    vision = Vh + 3 * a.patch_size ** 2 * Vh + (P + 1) * Vh + 2 * Vh + a.vision_layers * vision_layer + 2 * Vh
    return {
        "decoder_linear": a.layers * sum(o * i for o, i in shapes.values()),
        "norms": a.layers * 2 * a.hidden + a.hidden,
        "embed_tokens": a.vocab * a.hidden,
        "lm_head": a.vocab * a.hidden,
        "vision": vision,
        "projector": Vh * a.hidden + a.hidden + a.hidden * a.hidden + a.hidden,
        "lora_per_adapter": a.layers * sum(lora_r * (o + i) for n, (o, i) in shapes.items() if n in lora_targets),
        "head": a.hidden + 1,
    }


def _base_bytes(c: dict, nf4_bytes_per_param: float) -> tuple[float, float, float]:
    """(NF4 decoder linears, bf16 embeddings + lm_head + norms, bf16 tower + projector) of one base."""
    return (c["decoder_linear"] * nf4_bytes_per_param, 2 * (c["embed_tokens"] + c["lm_head"] + c["norms"]),
            2 * (c["vision"] + c["projector"]))


def _act_per_seq(a: Arch, seq: int, fused_logprobs: bool) -> float:
    # Training micro-batch with checkpointing: one bf16 hidden per layer boundary, plus one
    # layer's recompute (attention in/out, MLP gate/up/act) and the LoRA inputs.
    act = seq * 2 * (a.layers * a.hidden + 6 * a.hidden + 3 * a.intermediate)
    if not fused_logprobs:
        act += seq * a.vocab * 4 * 2  # fp32 logits and their gradient
    return act


def plan(a: Arch, lora_r: int, lora_targets, prompt_len: int, response_len: int, gpu_gib: float = 80.0,
         rollout_chunk: int = 32, step_chunk: int = 8, blocksize: int = 64, fused_logprobs: bool = True,
         reward_arch: Optional[Arch] = None, init_adapter: bool = False) -> dict:
    """Bytes by item, and the largest rollout/step chunks that fit in ``gpu_gib``. ``reward_arch``:
    two-base mode, reward and value on a base of that architecture; ``init_adapter``: a frozen
    RL-init reference adapter beside the policy's."""
    c = count_params(a, lora_r, lora_targets)
    nf4_bytes_per_param = 0.5 + 1 / blocksize + 4 / (blocksize * 256)  # codes + uint8 absmax + nested fp32
    seq = a.n_patches + prompt_len + response_len
    nf4, emb, vis = _base_bytes(c, nf4_bytes_per_param)
    if reward_arch is None:
        static = {
            "base decoder linears (NF4, double-quant)": nf4,
            "embeddings + lm_head + norms (bf16)": emb,
            "vision tower + projector (bf16)": vis,
            # policy + value: fp32 weights, fp32 grads, Adam m and v; reward: frozen bf16
            "adapters policy+value (fp32 w/grad/Adam)": 2 * 16 * c["lora_per_adapter"],
            "adapter reward (frozen, bf16)": 2 * c["lora_per_adapter"],
        }
    else:
        rc = count_params(reward_arch, lora_r, lora_targets)
        rnf4, remb, rvis = _base_bytes(rc, nf4_bytes_per_param)
        static = {
            "policy base decoder linears (NF4, double-quant)": nf4,
            "policy base embeddings + lm_head + norms (bf16)": emb,
            "policy base vision tower + projector (bf16)": vis,
            "reward base decoder linears (NF4, double-quant)": rnf4,
            "reward base embeddings + lm_head + norms (bf16)": remb,
            "reward base vision tower + projector (bf16)": rvis,
            "adapter policy (fp32 w/grad/Adam)": 16 * c["lora_per_adapter"],
            "adapter value on the reward base (fp32 w/grad/Adam)": 16 * rc["lora_per_adapter"],
            "adapter reward (frozen, bf16)": 2 * rc["lora_per_adapter"],
        }
    if init_adapter:
        static["adapter reference (RL-init, frozen, bf16)"] = 2 * c["lora_per_adapter"]
    static["heads value+reward"] = 2 * 16 * (c if reward_arch is None else rc)["head"]
    static["CUDA context + allocator slack"] = 2.5 * GiB
    kv_per_seq = 2 * a.layers * a.kv_heads * a.head_dim * seq * 2  # k and v, bf16
    act_per_seq = _act_per_seq(a, seq, fused_logprobs)
    if reward_arch is not None:  # the value rows: the same tokens, the reward tower's patch count
        act_per_seq += _act_per_seq(reward_arch, reward_arch.n_patches + prompt_len + response_len, fused_logprobs)
    static_total = sum(static.values())
    free = gpu_gib * GiB - static_total
    # Rollout: KV cache + sampling logits for the last position of each sequence.
    rollout_per_seq = kv_per_seq + a.vocab * 4
    max_rollout = int(free // rollout_per_seq) if free > 0 else 0
    max_step = int(free // act_per_seq) if free > 0 else 0
    dynamic = {
        f"KV cache, rollout chunk {rollout_chunk} × {seq} tokens": rollout_chunk * rollout_per_seq,
        f"activations, step chunk {step_chunk} × {seq} tokens (checkpointed)": step_chunk * act_per_seq,
    }
    peak = static_total + max(dynamic.values())
    return {"params": c, "reward_params": None if reward_arch is None else rc, "static_bytes": static,
            "dynamic_bytes": dynamic, "peak_bytes": peak,
            "gpu_bytes": gpu_gib * GiB, "fits": peak <= gpu_gib * GiB, "max_rollout_chunk": max_rollout,
            "max_step_chunk": max_step, "seq_len": seq}


def format_plan(name: str, p: dict) -> str:
    lines = [f"PPO memory plan for {name} (sequence = {p['seq_len']} tokens incl. image patches)"]
    for k, v in p["params"].items():
        lines.append(f"  params {k:<24} {v / 1e6:>12,.2f} M")
    for k, v in (p.get("reward_params") or {}).items():
        lines.append(f"  reward base params {k:<18} {v / 1e6:>9,.2f} M")
    for section in ("static_bytes", "dynamic_bytes"):
        for k, v in p[section].items():
            lines.append(f"  {k:<62} {v / GiB:>8.2f} GiB")
    lines.append(f"  {'peak (static + larger phase)':<62} {p['peak_bytes'] / GiB:>8.2f} GiB"
                 f" of {p['gpu_bytes'] / GiB:.0f} GiB -> {'fits' if p['fits'] else 'DOES NOT FIT'}")
    lines.append(f"  largest rollout chunk that fits: {p['max_rollout_chunk']} sequences; "
                 f"largest step chunk: {p['max_step_chunk']} sequences")
    return "\n".join(lines)


# ---- full SFT on N GPUs with DeepSpeed ZeRO (run.distributed=deepspeed) -------------------------------
def plan_sft_zero(a: Arch, stage: int, gpus: int, seq: int, micro_batch: int, gpu_gib: float = 80.0,
                  offload_optimizer: bool = False, fused_logprobs: bool = True) -> dict:
    """Bytes per GPU of full-parameter SFT (decoder, embeddings, lm_head, projector train; the CLIP
    tower is frozen) with bf16 weights and ZeRO ``stage`` over ``gpus`` processes. Mixed-precision
    Adam as in the ZeRO paper: per trained parameter 2 bytes of bf16 weight, 2 of bf16 gradient and
    12 of optimizer state (fp32 master weight, m, v). ZeRO-2 partitions gradients and optimizer
    states, ZeRO-3 the weights too (the frozen tower included) and gathers a working set: the
    lm_head, whole for the fused log-prob loss (an external parameter), and two decoder layers
    (the one in use and the one prefetched). Activations: one micro-batch with checkpointing."""
    if stage not in (2, 3) or gpus < 1:
        raise ValueError(f"stage={stage}, gpus={gpus}: expected ZeRO stage 2 or 3 on >= 1 GPU")
    c = count_params(a, 0, ())
    trained = c["decoder_linear"] + c["norms"] + c["embed_tokens"] + c["lm_head"] + c["projector"]
    frozen = c["vision"]
    layer = c["decoder_linear"] // a.layers + 2 * a.hidden
    weights = 2 * (trained + frozen) / (gpus if stage == 3 else 1)
    optim = 12 * trained / gpus
    static = {
        f"bf16 weights ({'1/N' if stage == 3 else 'whole'}, tower included)": weights,
        "bf16 gradients (1/N)": 2 * trained / gpus,
        "fp32 master + Adam m, v (1/N)" + (" -> host memory (offload)" if offload_optimizer else ""):
            0.0 if offload_optimizer else optim,
    }
    if stage == 3:
        static["ZeRO-3 working set: lm_head + 2 decoder layers (bf16, gathered)"] = 2 * (c["lm_head"] + 2 * layer)
    static["CUDA context + allocator slack"] = 2.5 * GiB
    act = micro_batch * _act_per_seq(a, seq, fused_logprobs)
    peak = sum(static.values()) + act
    return {"stage": stage, "gpus": gpus, "trained_params": trained, "static_bytes": static,
            "activation_bytes": act, "host_bytes": optim if offload_optimizer else 0.0, "peak_bytes": peak,
            "gpu_bytes": gpu_gib * GiB, "fits": peak <= gpu_gib * GiB, "seq_len": seq, "micro_batch": micro_batch}


def format_sft_zero_plan(name: str, p: dict) -> str:
    lines = [f"Full SFT of {name} with ZeRO-{p['stage']} on {p['gpus']} GPUs, per GPU "
             f"({p['trained_params'] / 1e9:.2f} B trained parameters; micro-batch {p['micro_batch']} x "
             f"{p['seq_len']} tokens, checkpointed)"]
    for k, v in p["static_bytes"].items():
        lines.append(f"  {k:<62} {v / GiB:>8.2f} GiB")
    lines.append(f"  {'activations (one micro-batch)':<62} {p['activation_bytes'] / GiB:>8.2f} GiB")
    if p["host_bytes"]:
        lines.append(f"  {'host memory per process (offloaded optimizer)':<62} {p['host_bytes'] / GiB:>8.2f} GiB")
    lines.append(f"  {'peak':<62} {p['peak_bytes'] / GiB:>8.2f} GiB of {p['gpu_bytes'] / GiB:.0f} GiB -> "
                 f"{'fits' if p['fits'] else 'DOES NOT FIT'}")
    return "\n".join(lines)
