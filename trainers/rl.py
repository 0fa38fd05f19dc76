"""PPO maths as pure functions on ``[B, R]`` response tensors (R = response tokens).

Every mean is *token-level over the response mask* (the original recipe averaged over padding
too); padding never contributes. Vocabulary: logprobs, old_logprobs, ref_logprobs, values,
advantages, returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from factrl.kernels.gae import masked_mean
from factrl.kernels.logprobs import kl_penalty


def policy_loss(logprobs, old_logprobs, advantages, mask, clip: float):
    """Clipped surrogate: mean over valid tokens of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)).
    Returns (loss, clip fraction, approx-KL ½(logπ − logπ_old)²)."""
    ratio = torch.exp(logprobs - old_logprobs)
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(pg1, pg2), mask)
    clipfrac = masked_mean((pg2 > pg1).float(), mask)
    approx_kl = 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)
    return loss, clipfrac.detach(), approx_kl.detach()


def value_loss(values, old_values, returns, mask, clip: float):
    """Clipped value loss ½·max((V − R)², (V_clip − R)²), V_clip = V_old + clip(V − V_old, ±ε).
    Returns (loss, clip fraction)."""
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    l1 = (values - returns) ** 2
    l2 = (v_clip - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(l1, l2), mask)
    return loss, masked_mean((l2 > l1).float(), mask).detach()


@dataclass
class ShapedRewards:
    """rewards ``[B, R]`` per token; the sequence-level parts ``[B]`` for logging."""

    rewards: torch.Tensor
    kl: torch.Tensor  # per-token KL estimate [B, R] (0 on padding)
    score: torch.Tensor  # RM score [B]
    no_eos: torch.Tensor  # penalty applied [B]
    length: torch.Tensor  # length term [B]
    correct: torch.Tensor  # correctness bonus [B]
    total: torch.Tensor  # sequence-level total added at the last token [B]


def shape_rewards(score, old_logprobs, ref_logprobs, mask, stopped, lengths, length_bonus,
                  correct: Optional[torch.Tensor], *, kl_coef: float, kl_estimator: str, no_eos_penalty: float,
                  length_penalty: float, max_response_len: int, correct_bonus: float,
                  reward_clip: float = 0.0) -> ShapedRewards:
    """Fact-RLHF reward shaping (DESIGN.md):
    sequence term at the last response token = RM score + no-EOS penalty (if the sequence did not
    stop) + length_penalty · len / max_len · length_bonus + correct_bonus (if a known answer was
    given correctly); every token gets −kl_coef · KL(π_old ‖ π_ref) with the chosen estimator.

    score/stopped/lengths/length_bonus ``[B]``; correct ``[B]`` float in {1 correct, 0 not or
    unknown} or None; logprobs/mask ``[B, R]``.
    """
    m = mask.float()
    kl = kl_penalty(old_logprobs, ref_logprobs, kl_estimator) * m
    no_eos = torch.where(stopped.bool(), torch.zeros_like(score), torch.full_like(score, no_eos_penalty))
    length = length_penalty * lengths.float() / max_response_len * length_bonus
    corr = torch.zeros_like(score) if correct is None else correct_bonus * correct.float()
    s = score.clamp(-reward_clip, reward_clip) if reward_clip > 0 else score
    total = s + no_eos + length + corr
    rewards = -kl_coef * kl
    last = (lengths.long() - 1).clamp(min=0)
    has = lengths > 0
    rows = torch.arange(rewards.shape[0], device=rewards.device)[has]
    rewards = rewards.index_put((rows, last[has]), rewards[rows, last[has]] + total[has])
    return ShapedRewards(rewards, kl, score, no_eos, length, corr, total)


@dataclass
class AdaptiveKL:
    """Ziegler et al.'s controller: coef ← coef·(1 + clip(KL/target − 1, ±0.2)·n/horizon)."""

    coef: float
    target: float
    horizon: int

    def update(self, kl: float, n_steps: int) -> None:
        err = max(-0.2, min(0.2, kl / self.target - 1.0))
        self.coef *= 1.0 + err * n_steps / self.horizon
