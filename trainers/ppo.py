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
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional

import torch

from factrl.kernels.gae import gae, masked_mean, masked_whiten
from factrl.kernels.logprobs import token_logprobs
from factrl.trainers.common import (
    Checkpoints,
    Logger,
    StepGuard,
    all_reduce_grads,
    autocast,
    epoch_order,
    make_optimizer,
    plot_curves,
    resolve_device,
    resume_state,
    save_state,
    seed_everything,
    stage_dir,
)
from factrl.trainers.config import Config, save_config
from factrl.trainers.data import build_rm_input, collate_prompts, is_correct, load_captions, load_ppo_prompts
from factrl.trainers.rl import AdaptiveKL, policy_loss, shape_rewards, value_loss
from factrl.trainers.rm import ROLE as REWARD
from factrl.trainers.rm import last_token_scores
from factrl.trainers.setup import load_assets, stage_base, to_device

POLICY, VALUE = "policy", "value"


@dataclass
class Rollout:
    """B sequences = left-padded query (Q tokens) + right-padded response (R tokens).

    input_ids / attention_mask ``[B, Q+R]``; response ``[B, R]``; response_mask ``[B, R]``;
    image_features ``[n_img, P, H]`` (rows with an image, in order) or None; has_image ``[B]``;
    lengths, stopped ``[B]``; caption_type, length_bonus ``[B]``; captions, texts: lists.
    Filled by scoring: logprobs (old), ref_logprobs, values ``[B, R]``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    image_features: Optional[torch.Tensor]
    has_image: torch.Tensor
    lengths: torch.Tensor
    stopped: torch.Tensor
    caption_type: torch.Tensor
    length_bonus: torch.Tensor
    query_ids: list
    captions: list
    texts: list
    logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None  # after GAE
    returns: Optional[torch.Tensor] = None

    @property
    def Q(self) -> int:
        return self.input_ids.shape[1] - self.response.shape[1]

    def select(self, idx: list[int]) -> dict:
        """Rows ``idx`` as a batch for a forward pass (image features of those rows only)."""
        t = torch.tensor(idx, device=self.input_ids.device)
        feats = None
        if self.image_features is not None:
            img_row = torch.cumsum(self.has_image.long(), 0) - 1  # row -> its image index
            rows = [int(img_row[i]) for i in idx if bool(self.has_image[i])]
            feats = self.image_features[rows] if rows else None
        out = {"input_ids": self.input_ids[t], "attention_mask": self.attention_mask[t], "image_features": feats,
               "response": self.response[t], "response_mask": self.response_mask[t]}
        for k in ("logprobs", "ref_logprobs", "values", "advantages", "returns"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v[t]
        return out


def _pad_left(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)


def _pad_right(x: torch.Tensor, width: int, value) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


# ---- 1. rollout -----------------------------------------------------------------------------------
@torch.no_grad()
def rollout(model, tok, prompts: list, images, cfg: Config, device, generator) -> Rollout:
    p = cfg.ppo
    chunks = []
    model.eval()
    for i in range(0, len(prompts), p.rollout_chunk_size):
        ex = prompts[i:i + p.rollout_chunk_size]
        b = to_device(collate_prompts(ex, tok.pad_token_id, images), device)
        feats = model.encode_images(b["pixel_values"]) if b["pixel_values"] is not None else None
        with model.adapter(POLICY), autocast(device, cfg.model.dtype):
            g = model.generate(b["input_ids"], b["attention_mask"], image_features=feats,
                               max_new_tokens=p.max_response_len, temperature=p.temperature, top_p=p.top_p,
                               top_k=p.top_k, generator=generator,
                               suppress_ids=(model.image_token_id, tok.pad_token_id))
        chunks.append((ex, b, feats, g))
    Q = max(c[1]["input_ids"].shape[1] for c in chunks)
    R = max(int(c[3].lengths.max()) for c in chunks)
    R = max(R, 1)
    cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
    resp = cat([_pad_right(g.tokens[:, :R], R, tok.pad_token_id) for _, _, _, g in chunks])
    lengths = cat([g.lengths for *_, g in chunks])
    rmask = (torch.arange(R, device=device)[None] < lengths[:, None]).long()
    q_ids = cat([_pad_left(b["input_ids"], Q, tok.pad_token_id) for _, b, _, _ in chunks])
    q_mask = cat([_pad_left(b["attention_mask"], Q, 0) for _, b, _, _ in chunks])
    feats = [f for _, _, f, _ in chunks if f is not None]
    texts = [tok.decode(resp[i, :int(lengths[i])].tolist(), skip_special_tokens=True) for i in range(len(resp))]
    exs = [e for c in chunks for e in c[0]]
    return Rollout(torch.cat([q_ids, resp], 1), torch.cat([q_mask, rmask], 1), resp, rmask,
                   torch.cat(feats) if feats else None, cat([b["has_image"] for _, b, _, _ in chunks]),
                   lengths, cat([g.stopped for *_, g in chunks]), cat([b["caption_type"] for _, b, _, _ in chunks]),
                   cat([b["length_bonus"] for _, b, _, _ in chunks]), [e.query_ids for e in exs],
                   [e.captions for e in exs], texts)


# ---- 2. score -----------------------------------------------------------------------------------------
def response_logprobs(model, hidden, batch, temperature: float, entropy: bool = False):
    """log π of each response token ``[b, R]`` from hidden ``[b, Q+R, H]`` (position Q−1+j
    predicts response token j), through the fused kernel; 0 on padding."""
    R = batch["response"].shape[1]
    Q = batch["input_ids"].shape[1] - R
    targets = batch["response"].masked_fill(batch["response_mask"] == 0, -100)
    return token_logprobs(hidden[:, Q - 1:Q - 1 + R], model.lm_head.weight.detach(), targets,
                          temperature=temperature, return_entropy=entropy)


def response_values(model, hidden, batch) -> torch.Tensor:
    R = batch["response"].shape[1]
    Q = batch["input_ids"].shape[1] - R
    return model.head(VALUE, hidden[:, Q - 1:Q - 1 + R]) * batch["response_mask"]


def forward_roles(model, b: dict, roles: list, grouped: bool):
    """Hidden states ``[b, Q+R, H]`` for each role; grouped = one base pass over all roles."""
    n = b["input_ids"].shape[0]
    if grouped and len(roles) > 1:
        stack = lambda x: None if x is None else torch.cat([x] * len(roles))  # noqa: E731
        with model.adapter_segments([(r, n) for r in roles]):
            h = model(stack(b["input_ids"]), stack(b["attention_mask"]), image_features=stack(b["image_features"]))
        return list(h.split(n))
    out = []
    for r in roles:
        with model.adapter(r):
            out.append(model(b["input_ids"], b["attention_mask"], image_features=b["image_features"]))
    return out


@torch.no_grad()
def score(model, tok, ro: Rollout, cfg: Config, device) -> torch.Tensor:
    """Fill old/ref log-probs and values; return RM scores ``[B]``."""
    p = cfg.ppo
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
        rm_ids = [build_rm_input(tok, ro.query_ids[j], ro.response[j, :int(ro.lengths[j])].tolist(),
                                 ro.captions[j], p.fact_augmented, cfg.data.fact_template or None) for j in idx]
        T = max(len(x) for x in rm_ids)
        ids = torch.tensor([x + [tok.pad_token_id] * (T - len(x)) for x in rm_ids], device=device)
        mask = (torch.arange(T, device=device)[None] < torch.tensor([len(x) for x in rm_ids], device=device)[:, None])
        with model.adapter(REWARD), autocast(device, cfg.model.dtype):
            h = model(ids, mask.long(), image_features=b["image_features"])
        scores.append(last_token_scores(model, REWARD, h, mask))
    ro.logprobs, ro.ref_logprobs, ro.values = torch.cat(lp), torch.cat(ref), torch.cat(val)
    return torch.cat(scores)


# ---- 5. PPO epochs --------------------------------------------------------------------------------------
def ppo_update(model, ro: Rollout, params, optimizer, scheduler, guard: StepGuard, cfg: Config, device,
               generator) -> dict:
    p = cfg.ppo
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
                w = float(b["response_mask"].sum()) / max(tokens, 1.0)  # token-level mean over the minibatch
                with autocast(device, cfg.model.dtype):
                    h_pol, h_val = forward_roles(model, b, [POLICY, VALUE], p.grouped_scoring)
                    logprobs, ent = response_logprobs(model, h_pol, b, p.temperature, entropy=True)
                    values = response_values(model, h_val, b)
                mask = b["response_mask"]
                pg, clipfrac, approx_kl = policy_loss(logprobs, b["logprobs"], b["advantages"], mask, p.clip_range)
                vf, vf_clipfrac = value_loss(values, b["values"], b["returns"], mask, p.clip_range_value)
                entropy = masked_mean(ent, mask)
                loss = (pg + p.vf_coef * vf - p.entropy_coef * entropy) * w
                loss.backward()
                loss_sum = loss_sum + loss.detach().float().cpu()
                for k, v in (("policy_loss", pg), ("value_loss", vf), ("entropy", entropy), ("clipfrac", clipfrac),
                             ("vf_clipfrac", vf_clipfrac), ("approx_kl", approx_kl),
                             ("value_error", masked_mean((values - b["returns"]) ** 2, mask))):
                    stats.setdefault(k, []).append(float(v.detach()))
            all_reduce_grads(params)
            gn = guard.step(loss_sum, params, optimizer, scheduler, p.grad_clip)
            stats.setdefault("grad_norm", []).append(float("nan") if gn is None else gn)
    return {k: sum(v) / len(v) for k, v in stats.items()}


# ---- the loop -------------------------------------------------------------------------------------------
def build_roles(model, cfg: Config, reward_dir) -> list:
    """policy (fresh, B=0), value (from reward) + zero value head, reward (frozen); returns trainables."""
    from factrl.model.io import load_adapter

    model.requires_grad_(False)
    load_adapter(model, reward_dir, REWARD, trainable=False)
    if REWARD not in model.heads:
        raise FileNotFoundError(f"{reward_dir}: no reward head (heads.safetensors) beside the adapter")
    lc = cfg.model.lora
    model.add_adapter(POLICY, lc.r, lc.alpha, lc.dropout, lc.targets)
    model.copy_adapter(REWARD, VALUE)
    model.add_head(VALUE, zero_init=True)
    params = model.adapter_parameters(POLICY) + model.adapter_parameters(VALUE) + list(model.heads[VALUE].parameters())
    for q in params:
        q.requires_grad_(True)
    return params


def train_ppo(cfg: Config) -> dict:
    p = cfg.ppo
    device = resolve_device(cfg.run.device)
    seed_everything(cfg.run.seed)
    out = stage_dir(cfg, "ppo")
    save_config(cfg, out / "config.yaml")

    # Model: the SFT checkpoint as one NF4 base with every role on it
    a = load_assets(cfg, stage_base(cfg, p.base), quantize=cfg.model.quantize, device=device)
    model, tok = a.model, a.tokenizer
    reward_dir = p.reward_adapter or str(stage_dir(cfg, "rm") / "reward_adapter")
    params = build_roles(model, cfg, reward_dir)

    # Prompts (too-long ones dropped and counted)
    captions = load_captions(a.data_root / cfg.data.captions_file)
    prompts = load_ppo_prompts(a.data_root / cfg.data.ppo_prompts_file, tok, a.num_image_tokens,
                               cfg.data.max_prompt_len, captions, skip_bad=cfg.data.skip_bad_records,
                               image_folder=str(a.data_root / cfg.data.image_folder))
    st = prompts.stats
    print(f"[factrl] ppo: {st.n_loaded} prompts ({st.n_too_long} longer than max_prompt_len={cfg.data.max_prompt_len}"
          f" dropped, {st.n_skipped} bad skipped)")
    per_epoch = len(prompts) // p.rollout_batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(prompts)} prompts is fewer than one rollout batch of {p.rollout_batch_size}")
    steps = p.total_steps if p.total_steps > 0 else max(1, math.ceil(p.epochs * per_epoch))
    updates_per_step = p.ppo_epochs * max(1, p.rollout_batch_size // p.step_batch_size)
    optimizer, scheduler = make_optimizer(params, p, steps * updates_per_step)
    guard = StepGuard(p.max_nonfinite_skips)
    kl_ctl = AdaptiveKL(p.kl_coef, p.kl_target, p.kl_horizon)
    gen = torch.Generator(device=device).manual_seed(cfg.run.seed + 1)  # rollout sampling
    shuffle = torch.Generator().manual_seed(cfg.run.seed + 2)  # minibatch order
    gens = {"rollout": gen, "shuffle": shuffle}
    ckpts = Checkpoints(out / "checkpoints", keep=p.keep_last)

    start, st = resume_state(ckpts, cfg, model, optimizer, scheduler, guard, out / "metrics.jsonl", gens)
    kl_ctl.coef = st.get("kl_coef", kl_ctl.coef)

    log = Logger(out, steps, "ppo", cfg.run.progress, initial=start)
    last: dict = {}
    for step in range(start, steps):
        epoch, pos = divmod(step, per_epoch)
        order = epoch_order(len(prompts), cfg.run.seed, epoch)
        batch = [prompts[i] for i in order[pos * p.rollout_batch_size:(pos + 1) * p.rollout_batch_size]]
        # 1. rollout
        with log.timer("generation"):
            ro = rollout(model, tok, batch, a.images, cfg, device, gen)
        # 2. score: old/ref log-probs, values, RM score
        with log.timer("scoring"):
            rm_score = score(model, tok, ro, cfg, device)
        # 3. shape rewards
        correct = torch.tensor([float(is_correct(t, int(c)) is True) for t, c in zip(ro.texts, ro.caption_type)],
                               device=device)
        if p.reward_whiten:
            rm_score = (rm_score - rm_score.mean()) / (rm_score.std() + 1e-8)
        sh = shape_rewards(rm_score, ro.logprobs, ro.ref_logprobs, ro.response_mask, ro.stopped, ro.lengths,
                           ro.length_bonus, correct, kl_coef=kl_ctl.coef, kl_estimator=p.kl_estimator,
                           no_eos_penalty=p.no_eos_penalty, length_penalty=p.length_penalty,
                           max_response_len=p.max_response_len, correct_bonus=p.correct_bonus,
                           reward_clip=p.reward_clip)
        # 4. GAE (kernel), advantages whitened over valid tokens
        adv, ret = gae(sh.rewards, ro.values, ro.response_mask, p.gamma, p.lam)
        if p.whiten_advantages:
            adv = masked_whiten(adv, ro.response_mask)
        ro.advantages, ro.returns = adv, ret
        # 5. PPO epochs
        with log.timer("training"):
            upd = ppo_update(model, ro, params, optimizer, scheduler, guard, cfg, device, shuffle)
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
                "tokens_per_s": n_tok / max(1e-9, sum(timings.values())), "lr": scheduler.get_last_lr()[0],
                "skipped": guard.skipped, **upd}
        if p.sample_every > 0 and step % p.sample_every == 0:
            table = "\n".join(f"| {tok.decode(ro.query_ids[i][-24:], skip_special_tokens=True)!r} | {ro.texts[i]!r} "
                              f"| {float(sh.total[i]):.3f} |" for i in range(min(4, len(ro.texts))))
            log.text("samples", "| prompt (tail) | response | reward |\n|---|---|---|\n" + table, step + 1)
            with open(out / "samples.jsonl", "a") as f:
                for i in range(min(4, len(ro.texts))):
                    row = {"step": step + 1, "response": ro.texts[i], "reward": float(sh.total[i])}
                    f.write(json.dumps(row) + "\n")
        log.log(step + 1, last)
        if (step + 1) % p.save_every == 0 or step + 1 == steps:
            save_state(ckpts, step + 1, cfg, model, optimizer, scheduler, guard, gens, kl_coef=kl_ctl.coef)
    log.close()
    plot_curves(out / "metrics.jsonl", out / "curves.png", ["reward", "reward/rm", "kl", "response_len"])

    # The policy adapter in PEFT format (+ value adapter/head for inspection; merged on request)
    from factrl.model.io import save_adapter, save_llava_hf

    save_adapter(model, POLICY, out / "policy_adapter", base_path=str(a.base))
    save_adapter(model, VALUE, out / "value_adapter", base_path=str(a.base), heads=(VALUE,))
    if p.save_merged:
        save_llava_hf(model, out / "merged", tok, a.processor, merge_adapter=POLICY)
    return {"stage": "ppo", "policy_adapter": str(out / "policy_adapter"), "steps": steps, **last}
