"""Fact-RLHF PPO on one shared NF4 base (``factrl ppo``, ``make train-ppo``).

Roles on the one base: ``policy`` adapter (trainable, starts as the SFT model: LoRA B = 0),
reference = adapters off (exactly the SFT model), ``value`` adapter initialized from the
reward adapter + a zero-initialized value head (trainable), ``reward`` adapter + head (frozen,
from the RM stage). Two options of the recipe: ``ppo.init_adapter`` (RL-init: the policy starts
as a trainable copy of that adapter, the reference is the base with it, frozen) and
``ppo.reward_base`` (reward and value on a second NF4 base with its own CLIP tower, e.g. a 13B RM
beside a 7B policy: each base's rows get their own image features and their own passes).
One PPO step reads top-down:

  1. rollout   — sample responses for a batch of prompts (policy), in memory-bounded chunks
  2. score     — old log-probs (policy), reference log-probs (no adapter, or the frozen RL-init
                 one), values (value role); grouped into one pass per base; reward (reward role)
                 on the fact-augmented RM prompt
  3. shape     — RM score, no-EOS penalty, length term, correctness bonus, per-token KL
  4. GAE       — advantages and returns (kernel), advantages whitened over valid tokens
  5. PPO epochs — clipped policy + value losses on shuffled minibatches, accumulation, clipping
  6. log       — rewards and each shaping term, KL, entropy, clip fractions, timing, samples
  7. eval      — every ``ppo.eval_every`` steps, the caller's held-out eval hook (``eval_fn``)
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from factrl.kernels.gae import gae, masked_mean, masked_whiten
from factrl.kernels.logprobs import token_logprobs
from factrl.trainers import rm_prompt
from factrl.trainers.config import Config, ConfigError
from factrl.trainers.data import (
    build_rm_input,
    collate_prompts,
    encode_segment,
    load_captions,
    load_ppo_prompts,
    pad,
    pad_mask,
    select_question_types,
)
from factrl.trainers.rl import (
    AdaptiveKL,
    correctness,
    cut_after,
    gae_reward_scale,
    policy_loss,
    shape_rewards,
    value_loss,
)
from factrl.trainers.rm import ROLE as REWARD
from factrl.trainers.rm import Reading, check_reading, rm_scores
from factrl.trainers.run import autocast
from factrl.trainers.setup import Assets, load_assets, stage_base, to_device
from factrl.trainers.stage import Stage, epoch_order, trainable_adapter

POLICY, VALUE, REFERENCE = "policy", "value", "reference"
_TENSORS = ("input_ids", "attention_mask", "response", "response_mask", "image_rows", "lengths", "stopped",
            "caption_type", "length_bonus", "old_logprobs", "ref_logprobs", "values", "advantages", "returns")


@dataclass
class Rollout:
    """B sequences = a left-padded query of Q tokens + a right-padded response of R tokens.

    input_ids, attention_mask ``[B, Q+R]``; response, response_mask ``[B, R]``; image_features
    ``[n_img, P, H]`` (the rows that have an image, in row order) or None; image_rows ``[B]``:
    each row's index into image_features, −1 without an image; lengths (response tokens incl.
    EOS), stopped (ended by EOS), caption_type, length_bonus ``[B]``. Filled by scoring:
    old_logprobs (the policy at rollout), ref_logprobs, values ``[B, R]``; by GAE: advantages,
    returns ``[B, R]``. The prompts' lists (query ids, captions) stay beside it, row for row.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    image_features: Optional[torch.Tensor]
    image_rows: torch.Tensor
    lengths: torch.Tensor
    stopped: torch.Tensor
    caption_type: torch.Tensor
    length_bonus: torch.Tensor
    old_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None
    # Two-base mode: the same rows as the reward base reads them (its query has that tower's
    # image-token count, its image_features that tower's), which the value role runs on.
    reward_view: Optional["Rollout"] = None

    @property
    def R(self) -> int:
        return self.response.shape[1]

    @property
    def Q(self) -> int:
        return self.input_ids.shape[1] - self.R

    def select(self, idx: list[int]) -> "Rollout":
        """Rows ``idx`` (a Rollout again), with the image features of those rows only."""
        t = torch.tensor(idx, device=self.input_ids.device)
        rows = self.image_rows[t]
        has = rows >= 0
        feats = self.image_features[rows[has]] if self.image_features is not None and bool(has.any()) else None
        new = {k: getattr(self, k)[t] for k in _TENSORS if getattr(self, k) is not None}
        new["image_rows"] = image_rows(has)
        view = self.reward_view.select(idx) if self.reward_view is not None else None
        return replace(self, image_features=feats, reward_view=view, **new)


