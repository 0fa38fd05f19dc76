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
                  reward_clip: float = 0.0, reward_scale: float = 1.0) -> ShapedRewards:
    """Fact-RLHF reward shaping, as RLHF/models/ppo_trainer.py:112-147 and 526-545 (post_reward):
    sequence term at the last response token = RM score + no-EOS penalty (if the sequence did not
    stop) + length_penalty · len / max_len · length_bonus + correct_bonus · correct; every token
    gets −kl_coef · KL(π_old ‖ π_ref) with the chosen estimator; all × ``reward_scale`` (the
    original's ×10 before GAE when rewards are not whitened, ppo_trainer.py:159-164).

    score/stopped/lengths/length_bonus ``[B]``; correct ``[B]`` float (the ``correctness`` term:
    e.g. 1 right, −0.5 a wrong "Yes", 0 unknown) or None; logprobs/mask ``[B, R]``. The logged
    sequence-level parts are unscaled; departure: the score lands on the last *real* token, where
    the original adds it to the last column, padding or not (its comment: an off-by-one workaround).
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
    return ShapedRewards(rewards * reward_scale, kl, score, no_eos, length, corr, total)


def gae_reward_scale(ppo) -> float:
    """The factor on shaped rewards before GAE: ``ppo.reward_scale`` (the recipe's 10), but 1 when
    rewards are whitened — as RLHF/models/ppo_trainer.py:159-164 scales only unwhitened rewards."""
    return 1.0 if ppo.reward_whiten else ppo.reward_scale


def symbolic_reward(text: str, caption_type: int) -> float:
    """The original's correctness ("symbolic") reward before × correct_bonus, as
    RLHF/models/ppo_trainer.py:277-303: caption_type 2-5 (answer A-D) +1 when the response starts
    with "X." or says "correct option is X."; 6 (answer "No") +0.5 for a response starting "No",
    −0.5 for one starting "Yes"; 7 (answer "Yes") and 1 (general) 0 — "we do not give symbolic
    reward for 'Yes'", which leaves the push against the yes-bias POPE measures."""
    r = text.strip()
    if caption_type in (2, 3, 4, 5):
        letter = "ABCD"[caption_type - 2] + "."
        return 1.0 if r.startswith(letter) or f"correct option is {letter}" in text else 0.0
    if caption_type == 6:
        return 0.5 if r.startswith("No") else -0.5 if r.startswith("Yes") else 0.0
    if caption_type in (1, 7):
        return 0.0
    raise ValueError(f"caption_type must be 1..7, got {caption_type!r}")


def correctness(texts: list[str], caption_types: list[int], rule: str) -> torch.Tensor:
    """``[B]`` correctness term per response (× correct_bonus in shaping). ``original``: the
    recipe's ``symbolic_reward``; ``factrl``: 1 for any right answer, "Yes" included, with the
    broader A-D parse ("(B)", "the answer is B") of ``data.is_correct``, else 0."""
    if rule == "original":
        return torch.tensor([symbolic_reward(t, c) for t, c in zip(texts, caption_types)])
    if rule == "factrl":
        from factrl.trainers.data import is_correct

        return torch.tensor([float(is_correct(t, c) is True) for t, c in zip(texts, caption_types)])
    raise ValueError(f"ppo.correct_rule={rule!r}: expected 'original' or 'factrl'")


def cut_after(tokens: torch.Tensor, lengths: torch.Tensor, stopped: torch.Tensor, cut_ids: torch.Tensor,
              pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each response ``[B, R]`` after its first token in ``cut_ids`` (the recipe's "?" cut,
    RLHF/models/rl_trainer.py:528-556 via ppo_trainer.py:250-260): what follows becomes padding,
    the length shrinks, and a cut response no longer ends with EOS, so it pays the no-EOS
    penalty (post_reward, ppo_trainer.py:575-583). Returns (tokens, lengths, stopped)."""
    pos = torch.arange(tokens.shape[1], device=tokens.device)[None]
    hit = torch.isin(tokens, cut_ids.to(tokens.device)) & (pos < lengths[:, None])
    has = hit.any(1)
    new_len = torch.where(has, hit.long().argmax(1) + 1, lengths)  # argmax: the first hit
    return tokens.masked_fill(pos >= new_len[:, None], pad_id), new_len, stopped & ~has


@dataclass
class AdaptiveKL:
    """Ziegler et al.'s controller: coef ← coef·(1 + clip(KL/target − 1, ±0.2)·n/horizon)."""

    coef: float
    target: float
    horizon: int

    def update(self, kl: float, n_steps: int) -> None:
        err = max(-0.2, min(0.2, kl / self.target - 1.0))
        self.coef *= 1.0 + err * n_steps / self.horizon
