"""Overlong handling (DAPO §3.4) on a hand-built 4-row batch, against hand-worked values."""
from __future__ import annotations

import re

import pytest
import torch

from rl.algorithms.advantages import compute_advantages
from rl.algorithms.overlong import OverlongConfig, apply_to_mask, apply_to_rewards, length_penalty
from rl.batch import RolloutBatch

MAX_NEW = 10
PROMPT = 2


def _batch(lengths=(5, 10, 8, 10), reasons=("stop", "length", "stop", "length"),
           rewards=(1.0, 0.0, 1.0, 0.0), groups=(0, 0, 1, 1)) -> RolloutBatch:
    """Rows of a 2-token prompt ⊕ response, right-padded to 2 + max_new_tokens."""
    B, T = len(lengths), PROMPT + MAX_NEW
    g = torch.Generator().manual_seed(0)
    resp = torch.zeros(B, T, dtype=torch.bool)
    attn = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        resp[b, PROMPT:PROMPT + n] = True
        attn[b, :PROMPT + n] = True
    return RolloutBatch(
        input_ids=torch.randint(0, 50, (B, T), generator=g) * attn,
        attention_mask=attn,
        response_mask=resp,
        sampler_logprobs=-torch.rand(B, T, generator=g) * resp,
        token_classes=torch.zeros(B, T, dtype=torch.int8),
        group_ids=torch.tensor(groups),
        rewards=torch.tensor(rewards),
        token_weights=torch.ones(B, T),
        meta=[{"finish_reason": r} for r in reasons],
    )


def _snapshot(batch: RolloutBatch) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in batch.tensor_fields().items()}


# --- R_length (eq. 13) --------------------------------------------------------------------------

def test_length_penalty_below_inside_and_at_the_edge_of_the_buffer():
    # L_max = 10, L_cache = 4: free up to 6, then (6 - |y|) / 4, -1 at 10 and beyond.
    lengths = torch.tensor([0, 5, 6, 7, 8, 9, 10, 11])
    r = length_penalty(lengths, MAX_NEW, 4)
    assert r.tolist() == [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0]
    assert r.dtype == torch.float32


def test_length_penalty_non_dyadic_buffer():
    # L_cache = 3: free up to 7; 8 → -1/3, 9 → -2/3, 10 → -1.
    r = length_penalty(torch.tensor([7, 8, 9, 10]), MAX_NEW, 3)
    assert torch.allclose(r, torch.tensor([0.0, -1 / 3, -2 / 3, -1.0]))


def test_length_penalty_buffer_of_one_only_hits_the_limit():
    r = length_penalty(torch.tensor([8, 9, 10]), MAX_NEW, 1)
    assert r.tolist() == [0.0, 0.0, -1.0]


# --- penalty mode -------------------------------------------------------------------------------

def test_penalty_adds_scaled_r_length_to_every_row_by_length():
    batch = _batch()  # lengths 5, 10, 8, 10; R_length (buffer 4) = 0, -1, -0.5, -1
    before = _snapshot(batch)
    m = apply_to_rewards(batch, OverlongConfig(mode="penalty", buffer=4, penalty=0.5), MAX_NEW)
    # 1 + 0, 0 - 0.5, 1 - 0.25 (row 2 stopped on its own but still inside the buffer), 0 - 0.5
    assert batch.rewards.tolist() == [1.0, -0.5, 0.75, -0.5]
    assert m == {"overlong/penalty_mean": -0.3125, "overlong/penalized": 0.75}
    for k, v in before.items():
        if k != "rewards":
            assert torch.equal(getattr(batch, k), v), k
    assert before["rewards"].tolist() == [1.0, 0.0, 1.0, 0.0]  # a new tensor, not written in place


def test_penalty_default_coefficient_reaches_minus_one_at_the_limit():
    batch = _batch(rewards=(0.0, 0.0, 0.0, 0.0))
    apply_to_rewards(batch, OverlongConfig(mode="penalty", buffer=4), MAX_NEW)
    assert batch.rewards.tolist() == [0.0, -1.0, -0.5, -1.0]


def test_penalty_shapes_rewards_before_the_group_baseline():
    batch = _batch()
    apply_to_rewards(batch, OverlongConfig(mode="penalty", buffer=4, penalty=0.5), MAX_NEW)
    adv = compute_advantages("grpo", batch.rewards, batch.group_ids, std_normalize=False)
    # group 0: [1, -0.5] mean 0.25 → [0.75, -0.75]; group 1: [0.75, -0.5] mean 0.125 → ±0.625
    assert torch.allclose(adv, torch.tensor([0.75, -0.75, 0.625, -0.625]))