def image_rows(has_image: torch.Tensor) -> torch.Tensor:
    """``[B]``: each row's index into the batch's image features (rows with an image, in order), −1 without."""
    return torch.where(has_image, torch.cumsum(has_image.long(), 0) - 1, -1)


@dataclass
class RewardBase:
    """Two-base mode's second base: ``model`` (NF4, carries the reward and value roles),
    ``images`` (file name → pixels for *its* tower: own resolution and normalization),
    ``num_image_tokens`` (its patches per image), ``path``."""

    model: object
    images: Optional[Callable[[str], torch.Tensor]]
    num_image_tokens: int
    path: object


def expand_images(ids: list[int], image_id: int, n: int) -> list[int]:
    """``ids`` with each run of ``image_id`` (one image's tokens) replaced by ``n`` of them: a
    query rendered for the policy's tower, re-rendered for the reward base's (336 px: 576 patches
    where 224 px has 256). Prompts hold one image each, so runs never merge."""
    out, prev = [], None
    for t in ids:
        if t != image_id:
            out.append(t)
        elif prev != image_id:
            out += [image_id] * n
        prev = t
    return out


def reward_view(ro: "Rollout", prompts: list, reward: RewardBase, pad_id: int, image_id: int,
                image_features: Optional[torch.Tensor]) -> "Rollout":
    """The rollout's rows as the reward base reads them: each query re-rendered with that
    tower's image-token count (left-padded again), the same responses, its own image features."""
    q = [expand_images(p.query_ids, image_id, reward.num_image_tokens) for p in prompts]
    dev = ro.input_ids.device
    query, query_mask = pad(q, pad_id, left=True).to(dev), pad_mask(q, left=True).to(dev)
    return replace(ro, input_ids=torch.cat([query, ro.response], 1),
                   attention_mask=torch.cat([query_mask, ro.response_mask], 1), image_features=image_features)


# ---- 1. rollout -----------------------------------------------------------------------------------
@torch.no_grad()
def rollout(model, tok, prompts: list, images, cfg: Config, device, generator, cut_ids=None,
            reward: Optional[RewardBase] = None) -> Rollout:
    """Sample a response to each prompt with the policy, ``rollout_chunk_size`` prompts at a time;
    responses are cut after their first token in ``cut_ids`` (the recipe's "?" cut) if given.
    With a ``reward`` base, also its view of the rows (``Rollout.reward_view``): image features are
    computed here once per tower and reused by every pass of the step."""
    p = cfg.ppo
    parts = []  # (collated prompts, their image features, the generation) per chunk
    reward_feats = []  # two-base mode: the reward tower's features per chunk
    model.eval()
    for i in range(0, len(prompts), p.rollout_chunk_size):
        b = to_device(collate_prompts(prompts[i:i + p.rollout_chunk_size], tok.pad_token_id, images), device)
        feats = model.encode_images(b["pixel_values"]) if b["pixel_values"] is not None else None
        if reward is not None and feats is not None:
            px = torch.stack([reward.images(e.image) for e in prompts[i:i + p.rollout_chunk_size]
                              if e.image is not None]).to(device)
            reward_feats.append(reward.model.encode_images(px))
        with model.adapter(POLICY), autocast(device, cfg.model.dtype):
            g = model.generate(b["input_ids"], b["attention_mask"], image_features=feats,
                               max_new_tokens=p.max_response_len, temperature=p.temperature, top_p=p.top_p,
                               top_k=p.top_k, generator=generator,
                               suppress_ids=(model.image_token_id, tok.pad_token_id))
        if cut_ids is not None:
            g = type(g)(*cut_after(g.tokens, g.lengths, g.stopped, cut_ids, tok.pad_token_id))
        parts.append((b, feats, g))
    R = max(1, max(int(g.lengths.max()) for *_, g in parts))
    rows = lambda key: [r for b, _, _ in parts for r in b[key]]  # noqa: E731
    cat = lambda key: torch.cat([b[key] for b, _, _ in parts])  # noqa: E731
    query = pad(rows("input_ids"), tok.pad_token_id, left=True).to(device)  # (B, Q) over all chunks
    query_mask = pad(rows("attention_mask"), 0, left=True).to(device)
    response = pad([r[:R] for *_, g in parts for r in g.tokens], tok.pad_token_id, length=R).to(device)  # (B, R)
    lengths = torch.cat([g.lengths for *_, g in parts])
    response_mask = (torch.arange(R, device=device)[None] < lengths[:, None]).long()
    has = cat("has_image")
    feats = [f for _, f, _ in parts if f is not None]
    ro = Rollout(torch.cat([query, response], 1), torch.cat([query_mask, response_mask], 1), response,
                 response_mask, torch.cat(feats) if feats else None,
                 image_rows(has), lengths,
                 torch.cat([g.stopped for *_, g in parts]), cat("caption_type"), cat("length_bonus"))
    if reward is not None:
        ro.reward_view = reward_view(ro, prompts, reward, tok.pad_token_id, model.image_token_id,
                                     torch.cat(reward_feats) if reward_feats else None)
    return ro


