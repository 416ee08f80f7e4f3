import math

import pytest
import torch

from rl.algorithms.losses import PolicyLossConfig, aggregate, kl_penalty, policy_loss, sampler_correction


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


def test_sampler_correction_truncates_or_masks_by_hand():
    """ρ = π_old / π_sampler per token, c = 2. Hand-worked: log ρ = ln 3, ln 1.5, ln 0.25, ln 0.6
    → ρ = 3, 1.5, 0.25, 0.6. truncate: min(ρ, 2) = 2, 1.5, 0.25, 0.6. mask: 1 where ½ ≤ ρ ≤ 2
    → 0, 1, 0, 1."""
    sampler = torch.tensor([[-2.0, -1.0, -0.5, -3.0]])
    old = sampler + torch.log(torch.tensor([[3.0, 1.5, 0.25, 0.6]]))
    assert torch.allclose(sampler_correction(old, sampler, 2.0, "truncate"),
                          torch.tensor([[2.0, 1.5, 0.25, 0.6]]), atol=1e-6)
    assert torch.equal(sampler_correction(old, sampler, 2.0, "mask"),
                       torch.tensor([[0.0, 1.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="tis_mode"):
        sampler_correction(old, sampler, 2.0, "clip")


@pytest.mark.parametrize("mode,weights", [("truncate", [2.0, 1.5, 0.25, 0.6]),
                                          ("mask", [0.0, 1.0, 0.0, 1.0])])
def test_policy_loss_applies_the_sampler_correction_by_hand(mode, weights):
    """On-policy learner (logprobs = old, ratio 1, no clipping): per-token loss −A·w, summed
    over the 4 response tokens (the pad's weight does not count) and divided by the normaliser
    4. A = 1, −2, 0.5, 1 → loss = −(1·w0 − 2·w1 + 0.5·w2 + 1·w3)/4."""
    sampler = torch.tensor([[-2.0, -1.0, -0.5, -3.0, -1.0]])
    old = sampler + torch.log(torch.tensor([[3.0, 1.5, 0.25, 0.6, 9.0]]))
    adv = torch.tensor([[1.0, -2.0, 0.5, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    cfg = PolicyLossConfig(tis_cap=2.0, tis_mode=mode)
    logprobs = old.clone().requires_grad_(True)
    loss, m = policy_loss(logprobs, old, adv, mask, cfg, normaliser=4.0,
                          sampler_logprobs=sampler)
    w = weights
    want = -(1 * w[0] - 2 * w[1] + 0.5 * w[2] + 1 * w[3]) / 4
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert m["is_weight_mean"] == pytest.approx(sum(w) / 4, rel=1e-6)
    # truncate changed token 0 (ρ = 3 > 2); mask dropped tokens 0 and 2
    assert m["is_corrected_frac"] == pytest.approx(0.25 if mode == "truncate" else 0.5)
    # the weight is a constant: d loss / d logprob_t = −A_t·w_t/4 (ratio 1)
    loss.backward()
    want_grad = [-a * wt / 4 for a, wt in zip([1.0, -2.0, 0.5, 1.0], w)] + [0.0]
    assert torch.allclose(logprobs.grad, torch.tensor([want_grad]), atol=1e-6)
