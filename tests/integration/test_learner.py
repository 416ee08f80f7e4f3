"""The DeepSpeed learner on its own: a step lowers the loss; a NaN loss skips the step."""
import math

import pytest
import ray
import torch

from rl.algorithms.losses import PolicyLossConfig
from rl.engine.deepspeed_engine import DSEngineConfig
from rl.cluster.learner_group import LearnerGroup
from rl.models.tiny_model import build_char_tokenizer
from rl.algorithms.losses import PolicyLoss
from rl.algorithms.losses import SftLoss


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


def test_a_rank_packs_rows_and_scores_like_the_stock_padded_forward(learner, tiny_model_dir):
    """learner.padding_free (the default): the rank's start-up check passed, so it packs; its
    logprobs and entropy of a batch whose groups share prefixes equal transformers' own padded
    forward of the same (still initial) weights."""
    from rl.engine.deepspeed_engine import token_logprobs
    from rl.engine.frozen import load_model, logits_of

    assert learner._all("__getattribute__", "padding_free") == [True]
    b = sft_batch()
    b["group_ids"] = torch.tensor([0, 0, 1, 1])  # rows share "Add.\n" (and more within a group)
    out = learner.score(b, 0.9)
    stock = load_model(tiny_model_dir, "float32")
    with torch.no_grad():
        lp, ent = token_logprobs(logits_of(stock, b), b["input_ids"], 0.9)
    m = b["attention_mask"]
    assert (out["logprobs"] - lp)[m].abs().max() < 1e-5
    assert (out["entropy"] - ent)[m].abs().max() < 1e-5