def response_texts(tok, ro: Rollout) -> list[str]:
    return [tok.decode(ro.response[i, :int(ro.lengths[i])].tolist(), skip_special_tokens=True)
            for i in range(ro.response.shape[0])]


# ---- 2. score -----------------------------------------------------------------------------------------
def response_logprobs(model, hidden, b: Rollout, temperature: float, entropy: bool = False):
    """log π of each response token ``[b, R]`` from hidden ``[b, Q+R, H]`` (position Q−1+j
    predicts response token j), through the fused kernel; 0 on padding."""
    targets = b.response.masked_fill(b.response_mask == 0, -100)
    return token_logprobs(hidden[:, b.Q - 1:b.Q - 1 + b.R], model.lm_head.weight.detach(), targets,
                          temperature=temperature, return_entropy=entropy)


def response_values(model, hidden, b: Rollout) -> torch.Tensor:
    return model.head(VALUE, hidden[:, b.Q - 1:b.Q - 1 + b.R]) * b.response_mask


def forward_roles(model, b: Rollout, roles: list, grouped: bool):
    """Hidden states ``[b, Q+R, H]`` for each role; grouped = one base pass over all roles."""
    n = b.input_ids.shape[0]
    if grouped and len(roles) > 1:
        stack = lambda x: None if x is None else torch.cat([x] * len(roles))  # noqa: E731
        with model.adapter_segments([(r, n) for r in roles]):
            h = model(stack(b.input_ids), stack(b.attention_mask), image_features=stack(b.image_features))
        return list(h.split(n))
    out = []
    for r in roles:
        with model.adapter(r):
            out.append(model(b.input_ids, b.attention_mask, image_features=b.image_features))
    return out


def reference_role(cfg: Config) -> Optional[str]:
    """The reference's adapter: the RL-init one (frozen) with ``ppo.init_adapter``, else None (the base)."""
    return REFERENCE if cfg.ppo.init_adapter else None


@torch.no_grad()
def score(model, tok, ro: Rollout, prompts: list, cfg: Config, device,
          reward: Optional[RewardBase] = None) -> torch.Tensor:
    """Fill old/ref log-probs and values; return RM scores ``[B]`` (``prompts`` row for row).
    One base: policy, reference and value rows in one grouped pass. Two bases: policy and
    reference grouped on the policy base, value and reward on the reward base (its view)."""
    p = cfg.ppo
    template = rm_prompt.load_template(cfg.data.fact_template, p.fact_augmented)
    order = random if cfg.data.shuffle_captions else None  # data.shuffle_captions=false: the file's order
    ref_role = reference_role(cfg)
    reading = Reading.of(cfg.rm)
    rmodel = model if reward is None else reward.model
    model.eval()
    rmodel.eval()
    lp, ref, val, scores = [], [], [], []
    B = ro.input_ids.shape[0]
    for i in range(0, B, p.batch_size):
        idx = list(range(i, min(B, i + p.batch_size)))
        b = ro.select(idx)
        rb = b if reward is None else b.reward_view  # the rows as the reward base reads them
        with autocast(device, cfg.model.dtype):
            if reward is None:
                h_pol, h_ref, h_val = forward_roles(model, b, [POLICY, ref_role, VALUE], p.grouped_scoring)
            else:
                h_pol, h_ref = forward_roles(model, b, [POLICY, ref_role], p.grouped_scoring)
                (h_val,) = forward_roles(rmodel, rb, [VALUE], p.grouped_scoring)
        lp.append(response_logprobs(model, h_pol, b, p.temperature))
        ref.append(response_logprobs(model, h_ref, b, p.temperature))
        val.append(response_values(rmodel, h_val, rb))
        # the reward role reads the RM prompt built from the same response
        # captions shuffled at each use (ppo_trainer.py:356-361) by the global RNG, which checkpoints keep
        queries = [prompts[j].query_ids if reward is None else
                   expand_images(prompts[j].query_ids, model.image_token_id, reward.num_image_tokens) for j in idx]
        texts = [rm_prompt.render(template, prompts[j].captions, order) for j in idx]
        rm_ids = [build_rm_input(tok, q, ro.response[j, :int(ro.lengths[j])].tolist(), t)
                  for q, j, t in zip(queries, idx, texts)]
        ids, mask = pad(rm_ids, tok.pad_token_id).to(device), pad_mask(rm_ids).to(device)
        with rmodel.adapter(REWARD), autocast(device, cfg.model.dtype):
            h = rmodel(ids, mask, image_features=rb.image_features)
        sfx = (torch.tensor([len(encode_segment(tok, t, 0)) for t in texts], device=device)
               if reading.needs_suffix else None)  # each RM prompt's length (memo hits)
        scores.append(rm_scores(rmodel, REWARD, h, ids, mask, reading, sfx))
    ro.old_logprobs, ro.ref_logprobs, ro.values = torch.cat(lp), torch.cat(ref), torch.cat(val)
    return torch.cat(scores)


