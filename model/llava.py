"""A lean LLaVA: CLIP vision tower (transformers, frozen) → projector → LLaMA decoder (ours).

The decoder is written here (gpt-fast style) so every linear and the lm_head go through
``factrl.kernels``. One base carries every role: decoder linears hold a bank of LoRA adapters
(``policy``, ``value``, ``reward``, ...) selected with ``model.adapter(name)``; ``None`` is the
base itself (the PPO reference). Scalar heads (``value`` per token, ``reward`` at the last token)
read the final hidden states.

Tensor names: B batch, T tokens, H hidden, P image patches, V vocabulary.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from factrl.kernels._backend import HAS_FLASH_ATTN, HAS_XFORMERS
from factrl.model.lora import AdapterState, LoRALinear

LINEAR_NAMES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Variance in fp32 whatever the activation dtype (as LLaMA), scale in the input dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype):
    """cos, sin ``[B, T, head_dim]`` for integer positions ``[B, T]`` (LLaMA's rotate-half layout)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x ``[B, nh, T, hd]``."""
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rot * sin[:, None]


class KVCache:
    """Static cache: ``k, v`` per layer ``[B, n_kv, max_len, hd]``; ``length`` tokens are filled."""

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k, v):
        start, T = self.length, k.shape[2]
        if start + T > self.max_len:
            raise ValueError(f"KV cache overflow: {start}+{T} > {self.max_len}")
        self.k[layer][:, :, start:start + T] = k
        self.v[layer][:, :, start:start + T] = v
        return self.k[layer][:, :, :start + T], self.v[layer][:, :, :start + T]


def attention(q, k, v, mask: Optional[torch.Tensor], causal: bool):
    """q ``[B, nh, T, hd]``, k/v ``[B, n_kv, S, hd]``; mask bool ``[B, 1, T, S]`` (True = attend)."""
    if HAS_FLASH_ATTN and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from flash_attn import flash_attn_func  # (B, T, nh, hd) layout; GQA native

        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                               causal=causal).transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]
    if HAS_XFORMERS and mask is None and causal and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        import xformers.ops as xops  # (B, T, nh, hd) layout; expand kv heads for GQA

        rep = q.shape[1] // k.shape[1]
        k, v = (t.repeat_interleave(rep, dim=1) if gqa else t for t in (k, v))
        return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_bias=xops.LowerTriangularMask()).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          enable_gqa=gqa)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, state: AdapterState, idx: int):
        super().__init__()
        H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        self.cfg, self.idx = cfg, idx
        p = f"layers.{idx}."
        self.q = LoRALinear(H, cfg.num_heads * hd, state, name=p + "q")
        self.k = LoRALinear(H, cfg.num_kv_heads * hd, state, name=p + "k")
        self.v = LoRALinear(H, cfg.num_kv_heads * hd, state, name=p + "v")
        self.o = LoRALinear(cfg.num_heads * hd, H, state, name=p + "o")
        self.gate = LoRALinear(H, I, state, name=p + "gate")
        self.up = LoRALinear(H, I, state, name=p + "up")
        self.down = LoRALinear(I, H, state, name=p + "down")
        self.input_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.post_norm = RMSNorm(H, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: Optional[KVCache]):
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        h = self.input_norm(x)
        q = self.q(h).view(B, T, -1, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k(h).view(B, T, -1, hd).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v(h).view(B, T, -1, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.idx, k, v)
        a = attention(q, k, v, mask, causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, -1))
        h = self.post_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Projector(nn.Module):
    """LLaVA-1.5's 2-layer GELU MLP (``mlp2x_gelu``), or a single linear layer."""

    def __init__(self, vision_dim: int, text_dim: int, kind: str = "mlp2x_gelu"):
        super().__init__()
        self.kind = kind
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        if kind == "mlp2x_gelu":
            self.linear_2 = nn.Linear(text_dim, text_dim)
        elif kind != "linear":
            raise ValueError(f"unknown projector type {kind!r} (mlp2x_gelu | linear)")

    def forward(self, x):
        x = self.linear_1(x)
        return self.linear_2(F.gelu(x)) if self.kind == "mlp2x_gelu" else x


