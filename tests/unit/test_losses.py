import math

import pytest
import torch

from rl.algorithms.losses import PolicyLossConfig, aggregate, kl_penalty, policy_loss


def test_ppo_clip_uses_separate_low_and_high_bounds():
    cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.28)
    old = torch.zeros(1, 4)
    lp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))  # ratios
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, m = policy_loss(lp, old, adv, mask, cfg, normaliser=4.0)
    # per token: -min(r A, clip(r) A)
    expected = [-(1.28 * 1.0), -(1.5 * -1.0), -(0.5 * 1.0), -(0.8 * -1.0)]
    assert loss.item() == pytest.approx(sum(expected) / 4, rel=1e-5)
    assert m["clip_frac"] == pytest.approx(0.5)  # tokens 0 and 3 are clipped


def test_gradient_vanishes_outside_the_trust_region():
    cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.2)
    lp = torch.tensor([[math.log(2.0)]], requires_grad=True)
    loss, _ = policy_loss(lp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), cfg, 1.0)
    loss.backward()
    assert lp.grad.item() == 0.0


def test_token_vs_sequence_mean():
    v = torch.tensor([[1.0, 1.0, 1.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert aggregate(v, mask, "token_mean", 4.0).item() == pytest.approx(7 / 4)
    assert aggregate(v, mask, "seq_mean", 2.0).item() == pytest.approx((1 + 4) / 2)


def test_kl_estimators():
    lp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    assert torch.allclose(kl_penalty(lp, ref, "k1"), lp - ref)
    k3 = kl_penalty(lp, ref, "k3")
    assert torch.all(k3 >= 0)
    assert torch.allclose(k3, torch.exp(ref - lp) - (ref - lp) - 1)


def test_masked_tokens_do_not_contribute():
    cfg = PolicyLossConfig()
    lp = torch.randn(2, 5, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    loss, _ = policy_loss(lp, lp.detach(), torch.randn(2, 5), mask, cfg, 5.0)
    loss.backward()
    assert torch.all(lp.grad[~mask] == 0)
    assert torch.all(lp.grad[mask] != 0)
