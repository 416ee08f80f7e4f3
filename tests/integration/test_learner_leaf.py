"""LeaF on the learner group: 2 DeepSpeed ranks under ZeRO-3 with a colocated teacher, and a
teacher in its own Ray actor. Input-gradient sensitivities equal the in-process model's; the
KD loss is the same through colocated full distributions and through the actor's top-V; LeaF's
KD rows inside a policy step add exactly kd_coef × their KD loss."""
from __future__ import annotations

import pytest
import torch

from rl.algorithms.losses import PolicyLossConfig
from rl.engine.deepspeed_engine import DSEngineConfig
from rl.engine.frozen import FrozenModel
from rl.methods.leaf.examples import batch_tensors, instruction_example
from rl.cluster.learner_group import LearnerGroup
from rl.tasks import get_task
from rl.methods.leaf.teacher import TeacherGroup
from rl.models.tiny_model import TinyModelSpec, build_char_tokenizer, build_tiny_model
from rl.algorithms.losses import DistillTerm
from rl.algorithms.losses import DistillLoss, TopKTargets
from rl.methods.leaf.detect import InputGradNorms
from rl.algorithms.losses import PolicyLoss

KEYS = ("input_ids", "attention_mask", "response_mask")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    spec = TinyModelSpec(hidden_size=192, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, seed=5)
    return str(build_tiny_model(tmp_path_factory.mktemp("teacher"), spec))


@pytest.fixture(scope="module")
def group(ray_session, tiny_model_dir, teacher_dir):
    lg = LearnerGroup(DSEngineConfig(tiny_model_dir, lr=0.0, zero_stage=3, grad_accum_steps=2,
                                     micro_batch_size=1, frozen_models={"teacher": teacher_dir}),
                      num_ranks=2)
    yield lg
    lg.shutdown()


def rows(n: int, offset: int = 0) -> dict[str, torch.Tensor]:
    tok = build_char_tokenizer()
    task = get_task("arith", seed=3, distractor_prob=1.0)
    t = batch_tensors([instruction_example(tok, task.sample("train", offset + i)) for i in range(n)],
                      tok.pad_token_id)
    return {k: t[k] for k in KEYS}


def test_sensitivities_on_two_zero3_ranks_equal_the_model_in_process(group, tiny_model_dir):
    b = rows(5)
    digest = group.optimizer_state_digest()
    g = group.probe(b, InputGradNorms())
    ref = FrozenModel(tiny_model_dir).probe(b, InputGradNorms())
    torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    assert group.optimizer_state_digest() == digest  # no parameter gradient reached Adam


def test_kd_loss_colocated_equals_teacher_actor_top_v(group, teacher_dir):
    b = rows(4)
    colocated = group.train_minibatch(b, DistillLoss())
    actor = TeacherGroup(teacher_dir, _tcfg(), "float32", len(build_char_tokenizer()))
    try:
        ids, lps = actor.probe(b, TopKTargets(len(build_char_tokenizer())))
        via_actor = group.train_minibatch({**b, "teacher_ids": ids, "teacher_logprobs": lps},
                                          DistillLoss())
        # the actor's rows come back in order even when split over 2 actors
        two = TeacherGroup(teacher_dir, _tcfg(num_actors=2), "float32", len(build_char_tokenizer()))
        ids2, lps2 = two.probe(b, TopKTargets(len(build_char_tokenizer())))
        two.shutdown()
    finally:
        actor.shutdown()
    assert torch.equal(ids, ids2) and torch.allclose(lps, lps2)
    assert colocated["loss"] == pytest.approx(via_actor["loss"], rel=1e-5)
    assert colocated["kd_kl"] == pytest.approx(via_actor["kd_kl"], rel=1e-5)
    assert colocated["loss"] > 0


def test_kd_rows_inside_a_policy_step_add_kd_coef_times_their_loss(group, tiny_model_dir,
                                                                     teacher_dir):
    """lr = 0, so both calls see the same weights: policy + KD rows = policy alone + 0.5 × the
    KD rows' token-mean KL(p_T ‖ p_S), computed here in process. 3 KD rows over 2 ranks × 2
    micro-batches: one micro-batch carries none (the joint forward must not care)."""
    from rl.algorithms.losses import forward_kl

    b = rows(4)
    lp = group.score(b, 1.0)["logprobs"]
    pol = {**b, "old_logprobs": lp, "advantages": torch.ones_like(lp), "sampler_logprobs": lp}
    kd = rows(3, offset=10)
    alone = group.train_minibatch(pol, PolicyLoss(PolicyLossConfig()))
    joint = group.train_minibatch(pol, PolicyLoss(PolicyLossConfig(), (DistillTerm("kd", 0.5),)),
                                  extra={"kd": kd})
    kl = forward_kl(FrozenModel(tiny_model_dir).full_logprobs(kd),
                    FrozenModel(teacher_dir).full_logprobs(kd))
    kd_loss = float(kl[kd["response_mask"]].mean())
    assert joint["loss"] == pytest.approx(alone["loss"] + 0.5 * kd_loss, rel=1e-5)
    assert kd_loss > 1e-3


def _tcfg(num_actors: int = 1):
    from rl.config import TeacherConfig

    return TeacherConfig(name="hf", num_actors=num_actors)
