"""PPO: hand-worked maths, roles on one base, and a short run whose reward must rise."""

import math

import pytest
import torch

from factrl.trainers.rl import AdaptiveKL, policy_loss, shape_rewards, value_loss


# ---- hand-worked maths --------------------------------------------------------------------------
def test_policy_loss_clips_above_with_positive_advantage():
    # ratio = e^0.5 = 1.6487 > 1.2, A = +2: unclipped −3.2974, clipped −2·1.2 = −2.4; max → −2.4
    lp, old = torch.tensor([[0.5]]), torch.tensor([[0.0]])
    loss, clipfrac, akl = policy_loss(lp, old, torch.tensor([[2.0]]), torch.ones(1, 1), clip=0.2)
    assert loss.item() == pytest.approx(-2.4)
    assert clipfrac.item() == 1.0 and akl.item() == pytest.approx(0.125)


def test_policy_loss_clips_below_with_negative_advantage():
    # ratio = e^−0.5 = 0.6065 < 0.8, A = −1: unclipped 0.6065, clipped 0.8; max → 0.8 (no gain
    # from pushing the ratio further down)
    loss, clipfrac, _ = policy_loss(torch.tensor([[-0.5]]), torch.tensor([[0.0]]), torch.tensor([[-1.0]]),
                                    torch.ones(1, 1), clip=0.2)
    assert loss.item() == pytest.approx(0.8)
    assert clipfrac.item() == 1.0


def test_policy_loss_inside_the_trust_region_is_unclipped_and_has_the_right_gradient():
    lp = torch.tensor([[0.1]], requires_grad=True)
    loss, clipfrac, _ = policy_loss(lp, torch.tensor([[0.0]]), torch.tensor([[3.0]]), torch.ones(1, 1), clip=0.2)
    assert loss.item() == pytest.approx(-3.0 * math.exp(0.1))
    loss.backward()
    assert lp.grad.item() == pytest.approx(-3.0 * math.exp(0.1))  # d(−A·e^lp)/dlp
    assert clipfrac.item() == 0.0


def test_policy_loss_masks_padding_left_and_right():
    # Row 0 right-padded, row 1 left-padded; padding holds huge values that must not count.
    lp = torch.tensor([[0.0, 0.0, 9.0], [9.0, 0.0, 0.0]])
    old = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 3.0, 1e6], [1e6, -1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    loss, _, _ = policy_loss(lp, old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx(-(1 + 3 - 1 + 1) / 4)  # ratio 1 on valid tokens


def test_value_loss_clipping():
    # old 0, new 1, return 2, clip 0.2: unclipped (1−2)² = 1, clipped (0.2−2)² = 3.24 → ½·3.24
    loss, frac = value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(1.62) and frac.item() == 1.0
    # new 0.1 within the clip range: both terms equal (0.1−2)² → ½·3.61
    loss, frac = value_loss(torch.tensor([[0.1]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(1.805) and frac.item() == 0.0
    # masked entries never count
    loss, _ = value_loss(torch.tensor([[0.1, 50.0]]), torch.zeros(1, 2), torch.tensor([[2.0, -50.0]]),
                         torch.tensor([[1, 0]]), 0.2)
    assert loss.item() == pytest.approx(1.805)


def test_reward_shaping_terms():
    # Two sequences, R = 3. Row 0: length 2, stopped, correct, length_bonus 1.
    # Row 1: length 3, no EOS, wrong, length_bonus 0.5.
    old = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, -2.0, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    sh = shape_rewards(torch.tensor([1.0, 2.0]), old, ref, mask, torch.tensor([True, False]), torch.tensor([2, 3]),
                       torch.tensor([1.0, 0.5]), torch.tensor([1.0, 0.0]), kl_coef=0.1, kl_estimator="k1_clamp",
                       no_eos_penalty=-8.0, length_penalty=-10.0, max_response_len=4, correct_bonus=2.0)
    # k1_clamp = max(old − ref, 0): row 0 [0.5, 0, ·], row 1 [0, 1, 0]
    torch.testing.assert_close(sh.kl, torch.tensor([[0.5, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    # sequence terms: row 0: 1 + 0 + (−10·2/4·1 = −5) + 2 = −2; row 1: 2 − 8 + (−10·3/4·0.5 = −3.75) + 0 = −9.75
    torch.testing.assert_close(sh.no_eos, torch.tensor([0.0, -8.0]))
    torch.testing.assert_close(sh.length, torch.tensor([-5.0, -3.75]))
    torch.testing.assert_close(sh.correct, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(sh.total, torch.tensor([-2.0, -9.75]))
    # per token: −0.1·KL everywhere, the total added at the last response token only
    torch.testing.assert_close(sh.rewards, torch.tensor([[-0.05, -2.0, 0.0], [0.0, -0.1, -9.75]]))


def test_adaptive_kl_moves_towards_target():
    c = AdaptiveKL(0.1, target=1.0, horizon=100)
    c.update(10.0, 10)  # error clipped at +0.2 → ×1.02
    assert c.coef == pytest.approx(0.102)
    c.update(0.5, 10)  # error −0.5 → clipped −0.2 → ×0.98
    assert c.coef == pytest.approx(0.102 * 0.98)
