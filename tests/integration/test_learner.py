"""The DeepSpeed learner on its own: a step lowers the loss; a NaN loss skips the step."""
import math

import pytest
import ray
import torch

from rl.algorithms.losses import PolicyLossConfig
from rl.engine.deepspeed_engine import DSEngineConfig
from rl.learner_group import LearnerGroup
from rl.tiny_model import build_char_tokenizer


@pytest.fixture(scope="module")
def learner(ray_session, tiny_model_dir):
    lg = LearnerGroup(DSEngineConfig(tiny_model_dir, lr=3e-3, zero_stage=2,
                                     grad_accum_steps=2, micro_batch_size=2), num_ranks=1)
    yield lg
    lg.shutdown()


def sft_batch():
    tok = build_char_tokenizer()
    texts = ["Add.\n12+34\n2+4=6\n#### 46", "Add.\n50+50\n0+0=0\n#### 100",
             "Add.\n7+8\n7+8=15\n#### 15", "Add.\n11+11\n1+1=2\n#### 22"]
    rows = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = True
    resp = attn.clone()
    resp[:, :6] = False
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


def test_deepspeed_steps_lower_the_loss(learner):
    b = sft_batch()
    losses = [learner.train_minibatch(b, "sft", None, "token_mean")["loss"] for _ in range(6)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5


def test_nan_loss_skips_the_step_and_weights_stay(learner):
    b = sft_batch()
    score_in = {k: b[k] for k in ("input_ids", "attention_mask")}
    before = learner.score(score_in, 1.0)["logprobs"]
    old = before.clone()
    adv = torch.ones_like(before)
    adv[1, 8] = float("nan")  # one poisoned token in the second micro-batch
    batch = {**b, "old_logprobs": old, "advantages": adv, "sampler_logprobs": old}
    m = learner.train_minibatch(batch, "policy", PolicyLossConfig(), "token_mean")
    assert m["skipped"] == 1.0 and math.isnan(m["loss"])
    after = learner.score(score_in, 1.0)["logprobs"]
    assert torch.equal(before, after)
    # and the learner still trains afterwards
    batch["advantages"] = torch.ones_like(before)
    m = learner.train_minibatch(batch, "policy", PolicyLossConfig(), "token_mean")
    assert m["skipped"] == 0.0 and math.isfinite(m["loss"])
    moved = learner.score(score_in, 1.0)["logprobs"]
    resp = b["response_mask"]
    # A positive advantage on every response token raises their log-likelihood.
    assert moved[resp].sum() > after[resp].sum()
    batch["advantages"] = -torch.ones_like(before)
    batch["old_logprobs"] = batch["sampler_logprobs"] = moved
    learner.train_minibatch(batch, "policy", PolicyLossConfig(), "token_mean")
    assert learner.score(score_in, 1.0)["logprobs"][resp].sum() < moved[resp].sum()