# ---- 5. PPO epochs --------------------------------------------------------------------------------------
def ppo_update(model, ro: Rollout, stage: Stage, cfg: Config, generator,
               reward: Optional[RewardBase] = None) -> dict:
    """``ppo_epochs`` passes over the rollout in shuffled minibatches of ``step_batch_size``
    rows (one optimizer step each), forwarded ``batch_size`` rows at a time. Two bases: the
    value role's rows run on the reward base."""
    p, device = cfg.ppo, stage.device
    rmodel = model if reward is None else reward.model
    model.train()
    rmodel.train()
    B = ro.input_ids.shape[0]
    stats: dict[str, list] = {}
    n_mb = max(1, B // p.step_batch_size)
    for _ in range(p.ppo_epochs):
        perm = torch.randperm(B, generator=generator).tolist()
        for m in range(n_mb):
            mb = perm[m * p.step_batch_size:(m + 1) * p.step_batch_size]
            tokens = float(ro.response_mask[mb].sum())
            loss_sum = torch.zeros(())
            for i in range(0, len(mb), p.batch_size):
                b = ro.select(mb[i:i + p.batch_size])
                w = float(b.response_mask.sum()) / max(tokens, 1.0)  # token-level mean over the minibatch
                with autocast(device, cfg.model.dtype):
                    if reward is None:
                        h_pol, h_val = forward_roles(model, b, [POLICY, VALUE], p.grouped_scoring)
                    else:
                        (h_pol,) = forward_roles(model, b, [POLICY], p.grouped_scoring)
                        (h_val,) = forward_roles(rmodel, b.reward_view, [VALUE], p.grouped_scoring)
                    logprobs, ent = response_logprobs(model, h_pol, b, p.temperature, entropy=True)
                    values = response_values(rmodel, h_val, b if reward is None else b.reward_view)
                mask = b.response_mask
                pg, clipfrac, approx_kl = policy_loss(logprobs, b.old_logprobs, b.advantages, mask, p.clip_range)
                vf, vf_clipfrac = value_loss(values, b.values, b.returns, mask, p.clip_range_value)
                entropy = masked_mean(ent, mask)
                loss = (pg + p.vf_coef * vf - p.entropy_coef * entropy) * w
                loss.backward()
                loss_sum = loss_sum + loss.detach().float().cpu()
                for k, v in (("policy_loss", pg), ("value_loss", vf), ("entropy", entropy), ("clipfrac", clipfrac),
                             ("vf_clipfrac", vf_clipfrac), ("approx_kl", approx_kl),
                             ("value_error", masked_mean((values - b.returns) ** 2, mask))):
                    stats.setdefault(k, []).append(float(v.detach()))
            gn = stage.optimizer_step(loss_sum, schedule=False)  # the schedule steps per PPO step
            stats.setdefault("grad_norm", []).append(float("nan") if gn is None else gn)
    return {k: sum(v) / len(v) for k, v in stats.items()}


# ---- 7. held-out eval ------------------------------------------------------------------------------------
EvalFn = Callable[[Assets, int], dict]  # (the stage's model, tokenizer, images..., step) -> {name: float}


def held_out_eval(a: Assets, eval_fn: EvalFn, step: int, device) -> dict:
    """``eval_fn(a, step)`` (``a``: the stage's assets, ``a.model`` the PPO model) in eval mode,
    without gradients, with the policy adapter active; its keys prefixed ``eval/``. Every global
    RNG the PPO step reads (Python's for the caption shuffle, numpy, torch) is restored afterwards,
    so an eval never changes the run it watches."""
    model = a.model
    was = model.training
    py, npy = random.getstate(), np.random.get_state()
    devices = [device.index or torch.cuda.current_device()] if device.type == "cuda" else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), model.adapter(POLICY):
            out = eval_fn(a, step)
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        model.train(was)
    return {f"eval/{k}": float(v) for k, v in out.items()}