def test_penalty_mode_leaves_the_mask_alone():
    batch = _batch()
    before = _snapshot(batch)
    assert apply_to_mask(batch, OverlongConfig(mode="penalty", buffer=4)) == {}
    assert torch.equal(batch.response_mask, before["response_mask"])


# --- filter mode --------------------------------------------------------------------------------

def test_filter_zeroes_exactly_the_truncated_rows():
    batch = _batch()
    before = _snapshot(batch)
    adv = compute_advantages("grpo", batch.rewards, batch.group_ids, std_normalize=False)
    batch.seq_advantages = adv
    batch.advantages = adv[:, None] * batch.token_weights * batch.response_mask
    m = apply_to_mask(batch, OverlongConfig(mode="filter"))
    assert m == {"overlong/masked": 2.0, "overlong/truncated": 0.5}
    assert batch.response_lengths().tolist() == [5, 0, 8, 0]
    for b in (0, 2):  # untouched rows: bit-identical
        assert torch.equal(batch.response_mask[b], before["response_mask"][b])
    assert not batch.response_mask[[1, 3]].any()
    # Rewards [1, 0 | 1, 0], Dr.GRPO: the truncated rows stayed in the baselines (a group of
    # one would give 0), so the kept rows train with +0.5 on each of their tokens.
    assert batch.advantages.sum(-1).tolist() == [2.5, 0.0, 4.0, 0.0]
    assert batch.seq_advantages.tolist() == [0.5, -0.5, 0.5, -0.5]
    assert torch.equal(batch.rewards, before["rewards"])
    assert torch.equal(batch.attention_mask, before["attention_mask"])


def test_filter_follows_finish_reason_not_length():
    # Row 0 filled the budget but stopped on EOS (its last token): not truncated, kept.
    batch = _batch(lengths=(10, 10, 3, 7), reasons=("stop", "length", "stop", "stop"))
    m = apply_to_mask(batch, OverlongConfig(mode="filter"))
    assert batch.response_lengths().tolist() == [10, 0, 3, 7]
    assert m == {"overlong/masked": 1.0, "overlong/truncated": 0.25}


def test_filter_without_truncations_changes_nothing():
    batch = _batch(reasons=("stop",) * 4)
    before = _snapshot(batch)
    assert apply_to_mask(batch, OverlongConfig(mode="filter"))["overlong/masked"] == 0.0
    assert torch.equal(batch.response_mask, before["response_mask"])


def test_filter_mode_leaves_rewards_alone():
    batch = _batch()
    assert apply_to_rewards(batch, OverlongConfig(mode="filter"), MAX_NEW) == {}
    assert batch.rewards.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_filter_needs_finish_reasons():
    batch = _batch()
    batch.meta = []
    with pytest.raises(ValueError, match="finish_reason"):
        apply_to_mask(batch, OverlongConfig(mode="filter"))


# --- keep and validation ------------------------------------------------------------------------

def test_keep_is_a_no_op():
    batch = _batch()
    before = _snapshot(batch)
    cfg = OverlongConfig()
    assert cfg.mode == "keep"
    assert apply_to_rewards(batch, cfg, MAX_NEW) == {}
    assert apply_to_mask(batch, cfg) == {}
    for k, v in before.items():
        assert torch.equal(getattr(batch, k), v), k


@pytest.mark.parametrize("buffer", [0, -1, MAX_NEW, MAX_NEW + 1])
def test_penalty_buffer_out_of_range_raises(buffer):
    with pytest.raises(ValueError, match=r"overlong_buffer=.*\[1, rollout.max_new_tokens=10\)"):
        apply_to_rewards(_batch(), OverlongConfig(mode="penalty", buffer=buffer), MAX_NEW)


@pytest.mark.parametrize("penalty", [0.0, -1.0, float("nan")])
def test_penalty_coefficient_must_be_positive(penalty):
    with pytest.raises(ValueError, match="penalty="):
        apply_to_rewards(_batch(), OverlongConfig(mode="penalty", buffer=4, penalty=penalty),
                         MAX_NEW)


def test_buffer_is_not_checked_outside_penalty_mode():
    batch = _batch()
    assert apply_to_rewards(batch, OverlongConfig(mode="filter", buffer=0), MAX_NEW) == {}


@pytest.mark.parametrize("fn", ["rewards", "mask"])
def test_unknown_mode_names_the_allowed_values(fn):
    cfg = OverlongConfig(mode="truncate")
    with pytest.raises(ValueError, match=re.escape("known: keep | filter | penalty")):
        if fn == "rewards":
            apply_to_rewards(_batch(), cfg, MAX_NEW)
        else:
            apply_to_mask(_batch(), cfg)
