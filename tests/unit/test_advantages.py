import torch

from rl.algorithms.advantages import compute_advantages


def test_grpo_matches_hand_computation():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5])
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = compute_advantages("grpo", r, g, std_normalize=True)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased, as in GRPO
    expected = (torch.tensor([1.0, 0.0, 0.0, 1.0]) - 0.5) / (std + 1e-6)
    assert torch.allclose(adv[:4], expected, atol=1e-5)
    assert torch.all(adv[4:] == 0)  # identical rewards: no signal


def test_dr_grpo_drops_std_scaling():
    r = torch.tensor([2.0, 0.0, 1.0, 1.0])
    g = torch.tensor([0, 0, 1, 1])
    adv = compute_advantages("grpo", r, g, std_normalize=False)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_rloo_is_leave_one_out():
    r = torch.tensor([3.0, 0.0, 0.0, 5.0])
    g = torch.tensor([7, 7, 7, 9])
    adv = compute_advantages("rloo", r, g, std_normalize=False)
    assert torch.allclose(adv[:3], torch.tensor([3.0, -1.5, -1.5]))
    # a group of one has no baseline from others: r - 0
    assert adv[3] == 5.0


def test_group_ids_need_not_be_contiguous_or_sorted():
    r = torch.tensor([1.0, 5.0, 0.0, 7.0])
    g = torch.tensor([3, 1, 3, 1])
    adv = compute_advantages("grpo", r, g, std_normalize=False)
    assert torch.allclose(adv, torch.tensor([0.5, -1.0, -0.5, 1.0]))