# ---- the loop -------------------------------------------------------------------------------------------
def build_roles(model, cfg: Config, reward_dir, reward_model=None) -> list:
    """reward (frozen), policy, value (from reward) + zero value head; returns trainables.

    The policy is fresh (B = 0) or, with ``ppo.init_adapter``, a trainable copy of the RL-init
    adapter, which also stays loaded frozen as the reference (ppo_trainer.py:1015-1024 loads it
    as ``lora_policy`` trainable, :1076-1084 again as ``lora_ref_policy`` frozen). Reward and
    value live on ``reward_model`` (two-base mode) or on ``model``; value starts as the reward
    adapter with a zeroed head (ppo_trainer.py:1034-1047, rl_models.py:204-208)."""
    from factrl.model.io import load_adapter

    rmodel = model if reward_model is None else reward_model
    model.requires_grad_(False)
    rmodel.requires_grad_(False)
    check_reading(reward_dir, Reading.of(cfg.rm))
    load_adapter(rmodel, reward_dir, REWARD, trainable=False)
    if REWARD not in rmodel.heads:
        raise FileNotFoundError(f"{reward_dir}: no reward head (heads.safetensors or the original's reward_head) "
                                "beside the adapter")
    if cfg.ppo.init_adapter:
        load_adapter(model, cfg.ppo.init_adapter, REFERENCE, trainable=False)
        policy = trainable_adapter(model, POLICY, copy_from=REFERENCE)
    else:
        policy = trainable_adapter(model, POLICY, cfg.model.lora)
    return policy + trainable_adapter(rmodel, VALUE, copy_from=REWARD, head=True)


def policy_base(cfg: Config, layout) -> Path:
    """What the policy and reference quantize: ``ppo.base``; with an RL-init adapter and no
    ppo.base, the base that adapter was trained on (its adapter_config.json, as the original's
    load_4bit_model_for_inference, qlora_model.py:244-245); else as rm.base."""
    from factrl.model.io import adapter_base

    p = cfg.ppo
    if p.base or not p.init_adapter:
        return stage_base(cfg, layout, p.base)
    base = adapter_base(p.init_adapter)
    if base is None or not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"{p.init_adapter}: its base_model_name_or_path {base!r} is not a local checkpoint; "
                                "set ppo.base to the checkpoint the RL-init adapter was trained on")
    return Path(base)


def load_reward_base(cfg: Config, policy_tok, device) -> RewardBase:
    """``ppo.reward_base`` as an NF4 base with its own tower and image loader; its tokenizer must
    be the policy's (the recipe reads both bases with the policy's, finetune_lora_ppo.py:458-466)."""
    a = load_assets(cfg, Path(cfg.ppo.reward_base), quantize=cfg.model.quantize, device=device)
    if a.tokenizer.get_vocab() != policy_tok.get_vocab():
        raise ValueError(f"ppo.reward_base={cfg.ppo.reward_base}: its tokenizer differs from the policy base's "
                         f"({len(a.tokenizer)} vs {len(policy_tok)} tokens); both bases must share one vocabulary")
    return RewardBase(a.model, a.images, a.num_image_tokens, a.base)


RewardFn = Callable[[list, list[str]], torch.Tensor]  # (prompts, responses) -> [B] scores


