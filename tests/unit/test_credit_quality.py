"""The pure parts of the credit-quality benchmark (benchmarks/credit_quality.py): AUROC against
pairwise counting, Spearman against the textbook formula, the positives, the bootstrap, the
one-token shift and the intervention's picks and resampling."""
from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from credit_quality import (auroc, average_ranks, bootstrap, other_token, shift_one,  # noqa: E402
                            spearman, stratified_auroc, top_decile, top_token, word_jaccard)


def pairwise_auroc(score, positive):
    pos, neg = score[positive], score[~positive]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pairwise_counting_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        score = rng.integers(0, 5, 30).astype(float)  # many ties
        positive = rng.random(30) < 0.3
        if positive.any() and (~positive).any():
            assert auroc(score, positive) == pytest.approx(pairwise_auroc(score, positive))
    assert auroc(np.array([1.0, 2, 3, 4]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([1.0, 2, 3, 4]), np.array([1, 1, 0, 0])) == 0.0
    assert math.isnan(auroc(np.array([1.0, 2]), np.array([1, 1])))


def test_spearman_hand_worked_and_ties():
    # no ties: 1 − 6 Σd² / (n (n² − 1)), d = [−1, 1, −1, 1, 0] → 1 − 24 / 120
    assert spearman(np.array([1.0, 2, 3, 4, 5]), np.array([2.0, 1, 4, 3, 5])) == pytest.approx(0.8)
    assert spearman(np.arange(6.0), -np.arange(6.0) ** 3) == pytest.approx(-1.0)
    assert average_ranks(np.array([3.0, 1, 3, 2])).tolist() == [3.5, 1, 3.5, 2]
    assert math.isnan(spearman(np.arange(4.0), np.ones(4)))


def test_top_decile_keeps_ties_and_needs_a_nonzero_value():
    mag = np.array([0.0] * 15 + [0.1, 0.2, 0.2, 0.05, 0.0])  # n = 20 → the 2nd largest = 0.2
    assert np.flatnonzero(top_decile(mag)).tolist() == [16, 17]
    assert not top_decile(np.zeros(30)).any()  # a flat response set has no positives
    assert np.flatnonzero(top_decile(np.array([0.0] * 9 + [0.3]))).tolist() == [9]


def test_bootstrap_repeats_and_brackets_the_statistic():
    groups = [np.array([0, 1]), np.array([2]), np.array([3, 4, 5])]
    x = np.array([1.0, 2, 3, 4, 5, 6])
    a = bootstrap(lambda idx: float(x[idx].mean()), groups, 200, seed=3)
    assert a == bootstrap(lambda idx: float(x[idx].mean()), groups, 200, seed=3)
    assert a[0] == 3.5 and a[1] < 3.5 < a[2]
    assert bootstrap(lambda idx: 2.0, groups, 50, 0) == (2.0, 2.0, 2.0)


def test_shift_reads_the_previous_row():
    x = torch.tensor([[1.0, 2, 3], [4, 5, 6]])
    assert shift_one(x).tolist() == [[0, 1, 2], [0, 4, 5]]


def test_stratified_auroc_counts_only_pairs_inside_a_stratum():
    rng = np.random.default_rng(1)
    score = rng.integers(0, 4, 40).astype(float)
    positive = rng.random(40) < 0.3
    strata = rng.integers(0, 3, 40)
    wins = pairs = 0.0
    for a, b in itertools.product(range(40), range(40)):
        if positive[a] and not positive[b] and strata[a] == strata[b]:
            wins += (score[a] > score[b]) + 0.5 * (score[a] == score[b])
            pairs += 1
    assert stratified_auroc(score, positive, strata) == pytest.approx(wins / pairs)
    # a signal that only knows the block a token sits in: informative pooled, not within blocks
    block = np.repeat([0.0, 1.0], 4)
    label = np.array([0, 0, 0, 1, 1, 1, 1, 0], dtype=bool)
    assert auroc(block, label) == 0.75  # 9 wins + 6 ties of 16 pairs
    assert stratified_auroc(block, label, block.astype(int)) == 0.5


def test_top_token_is_the_row_maximum_over_the_response():
    score = torch.tensor([[9.0, 1, 5, 3], [0, 2, 2, 1]])
    resp = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    assert top_token(score, resp, gen)[0] == 2  # the prompt's 9 does not count
    seen = {top_token(score, resp, gen)[1] for _ in range(40)}
    assert seen == {1, 2}  # a tie is broken at random


def test_other_token_never_returns_the_original():
    logp = torch.log(torch.tensor([0.7, 0.2, 0.1, 0.0]) + 1e-30)
    gen = torch.Generator().manual_seed(0)
    draws = {other_token(logp, 0, gen) for _ in range(50)}
    assert draws == {1, 2}
    assert other_token(torch.log(torch.tensor([1.0, 0.0]) + 1e-30), 0, gen) in (0, 1)


def test_word_jaccard():
    assert word_jaccard("7+5=12\n4+8+1=13", "7+5=12\n4+8=12") == pytest.approx(1 / 3)
    assert word_jaccard("", "") == 1.0 and word_jaccard("a", "") == 0.0
