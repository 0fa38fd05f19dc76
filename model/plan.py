"""``factrl plan``: a memory budget for PPO on one GPU, and the largest chunks that fit.

Every role lives on one NF4 base, so the budget is: the base once (NF4 decoder linears, bf16
embeddings/lm_head/norms, the CLIP tower and projector), three LoRA adapters (policy and value
trainable with fp32 master weights, grads and two Adam moments; reward frozen), the heads,
then what scales with the batch: the KV cache of a rollout chunk and the activations of a
training micro-batch with gradient checkpointing (the fused log-prob kernel never builds the
``[tokens, V]`` logits; without it they would dominate).
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024 ** 3

# Architectures of the presets (llava-hf/llava-1.5-{7,13}b-hf: Vicuna-1.5 + CLIP ViT-L/14-336).
CLIP_L336 = dict(vision_hidden=1024, vision_layers=24, vision_intermediate=4096, image_size=336, patch_size=14)
ARCH = {
    "llava-v1.5-7b": dict(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32064, **CLIP_L336),
    "llava-v1.5-13b": dict(hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824, vocab=32064,
                           **CLIP_L336),
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


def plan(a: Arch, lora_r: int, lora_targets, prompt_len: int, response_len: int, gpu_gib: float = 80.0,
         rollout_chunk: int = 32, step_chunk: int = 8, blocksize: int = 64, fused_logprobs: bool = True) -> dict:
    """Bytes by item, and the largest rollout/step chunks that fit in ``gpu_gib``."""
    c = count_params(a, lora_r, lora_targets)
    nf4_bytes_per_param = 0.5 + 1 / blocksize + 4 / (blocksize * 256)  # codes + uint8 absmax + nested fp32
    seq = a.n_patches + prompt_len + response_len
    static = {
        "base decoder linears (NF4, double-quant)": c["decoder_linear"] * nf4_bytes_per_param,
        "embeddings + lm_head + norms (bf16)": 2 * (c["embed_tokens"] + c["lm_head"] + c["norms"]),
        "vision tower + projector (bf16)": 2 * (c["vision"] + c["projector"]),
        # policy + value: fp32 weights, fp32 grads, Adam m and v; reward: frozen bf16
        "adapters policy+value (fp32 w/grad/Adam)": 2 * 16 * c["lora_per_adapter"],
        "adapter reward (frozen, bf16)": 2 * c["lora_per_adapter"],
        "heads value+reward": 2 * 16 * c["head"],
        "CUDA context + allocator slack": 2.5 * GiB,
    }
    kv_per_seq = 2 * a.layers * a.kv_heads * a.head_dim * seq * 2  # k and v, bf16
    # Training micro-batch with checkpointing: one bf16 hidden per layer boundary, plus one
    # layer's recompute (attention in/out, MLP gate/up/act) and the LoRA inputs.
    act_per_seq = seq * 2 * (a.layers * a.hidden + 6 * a.hidden + 3 * a.intermediate)
    if not fused_logprobs:
        act_per_seq += seq * a.vocab * 4 * 2  # fp32 logits and their gradient
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
    return {"params": c, "static_bytes": static, "dynamic_bytes": dynamic, "peak_bytes": peak,
            "gpu_bytes": gpu_gib * GiB, "fits": peak <= gpu_gib * GiB, "max_rollout_chunk": max_rollout,
            "max_step_chunk": max_step, "seq_len": seq}


def format_plan(name: str, p: dict) -> str:
    lines = [f"PPO memory plan for {name} (sequence = {p['seq_len']} tokens incl. image patches)"]
    for k, v in p["params"].items():
        lines.append(f"  params {k:<24} {v / 1e6:>12,.2f} M")
    for section in ("static_bytes", "dynamic_bytes"):
        for k, v in p[section].items():
            lines.append(f"  {k:<62} {v / GiB:>8.2f} GiB")
    lines.append(f"  {'peak (static + larger phase)':<62} {p['peak_bytes'] / GiB:>8.2f} GiB"
                 f" of {p['gpu_bytes'] / GiB:.0f} GiB -> {'fits' if p['fits'] else 'DOES NOT FIT'}")
    lines.append(f"  largest rollout chunk that fits: {p['max_rollout_chunk']} sequences; "
                 f"largest step chunk: {p['max_step_chunk']} sequences")
    return "\n".join(lines)
