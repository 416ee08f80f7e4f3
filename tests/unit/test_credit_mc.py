"""Monte Carlo credit (`credit=mc`, rl/methods/credit/mc.py) on a policy whose token values are
known (the Bernoulli policy of test_mc_values.py: each continuation token is "1" with
probability P; a response succeeds when it holds a "1"), through the method's own plumbing:
prompts from the batch's rows, responses cut at the response mask, the judge resolved from the
sample's verifier spec and fed decoded text.

Hand-worked values, V(s_j) = 1 if the prefix holds a 1, else 1 − 0.7^(6 − j):
  "000100": A_3 = 1 − V(s_3) = 0.343; every other A_t ≈ 0  → the one selected token is 3
  "000000": A_t = V(s_{t+1}) − V(s_t) = −.050, −.072, −.103, −.147, −.210, −.300 → token 5
  "100":    A_0 = 1 − 0.882 = 0.118, then exactly 0 (every continuation holds the 1) → token 0
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rl.methods.base import Tools
from rl.methods.credit import build
from rl.tasks.base import Sample
from rl.tasks.data import EncodedPrompt, collate_rollouts

P, MAX_NEW = 0.3, 6
ZERO, ONE, PROMPT = 10, 11, [3, 4]


def bernoulli_policy(requests, k, seeds, budgets):
    out = []
    for seed, budget in zip(seeds, budgets):
        rng = np.random.default_rng(seed)
        out.append([np.where(rng.random(budget) < P, ONE, ZERO).tolist() for _ in range(k)])
    return out


def holds_a_one(response: str, answer: str, meta: dict) -> float:
    return float("1" in response)


class DigitTokenizer:
    """ids 10 and 11 are the characters "0" and "1" (the test's two-token vocabulary)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(str(i - ZERO) for i in ids if i in (ZERO, ONE))


def batch_of(responses):
    sample = Sample(uid="u", task=f"{__name__}:holds_a_one", prompt="p", answer="", solution="")
    prompt = EncodedPrompt(sample, list(PROMPT), [0] * len(PROMPT))
    comps = [[SimpleNamespace(token_ids=[ONE if c == "1" else ZERO for c in r],
                              logprobs=[0.0] * len(r), finish_reason="stop")] for r in responses]
    return collate_rollouts([prompt] * len(responses), comps, pad_id=0)


def test_mc_credit_amplifies_the_tokens_that_move_the_success_rate():
    credit = build("mc", {"k": 4000, "stride": 1, "top_q": 1 / 6 - 1e-6, "gamma_amp": 2.0}, seed=1)
    credit.start(Tools(None, DigitTokenizer(), 1.0, None, bernoulli_policy, MAX_NEW))
    batch = batch_of(["000100", "000000", "100"])
    metrics = credit.token_weights(batch, step=0)
    resp = batch.response_mask
    gamma = [batch.token_weights[i][resp[i]].tolist() for i in range(3)]
    assert gamma == [[1, 1, 1, 2, 1, 1], [1, 1, 1, 1, 1, 2], [2, 1, 1]]
    assert batch.token_weights[~resp].eq(1).all()  # prompt and padding untouched
    assert metrics["responses_with_signal"] == 1.0
    assert metrics["continuations"] == 4000 * (6 + 6 + 3)


def test_responses_whose_advantage_is_zero_are_not_continued():
    credit = build("mc", {"k": 4000, "stride": 1, "top_q": 1 / 6 - 1e-6, "gamma_amp": 2.0}, seed=1)
    credit.start(Tools(None, DigitTokenizer(), 1.0, None, bernoulli_policy, MAX_NEW))
    batch = batch_of(["000100", "000000", "100"])
    batch.seq_advantages = torch.tensor([0.0, -0.5, 0.5])
    metrics = credit.token_weights(batch, step=0)
    resp = batch.response_mask
    gamma = [batch.token_weights[i][resp[i]].tolist() for i in range(3)]
    assert gamma == [[1] * 6, [1, 1, 1, 1, 1, 2], [2, 1, 1]]  # rows 1 and 2 as before
    assert metrics["continuations"] == 4000 * (6 + 3) and metrics["responses_continued"] == 2 / 3


def test_a_flat_response_selects_nothing():
    credit = build("mc", {"k": 50, "stride": 2, "top_q": 0.9}, seed=0)
    credit.start(Tools(None, DigitTokenizer(), 1.0, None, bernoulli_policy, MAX_NEW))
    batch = batch_of(["100", "110"])  # every prefix holds a 1 after the first token
    credit.token_weights(batch, step=3)
    # stride 2: values at j = 0, 2, then the whole response; V(s_0) < 1 moves, then flat, and
    # TopQ at q = 0.9 reaches the zeros (threshold 0): only tokens whose value moves count
    assert batch.token_weights[0, 2:5].tolist() == [1.5, 1.5, 1.0]
    assert torch.equal(batch.token_weights[1], batch.token_weights[0])


def test_bad_params_and_a_missing_sampler_are_named():
    with pytest.raises(ValueError, match="credit.params.window"):
        build("mc", {"window": 3})
    with pytest.raises(ValueError, match="k and stride"):
        build("mc", {"k": 0})
    with pytest.raises(RuntimeError, match="rollout engines"):
        build("mc").token_weights(batch_of(["1"]), step=0)