def test_deepspeed_steps_lower_the_loss(learner):
    b = sft_batch()
    losses = [learner.train_minibatch(b, SftLoss())["loss"] for _ in range(6)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5


def policy_batch(b, logprobs, poisoned_row=None):
    """A policy-loss minibatch at the current weights (ratio 1), advantage +1 on every token;
    with `poisoned_row`, one response token of that row gets a NaN advantage."""
    adv = torch.ones_like(logprobs)
    if poisoned_row is not None:
        assert b["response_mask"][poisoned_row, 8]
        adv[poisoned_row, 8] = float("nan")
    return {**b, "old_logprobs": logprobs.clone(), "advantages": adv, "sampler_logprobs": logprobs.clone()}


# One rank, grad_accum_steps=2 over 4 rows: LearnerGroup.train_minibatch gives micro-batch 0 =
# rows 0-1 and micro-batch 1 = rows 2-3 (np.array_split). Row 1 poisons the first micro-batch
# (nothing was backwarded yet); row 3 the second, after micro-batch 0's gradient is already
# accumulated — the skip must drop that gradient too.
@pytest.mark.parametrize("poisoned_row", [1, 3], ids=["first_micro_batch", "later_micro_batch"])
def test_nan_loss_skips_the_step_and_weights_stay(learner, poisoned_row):
    b = sft_batch()
    score_in = {k: b[k] for k in ("input_ids", "attention_mask")}
    before = learner.score(score_in, 1.0)["logprobs"]
    digest = learner.optimizer_state_digest()
    assert digest > 0  # earlier tests stepped: Adam has moments a bad skip would change
    batch = policy_batch(b, before, poisoned_row)
    m = learner.train_minibatch(batch, PolicyLoss(PolicyLossConfig()))
    assert m == {"skipped": 1.0, "loss": pytest.approx(float("nan"), nan_ok=True)}
    after = learner.score(score_in, 1.0)["logprobs"]
    assert torch.equal(before, after)
    # the skipped minibatch leaves no trace in the optimizer either (moments, step count)
    assert learner.optimizer_state_digest() == digest
    # and the learner still trains afterwards
    batch["advantages"] = torch.ones_like(before)
    m = learner.train_minibatch(batch, PolicyLoss(PolicyLossConfig()))
    assert m["skipped"] == 0.0 and math.isfinite(m["loss"])
    moved = learner.score(score_in, 1.0)["logprobs"]
    resp = b["response_mask"]
    # A positive advantage on every response token raises their log-likelihood.
    assert moved[resp].sum() > after[resp].sum()
    batch["advantages"] = -torch.ones_like(before)
    batch["old_logprobs"] = batch["sampler_logprobs"] = moved
    learner.train_minibatch(batch, PolicyLoss(PolicyLossConfig()))
    assert learner.score(score_in, 1.0)["logprobs"][resp].sum() < moved[resp].sum()


def test_a_skipped_minibatch_leaves_no_trace(learner, tmp_path):
    """Skip (NaN in the later micro-batch, after micro-batch 0 was backwarded), then a clean
    step: exactly the weights of the clean step alone from the same checkpoint — nothing of
    the skipped minibatch (its partial gradient, a moment decay, a step count) survives."""
    b = sft_batch()
    score_in = {k: b[k] for k in ("input_ids", "attention_mask")}
    start = learner.score(score_in, 1.0)["logprobs"]
    clean = policy_batch(b, start)
    learner.save(str(tmp_path / "ckpt"))
    assert learner.train_minibatch(clean, PolicyLoss(PolicyLossConfig()))["skipped"] == 0.0
    want = learner.score(score_in, 1.0)["logprobs"]
    assert not torch.equal(want, start)
    learner.load(str(tmp_path / "ckpt"))
    assert torch.equal(learner.score(score_in, 1.0)["logprobs"], start)
    m = learner.train_minibatch(policy_batch(b, start, poisoned_row=3), PolicyLoss(PolicyLossConfig()))
    assert m["skipped"] == 1.0
    assert learner.train_minibatch(clean, PolicyLoss(PolicyLossConfig()))["skipped"] == 0.0
    assert torch.equal(learner.score(score_in, 1.0)["logprobs"], want)


@pytest.fixture(scope="module")
def learner2(ray_session, tiny_model_dir):
    """Two ranks × grad_accum_steps=2 over 4 rows: rank 0 trains rows 0 | 1, rank 1 rows 2 | 3."""
    lg = LearnerGroup(DSEngineConfig(tiny_model_dir, lr=3e-3, zero_stage=2,
                                     grad_accum_steps=2, micro_batch_size=1), num_ranks=2)
    yield lg
    lg.shutdown()


def scores_per_rank(lg, score_in):
    """Every rank scores all 4 rows (8 rows = the batch twice; rank r gets copy r): [2, 4, T]."""
    twice = {k: torch.cat([v, v]) for k, v in score_in.items()}
    return lg.score(twice, 1.0)["logprobs"].view(2, *score_in["input_ids"].shape)


# Row 3: only rank 1's second micro-batch is NaN (rank 0's shard is clean, and both ranks have
# backwarded micro-batch 0). Row 0: only rank 0's first micro-batch. Either way the all-reduced
# decision must make both ranks skip, in lockstep (a rank that stepped alone would also hang).
@pytest.mark.parametrize("poisoned_row", [3, 0], ids=["rank1_later_micro_batch", "rank0_first_micro_batch"])
def test_nan_on_one_rank_skips_on_every_rank(learner2, poisoned_row):
    b = sft_batch()
    score_in = {k: b[k] for k in ("input_ids", "attention_mask")}
    resp = b["response_mask"]
    warm = learner2.score(score_in, 1.0)["logprobs"]
    m = learner2.train_minibatch(policy_batch(b, warm), PolicyLoss(PolicyLossConfig()))
    assert m["skipped"] == 0.0  # a clean step first, so Adam has moments to protect
    before = scores_per_rank(learner2, score_in)
    assert torch.equal(before[0], before[1])  # the ranks hold the same weights
    digest = learner2.optimizer_state_digest()
    m = learner2.train_minibatch(policy_batch(b, before[0], poisoned_row), PolicyLoss(PolicyLossConfig()))
    assert m["skipped"] == 1.0 and math.isnan(m["loss"])  # mean over ranks: both skipped
    after = scores_per_rank(learner2, score_in)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert learner2.optimizer_state_digest() == digest
    # both ranks still train, together
    m = learner2.train_minibatch(policy_batch(b, after[0]), PolicyLoss(PolicyLossConfig()))
    assert m["skipped"] == 0.0 and math.isfinite(m["loss"])
    moved = scores_per_rank(learner2, score_in)
    assert torch.equal(moved[0], moved[1])
    assert moved[0][resp].sum() > after[0][resp].sum()


def test_compiled_learner_matches_eager(ray_session, tiny_model_dir, tmp_path):
    """learner.compile=true: the same logprobs as the eager learner (to float32 reordering),
    and the same policy steps — after 3 updates from the same start the two score the rows
    alike, with a change 100× larger than their gap; the compiled learner's checkpoint loads
    into an eager one (parameter names and weights are the model's own)."""
    b = sft_batch()
    score_in = {k: b[k] for k in ("input_ids", "attention_mask")}
    resp = b["response_mask"]

    def group(compiled: bool) -> LearnerGroup:
        return LearnerGroup(DSEngineConfig(tiny_model_dir, lr=3e-3, zero_stage=2,
                                           micro_batch_size=4, compile=compiled), num_ranks=1)

    runs = {}
    for compiled in (False, True):
        lg = group(compiled)
        try:
            lp = start = lg.score(score_in, 1.0)["logprobs"]
            for sign in (1.0, -1.0, 1.0):
                batch = {**policy_batch(b, lp), "advantages": sign * torch.ones_like(lp)}
                assert lg.train_minibatch(batch, PolicyLoss(PolicyLossConfig()))["skipped"] == 0.0
                lp = lg.score(score_in, 1.0)["logprobs"]
            runs[compiled] = (start, lp)
            if compiled:
                lg.save(str(tmp_path / "ckpt"))
        finally:
            lg.shutdown()
    (e0, e3), (c0, c3) = runs[False], runs[True]
    assert float((c0 - e0)[resp].abs().max()) < 1e-4
    gap = float((c3 - e3)[resp].abs().max())
    assert gap < 1e-3 and float((e3 - e0)[resp].abs().max()) > 100 * gap
    eager = group(False)
    try:
        eager.load(str(tmp_path / "ckpt"))
        assert float((eager.score(score_in, 1.0)["logprobs"] - c3)[resp].abs().max()) < 1e-4
    finally:
        eager.shutdown()
