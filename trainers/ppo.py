"""Fact-RLHF PPO on one shared NF4 base (``factrl ppo``, ``make train-ppo``).

Roles on the one base: ``policy`` adapter (trainable, starts as the SFT model: LoRA B = 0),
reference = adapters off (exactly the SFT model), ``value`` adapter initialized from the
reward adapter + a zero-initialized value head (trainable), ``reward`` adapter + head (frozen,
from the RM stage). One PPO step reads top-down:

  1. rollout   — sample responses for a batch of prompts (policy), in memory-bounded chunks
  2. score     — old log-probs (policy), reference log-probs (no adapter), values (value role);
                 grouped into one base pass; reward (reward role) on the fact-augmented RM prompt
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
from typing import Callable, Optional

import numpy as np
import torch

from factrl.kernels.gae import gae, masked_mean, masked_whiten
from factrl.kernels.logprobs import token_logprobs
from factrl.trainers import rm_prompt
from factrl.trainers.config import Config
from factrl.trainers.data import (
    build_rm_input,
    collate_prompts,
    load_captions,
    load_ppo_prompts,
    pad,
    pad_mask,
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
from factrl.trainers.rm import last_token_scores
from factrl.trainers.run import autocast
from factrl.trainers.setup import Assets, load_assets, stage_base, to_device
from factrl.trainers.stage import Stage, epoch_order, trainable_adapter

POLICY, VALUE = "policy", "value"
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
        return replace(self, image_features=feats, **new)


def image_rows(has_image: torch.Tensor) -> torch.Tensor:
    """``[B]``: each row's index into the batch's image features (rows with an image, in order), −1 without."""
    return torch.where(has_image, torch.cumsum(has_image.long(), 0) - 1, -1)


# ---- 1. rollout -----------------------------------------------------------------------------------
@torch.no_grad()
def rollout(model, tok, prompts: list, images, cfg: Config, device, generator, cut_ids=None) -> Rollout:
    """Sample a response to each prompt with the policy, ``rollout_chunk_size`` prompts at a time;
    responses are cut after their first token in ``cut_ids`` (the recipe's "?" cut) if given."""
    p = cfg.ppo
    parts = []  # (collated prompts, their image features, the generation) per chunk
    model.eval()
    for i in range(0, len(prompts), p.rollout_chunk_size):
        b = to_device(collate_prompts(prompts[i:i + p.rollout_chunk_size], tok.pad_token_id, images), device)
        feats = model.encode_images(b["pixel_values"]) if b["pixel_values"] is not None else None
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
    return Rollout(torch.cat([query, response], 1), torch.cat([query_mask, response_mask], 1), response,
                   response_mask, torch.cat(feats) if feats else None,
                   image_rows(has), lengths,
                   torch.cat([g.stopped for *_, g in parts]), cat("caption_type"), cat("length_bonus"))


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


@torch.no_grad()
def score(model, tok, ro: Rollout, prompts: list, cfg: Config, device) -> torch.Tensor:
    """Fill old/ref log-probs and values; return RM scores ``[B]`` (``prompts`` row for row)."""
    p = cfg.ppo
    template = rm_prompt.load_template(cfg.data.fact_template, p.fact_augmented)
    model.eval()
    lp, ref, val, scores = [], [], [], []
    B = ro.input_ids.shape[0]
    for i in range(0, B, p.batch_size):
        idx = list(range(i, min(B, i + p.batch_size)))
        b = ro.select(idx)
        with autocast(device, cfg.model.dtype):
            h_pol, h_ref, h_val = forward_roles(model, b, [POLICY, None, VALUE], p.grouped_scoring)
        lp.append(response_logprobs(model, h_pol, b, p.temperature))
        ref.append(response_logprobs(model, h_ref, b, p.temperature))
        val.append(response_values(model, h_val, b))
        # the reward role reads the RM prompt built from the same response
        # captions shuffled at each use (ppo_trainer.py:356-361) by the global RNG, which checkpoints keep
        rm_ids = [build_rm_input(tok, prompts[j].query_ids, ro.response[j, :int(ro.lengths[j])].tolist(),
                                 rm_prompt.render(template, prompts[j].captions, random)) for j in idx]
        ids, mask = pad(rm_ids, tok.pad_token_id).to(device), pad_mask(rm_ids).to(device)
        with model.adapter(REWARD), autocast(device, cfg.model.dtype):
            h = model(ids, mask, image_features=b.image_features)
        scores.append(last_token_scores(model, REWARD, h, mask))
    ro.old_logprobs, ro.ref_logprobs, ro.values = torch.cat(lp), torch.cat(ref), torch.cat(val)
    return torch.cat(scores)


# ---- 5. PPO epochs --------------------------------------------------------------------------------------
def ppo_update(model, ro: Rollout, stage: Stage, cfg: Config, generator) -> dict:
    """``ppo_epochs`` passes over the rollout in shuffled minibatches of ``step_batch_size``
    rows (one optimizer step each), forwarded ``batch_size`` rows at a time."""
    p, device = cfg.ppo, stage.device
    model.train()
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
                    h_pol, h_val = forward_roles(model, b, [POLICY, VALUE], p.grouped_scoring)
                    logprobs, ent = response_logprobs(model, h_pol, b, p.temperature, entropy=True)
                    values = response_values(model, h_val, b)
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
def build_roles(model, cfg: Config, reward_dir) -> list:
    """policy (fresh, B=0), value (from reward) + zero value head, reward (frozen); returns trainables."""
    from factrl.model.io import load_adapter

    model.requires_grad_(False)
    load_adapter(model, reward_dir, REWARD, trainable=False)
    if REWARD not in model.heads:
        raise FileNotFoundError(f"{reward_dir}: no reward head (heads.safetensors) beside the adapter")
    return (trainable_adapter(model, POLICY, cfg.model.lora)
            + trainable_adapter(model, VALUE, copy_from=REWARD, head=True))


def train_ppo(cfg: Config, eval_fn: Optional[EvalFn] = None) -> dict:
    """PPO from the SFT base and the RM's reward adapter. ``eval_fn(assets, step) -> {name: float}``
    (optional, see ``held_out_eval``) scores the policy every ``ppo.eval_every`` steps."""
    p = cfg.ppo
    stage = Stage(cfg, "ppo")
    device, layout, out = stage.device, stage.layout, stage.out

    # Model: the SFT checkpoint as one NF4 base with every role on it
    a = load_assets(cfg, stage_base(cfg, layout, p.base), quantize=cfg.model.quantize, device=device)
    model, tok = a.model, a.tokenizer
    params = build_roles(model, cfg, p.reward_adapter or str(layout.reward_adapter))

    # Prompts (too-long ones dropped and counted)
    # captions only for a fact-augmented RM (a vanilla one needs no captions file)
    captions = load_captions(a.data_root / cfg.data.captions_file) if p.fact_augmented else None
    prompts = load_ppo_prompts(a.data_root / cfg.data.ppo_prompts_file, tok, a.num_image_tokens,
                               cfg.data.max_prompt_len, captions, skip_bad=cfg.data.skip_bad_records,
                               image_folder=str(a.data_root / cfg.data.image_folder), system=cfg.data.system_prompt)
    st = prompts.stats
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
    saved = stage.train(model, params, p, steps, generators={"rollout": gen, "shuffle": shuffle})
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
            ro = rollout(model, tok, batch, a.images, cfg, device, gen, cut_ids)
            texts = response_texts(tok, ro)
        # 2. score: old/ref log-probs, values, RM score
        with log.timer("scoring"):
            rm_score = score(model, tok, ro, batch, cfg, device)
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
            upd = ppo_update(model, ro, stage, cfg, shuffle)
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
    save_adapter(model, VALUE, layout.value_adapter, base_path=str(a.base), heads=(VALUE,))
    if p.save_merged:
        save_llava_hf(model, layout.merged_policy, tok, a.processor, merge_adapter=POLICY)
    return {"stage": "ppo", "policy_adapter": str(layout.policy_adapter), "steps": steps, **last}