def train_ppo(cfg: Config, eval_fn: Optional[EvalFn] = None, reward_fn: Optional[RewardFn] = None) -> dict:
    """PPO from the SFT base and the RM's reward adapter. ``eval_fn(assets, step) -> {name: float}``
    (optional, see ``held_out_eval``) scores the policy every ``ppo.eval_every`` steps;
    ``reward_fn`` (``ppo.reward_source=checker``: a world's ground-truth checker) replaces the RM score."""
    p = cfg.ppo
    if (p.reward_source == "checker") != (reward_fn is not None):
        raise ConfigError(f"ppo.reward_source={p.reward_source} with{'out' if reward_fn is None else ''} a reward_fn: "
                          "the checker reward is the embedded world's, supplied by factrl pipeline (make train)")
    stage = Stage(cfg, "ppo")
    device, layout, out = stage.device, stage.layout, stage.out

    # Model: the SFT checkpoint as one NF4 base with every role on it, or (ppo.reward_base) the
    # policy and reference on it and reward and value on a second base
    a = load_assets(cfg, policy_base(cfg, layout), quantize=cfg.model.quantize, device=device)
    model, tok = a.model, a.tokenizer
    reward = load_reward_base(cfg, tok, device) if p.reward_base else None
    params = build_roles(model, cfg, p.reward_adapter or str(layout.reward_adapter),
                         None if reward is None else reward.model)

    # Prompts (too-long ones dropped and counted)
    # captions only for a fact-augmented RM (a vanilla one needs no captions file)
    captions = load_captions(a.data_root / cfg.data.captions_file) if p.fact_augmented else None
    prompts = load_ppo_prompts(a.data_root / cfg.data.ppo_prompts_file, tok, a.num_image_tokens,
                               cfg.data.max_prompt_len, captions, skip_bad=cfg.data.skip_bad_records,
                               image_folder=str(a.data_root / cfg.data.image_folder), system=cfg.data.system_prompt)
    st = prompts.stats
    prompts = select_question_types(prompts, a.data_root / cfg.data.ppo_prompts_file, p.question_types,
                                    "ppo.question_types")
    print(f"[factrl] ppo: {st.n_loaded} prompts ({st.n_too_long} longer than max_prompt_len={cfg.data.max_prompt_len}"
          f" dropped, {st.n_skipped} bad skipped)")
    per_epoch = len(prompts) // p.rollout_batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(prompts)} prompts is fewer than one rollout batch of {p.rollout_batch_size}")
    # as RLHF/models/rl_trainer.py:282-285: total episodes // rollout batch
    steps = p.total_steps if p.total_steps > 0 else max(1, int(len(prompts) * p.epochs) // p.rollout_batch_size)
    # "?" in any form the tokenizer has (the recipe checks Llama's "?" and "▁?" ids, ppo_trainer.py:250-254)
    cut_ids = torch.tensor([i for t, i in tok.get_vocab().items() if "?" in t]) if p.truncate_at_question else None
    kl_ctl = AdaptiveKL(p.kl_coef, p.kl_target, p.kl_horizon)
    gen = torch.Generator(device=device).manual_seed(cfg.run.seed + 1)  # rollout sampling
    shuffle = torch.Generator().manual_seed(cfg.run.seed + 2)  # minibatch order
    # the checkpoint holds every trainable of both bases (one base: the model itself, names unchanged)
    trained = model if reward is None else torch.nn.ModuleDict({"policy_base": model, "reward_base": reward.model})
    saved = stage.train(trained, params, p, steps, generators={"rollout": gen, "shuffle": shuffle})
    kl_ctl.coef = saved.get("kl_coef", kl_ctl.coef)

    log = stage.log
    last: dict = {}
    evals = eval_fn is not None and p.eval_every > 0 and stage.rank == 0  # logs are written by rank 0
    eval_keys: set = set()
    if evals and stage.start == 0:  # step 0: the policy before any update (= the SFT model)
        with log.timer("eval"):
            first = held_out_eval(a, eval_fn, 0, device)
        eval_keys |= set(first)
        log.log(0, first, advance=0)
    for step in range(stage.start, steps):
        epoch, pos = divmod(step, per_epoch)
        order = epoch_order(len(prompts), cfg.run.seed, epoch)
        batch = [prompts[i] for i in order[pos * p.rollout_batch_size:(pos + 1) * p.rollout_batch_size]]
        # 1. rollout
        with log.timer("generation"):
            ro = rollout(model, tok, batch, a.images, cfg, device, gen, cut_ids, reward)
            texts = response_texts(tok, ro)
        # 2. score: old/ref log-probs, values, RM score
        with log.timer("scoring"):
            rm_score = score(model, tok, ro, batch, cfg, device, reward)
            if reward_fn is not None:  # the checker's verdict replaces the RM's (score still fills values)
                rm_score = reward_fn(batch, texts).to(rm_score)
        # 3. shape rewards
        correct = correctness(texts, ro.caption_type.tolist(), p.correct_rule).to(device)
        if p.reward_whiten:
            rm_score = (rm_score - rm_score.mean()) / (rm_score.std() + 1e-8)
        sh = shape_rewards(rm_score, ro.old_logprobs, ro.ref_logprobs, ro.response_mask, ro.stopped, ro.lengths,
                           ro.length_bonus, correct, kl_coef=kl_ctl.coef, kl_estimator=p.kl_estimator,
                           no_eos_penalty=p.no_eos_penalty, length_penalty=p.length_penalty,
                           max_response_len=p.max_response_len, correct_bonus=p.correct_bonus,
                           reward_clip=p.reward_clip, reward_scale=gae_reward_scale(p))
        # 4. GAE (kernel), advantages whitened over valid tokens (or every position, as the recipe)
        adv, ret = gae(sh.rewards, ro.values, ro.response_mask, p.gamma, p.lam)
        if p.whiten_advantages:
            adv = masked_whiten(adv, torch.ones_like(ro.response_mask) if p.whiten_over_padding else ro.response_mask)
        ro.advantages, ro.returns = adv, ret
        # 5. PPO epochs
        with log.timer("training"):
            upd = ppo_update(model, ro, stage, cfg, shuffle, reward)
        stage.scheduler.step()  # once per PPO step, as RLHF/models/rl_trainer.py:245-252
        # 6. log
        n_tok = float(ro.response_mask.sum())
        kl_seq = float((sh.kl.sum(-1)).mean())
        if p.adaptive_kl:
            kl_ctl.update(kl_seq, p.rollout_batch_size)
        timings = dict(log.phase)
        last = {"reward": float(sh.total.mean()), "reward/rm": float(sh.score.mean()),
                "reward/no_eos": float(sh.no_eos.mean()), "reward/length": float(sh.length.mean()),
                "reward/correct": float(sh.correct.mean()), "kl": kl_seq, "kl_coef": kl_ctl.coef,
                "response_len": float(ro.lengths.float().mean()), "eos_share": float(ro.stopped.float().mean()),
                "tokens_per_s": n_tok / max(1e-9, sum(timings.values())), "lr": stage.lr,
                "skipped": stage.guard.skipped, **upd}
        if p.sample_every > 0 and step % p.sample_every == 0:
            shown = range(min(4, len(texts)))
            table = "\n".join(f"| {tok.decode(batch[i].query_ids[-24:], skip_special_tokens=True)!r} | {texts[i]!r} "
                              f"| {float(sh.total[i]):.3f} |" for i in shown)
            log.text("samples", "| prompt (tail) | response | reward |\n|---|---|---|\n" + table, step + 1)
            with open(out / "samples.jsonl", "a") as f:
                for i in shown:
                    f.write(json.dumps({"step": step + 1, "response": texts[i], "reward": float(sh.total[i])}) + "\n")
        # 7. held-out eval (after the timings above were read: its time is logged apart, as time/eval)
        if evals and ((step + 1) % p.eval_every == 0 or step + 1 == steps):
            with log.timer("eval"):
                scores = held_out_eval(a, eval_fn, step + 1, device)
            eval_keys |= set(scores)
            last.update(scores)
        stage.end_step(step + 1, last, kl_coef=kl_ctl.coef)
    stage.finish(["reward", "reward/rm", "kl", "response_len", *sorted(eval_keys)])

    # The policy adapter in PEFT format (+ value adapter/head for inspection; merged on request)
    from factrl.model.io import save_adapter, save_llava_hf

    save_adapter(model, POLICY, layout.policy_adapter, base_path=str(a.base))
    save_adapter(model if reward is None else reward.model, VALUE, layout.value_adapter,
                 base_path=str(a.base if reward is None else reward.path), heads=(VALUE,))
    if p.save_merged:
        save_llava_hf(model, layout.merged_policy, tok, a.processor, merge_adapter=POLICY)
    return {"stage": "ppo", "policy_adapter": str(layout.policy_adapter), "steps": steps, **last}
