"""Monte Carlo token values (rl/algorithms/mc_values.py) against a policy whose values are known:
each continuation token is 1 with probability p, independently, and a response succeeds when it
holds a 1 — so V(s_j) = 1 if the prefix holds a 1, else 1 − (1 − p)^(tokens left)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from rl.algorithms.mc_values import mc_token_values, prefix_points

P, MAX_NEW = 0.3, 6


def bernoulli_policy(requests, k, seeds, budgets):
    """K continuations of `budget` i.i.d. Bernoulli(P) tokens per request, from its seed."""
    out = []
    for seed, budget in zip(seeds, budgets):
        rng = np.random.default_rng(seed)
        out.append([(rng.random(budget) < P).astype(int).tolist() for _ in range(k)])
    return out


def holds_a_one(_i, response) -> float:
    return float(1 in response)


def exact_value(prefix: list[int]) -> float:
    return 1.0 if 1 in prefix else 1.0 - (1.0 - P) ** (MAX_NEW - len(prefix))


RESPONSES = [[0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0]]


def test_values_match_the_known_policy_within_their_binomial_interval():
    k = 4000
    got = mc_token_values(bernoulli_policy, holds_a_one, [[7]] * 3, RESPONSES, k, MAX_NEW, seed=1)
    for r, tv in zip(RESPONSES, got):
        assert tv.points == list(range(len(r) + 1))
        for j, v, n in zip(tv.points, tv.values, tv.trials):
            want = exact_value(r[:j])
            half = 4 * math.sqrt(want * (1 - want) / n) + 1e-12  # ~4 standard errors
            assert abs(v - want) <= half, (r, j, v, want)
        assert tv.values[-1] == holds_a_one(0, r) and tv.trials[-1] == 1
    # the token that decides the outcome carries the advantage: A_3 = 1 − V(s_3)
    adv = got[0].advantages()
    assert len(adv) == 6 and adv[3] == pytest.approx(1 - got[0].values[3])
    assert adv[3] > 0.2 and all(abs(a) < 0.1 for t, a in enumerate(adv) if t != 3)


def test_seeded_runs_repeat_exactly_and_other_seeds_differ():
    a = mc_token_values(bernoulli_policy, holds_a_one, [[7]] * 3, RESPONSES, 50, MAX_NEW, seed=3)
    b = mc_token_values(bernoulli_policy, holds_a_one, [[7]] * 3, RESPONSES, 50, MAX_NEW, seed=3)
    c = mc_token_values(bernoulli_policy, holds_a_one, [[7]] * 3, RESPONSES, 50, MAX_NEW, seed=4)
    assert [t.values for t in a] == [t.values for t in b]
    assert [t.values for t in a] != [t.values for t in c]


def test_stride_gives_block_values_and_budgets_are_the_room_left():
    seen = []

    def recording(requests, k, seeds, budgets):
        seen.extend(zip(requests, budgets))
        return bernoulli_policy(requests, k, seeds, budgets)

    (tv,) = mc_token_values(recording, holds_a_one, [[7, 8]], [RESPONSES[0]], 10, MAX_NEW, stride=4)
    assert prefix_points(6, 4) == tv.points == [0, 4, 6]
    assert seen == [([7, 8], 6), ([7, 8, 0, 0, 0, 1], 2)]
    adv = tv.advantages()
    assert adv == [tv.values[1] - tv.values[0]] * 4 + [tv.values[2] - tv.values[1]] * 2
    with pytest.raises(ValueError, match="longer than max_new_tokens"):
        mc_token_values(bernoulli_policy, holds_a_one, [[7]], [[0] * 7], 10, MAX_NEW)