@dataclass
class GenerationOutput:
    """tokens ``[B, max_new]`` (pad after the stop token), lengths ``[B]`` (incl. the stop
    token), stopped ``[B]`` bool: the sequence ended with EOS or a stop id."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    stopped: torch.Tensor


class LlavaModel(nn.Module):
    def __init__(self, text: TextConfig, vision_config, image_token_id: int, pad_token_id: int = 0,
                 eos_token_id: int = 2, vision_feature_layer: int = -2, select_strategy: str = "default",
                 projector: str = "mlp2x_gelu"):
        super().__init__()
        from transformers import CLIPVisionModel

        self.text_config, self.vision_config = text, vision_config
        self.image_token_id, self.pad_token_id, self.eos_token_id = image_token_id, pad_token_id, eos_token_id
        self.vision_feature_layer, self.select_strategy = vision_feature_layer, select_strategy
        self.adapter_state = AdapterState()
        self.vision = CLIPVisionModel(vision_config)
        self.vision.requires_grad_(False)
        self.projector = Projector(vision_config.hidden_size, text.hidden_size, projector)
        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(text, self.adapter_state, i) for i in range(text.num_layers))
        self.norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.heads = nn.ModuleDict()  # scalar heads: name -> Linear(H, 1)
        self.gradient_checkpointing = False

    # ---- roles --------------------------------------------------------------------------------
    def linears(self):
        for layer in self.layers:
            for n in LINEAR_NAMES:
                yield n, getattr(layer, n)

    def add_adapter(self, name: str, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                    targets=LINEAR_NAMES) -> None:
        bad = set(targets) - set(LINEAR_NAMES)
        if bad:
            raise ValueError(f"unknown LoRA target(s) {sorted(bad)}; known: {LINEAR_NAMES}")
        if name in self.adapter_state.names:
            raise ValueError(f"adapter {name!r} exists already")
        for n, lin in self.linears():
            if n in targets:
                lin.add_adapter(name, r, alpha, dropout)
        self.adapter_state.names[name] = dict(r=r, alpha=alpha, dropout=dropout, targets=list(targets))

    def adapter_parameters(self, name: str):
        return [p for _, lin in self.linears() if name in lin.adapters for p in lin.adapters[name].parameters()]

    def copy_adapter(self, src: str, dst: str) -> None:
        """Initialize adapter ``dst`` from ``src`` (e.g. value from reward), adding it if needed."""
        if dst not in self.adapter_state.names:
            cfg = self.adapter_state.names[src]
            self.add_adapter(dst, cfg["r"], cfg["alpha"], cfg["dropout"], cfg["targets"])
        with torch.no_grad():
            for _, lin in self.linears():
                if src in lin.adapters:
                    lin.adapters[dst].load_state_dict(lin.adapters[src].state_dict())

    @contextlib.contextmanager
    def adapter(self, name: Optional[str]):
        """Run with adapter ``name`` active (None = the base). Restores the previous selection;
        never touches requires_grad or train/eval mode."""
        if name is not None and name not in self.adapter_state.names:
            raise KeyError(f"no adapter named {name!r}; have {sorted(self.adapter_state.names)}")
        prev = (self.adapter_state.active, self.adapter_state.segments)
        self.adapter_state.active, self.adapter_state.segments = name, None
        try:
            yield self
        finally:
            self.adapter_state.active, self.adapter_state.segments = prev

    @contextlib.contextmanager
    def adapter_segments(self, segments: list[tuple[Optional[str], int]]):
        """Grouped roles in one base pass: ``[(name or None, n_batch_rows), ...]``."""
        prev = (self.adapter_state.active, self.adapter_state.segments)
        self.adapter_state.active, self.adapter_state.segments = None, list(segments)
        try:
            yield self
        finally:
            self.adapter_state.active, self.adapter_state.segments = prev

    def add_head(self, name: str, zero_init: bool = True) -> nn.Linear:
        head = nn.Linear(self.text_config.hidden_size, 1).to(self.lm_head.weight.device)
        if zero_init:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.heads[name] = head
        return head

    def quantize_(self, double_quant: bool = True, blocksize: int = 64) -> None:
        """NF4-quantize every decoder linear in place; embeddings, norms, lm_head stay as they are."""
        for _, lin in self.linears():
            if not lin.is_quantized:
                lin.quantize_(double_quant, blocksize)

    # ---- forward ------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[n_img, 3, S, S]`` → projected features ``[n_img, P, H]`` (feature layer −2, CLS dropped)."""
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(trains):  # the tower is frozen unless a stage unfreezes it
            out = self.vision(pixel_values.to(self.vision.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.vision_feature_layer]
        if self.select_strategy == "default":
            feats = feats[:, 1:]
        return self.projector(feats.to(self.projector.linear_1.weight.dtype))

    def embed(self, input_ids: torch.Tensor, image_features: Optional[torch.Tensor],
              decoding: bool = False) -> torch.Tensor:
        """Token embeddings with one image feature spliced in at each ``<image>`` position.
        While decoding, a sampled ``<image>`` id is an ordinary token (as in transformers)."""
        x = self.embed_tokens(input_ids)  # (B, T, H)
        is_img = input_ids == self.image_token_id
        n_pos = int(is_img.sum())
        if n_pos == 0 or (decoding and image_features is None):
            return x
        if image_features is None:
            raise ValueError(f"input has {n_pos} <image> tokens but no pixel_values/image_features")
        feats = image_features.reshape(-1, image_features.shape[-1])  # (n_img * P, H)
        if feats.shape[0] != n_pos:
            raise ValueError(f"{n_pos} <image> token positions but {feats.shape[0]} image feature rows "
                             f"({image_features.shape[0]} images × {image_features.shape[1]} patches)")
        return x.masked_scatter(is_img[..., None], feats.to(x.dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None, image_features: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final hidden states ``[B, T, H]`` (after the last norm).

        attention_mask ``[B, S]`` covers the cache plus these T tokens (1 = real token); left or
        right padding both work. Position ids default to ``cumsum(mask) - 1`` (pads clamp to 0).
        """
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        past = cache.length if cache is not None else 0
        x = self.embed(input_ids, image_features, decoding=past > 0)
        B, T, _ = x.shape
        S = past + T
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=x.device)
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != (B={B}, S={S})")
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        mask = self._mask(attention_mask, T, past)
        cos, sin = rope_cos_sin(position_ids, self.text_config.head_dim, self.text_config.rope_theta, x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(self._with_roles(layer), x, cos, sin, mask, cache,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length = S
        return self.norm(x)

    def _with_roles(self, layer):
        """The layer run with the adapter selection of *this* forward: backward recomputes it
        after ``model.adapter(...)`` has exited, and must see the same roles."""
        st = self.adapter_state
        roles = (st.active, st.segments)

        def run(*args):
            prev = (st.active, st.segments)
            st.active, st.segments = roles
            try:
                return layer(*args)
            finally:
                st.active, st.segments = prev

        return run

    @staticmethod
    def _mask(attention_mask, T: int, past: int) -> Optional[torch.Tensor]:
        """Bool ``[B, 1, T, S]``: causal ∧ key is real. None when plain causal suffices."""
        if past == 0 and bool(attention_mask.all()):
            return None
        S = past + T
        dev = attention_mask.device
        q_pos = torch.arange(past, S, device=dev)[:, None]
        causal = torch.arange(S, device=dev)[None, :] <= q_pos  # (T, S)
        m = causal[None] & attention_mask.bool()[:, None, :]
        # A padding query would see no key at all (NaN softmax); let it see itself. Its output is
        # never read, and it is masked as a key for every other query.
        m = m | (torch.arange(S, device=dev)[None, :] == q_pos)[None]
        return m[:, None]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def head(self, name: str, hidden: torch.Tensor) -> torch.Tensor:
        """Scalar head on every position: ``[B, T]`` in fp32."""
        h = self.heads[name]
        return F.linear(hidden.to(h.weight.dtype), h.weight, h.bias).squeeze(-1).float()

    # ---- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 pixel_values: Optional[torch.Tensor] = None, image_features: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 32, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 greedy: bool = False, stop_ids: tuple[int, ...] = (), generator: Optional[torch.Generator] = None,
                 suppress_ids: tuple[int, ...] = ()) -> GenerationOutput:
        """Batched sampling from LEFT-padded prompts ``[B, T]`` with a static KV cache.
        ``suppress_ids`` are never sampled (RL rollouts suppress ``<image>`` and padding, whose
        ids would be misread when the response is scored)."""
        B, T = input_ids.shape
        dev = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        stop = torch.tensor(sorted({self.eos_token_id, *stop_ids}), device=dev)
        cache = KVCache(self.text_config, B, T + max_new_tokens, dev, self.embed_tokens.weight.dtype)
        mask = attention_mask.long()
        hidden = self(input_ids, mask, image_features=image_features, cache=cache)[:, -1]
        tokens = torch.full((B, max_new_tokens), self.pad_token_id, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        stopped = torch.zeros(B, dtype=torch.bool, device=dev)
        lengths = torch.zeros(B, dtype=torch.long, device=dev)
        next_pos = mask.sum(-1)  # (B,) position id of the next token
        for t in range(max_new_tokens):
            logits = self.logits(hidden).float()  # (B, V)
            if suppress_ids:
                logits[:, list(suppress_ids)] = float("-inf")
            nxt = sample(logits, temperature, top_p, top_k, greedy, generator)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_token_id), nxt)
            tokens[:, t] = nxt
            lengths += (~done).long()
            hit = torch.isin(nxt, stop) & ~done
            stopped |= hit
            done |= hit
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            mask = torch.cat([mask, (~done | hit).long()[:, None]], dim=1)
            hidden = self(nxt[:, None], mask, cache=cache, position_ids=next_pos[:, None])[:, -1]
            next_pos = next_pos + 1
        return GenerationOutput(tokens, lengths, stopped)


def sample(logits, temperature=1.0, top_p=1.0, top_k=0, greedy=False, generator=None):
    """One token per row from fp32 logits ``[B, V]``."""
    if greedy or temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = logits.sort(dim=-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) > top_p  # keep the smallest prefix with mass >= top_p
        srt = srt.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, srt)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
