"""Weight sync is real: after a DeepSpeed update and a sync, vLLM scores a fixed sequence like
the learner does (float32), and unlike it did before the update."""
import pytest
import ray
import torch

from rl.engine.deepspeed_engine import DSEngineConfig
from rl.cluster.learner_group import LearnerGroup
from rl.models.tiny_model import build_char_tokenizer
from rollout.vllm_engine import EngineConfig, VLLMEngine
from rl.algorithms.losses import SftLoss


@pytest.fixture(scope="module")
def engine_and_learner(ray_session, tiny_model_dir):
    engine = ray.remote(num_cpus=0.5)(VLLMEngine).remote(EngineConfig(tiny_model_dir))
    learner = LearnerGroup(DSEngineConfig(tiny_model_dir, lr=1e-2), num_ranks=1)
    ray.get(engine.ready.remote())
    yield engine, learner
    learner.shutdown()
    ray.kill(engine)


def learner_logprobs(learner, seq):
    ids = torch.tensor([seq])
    out = learner.score({"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool)},
                        1.0)
    return out["logprobs"][0, 1:]


def test_sync_makes_vllm_match_the_learner(engine_and_learner):
    engine, learner = engine_and_learner
    tok = build_char_tokenizer()
    seq = tok("Add.\n347+285\n7+5=12\n4+8+1=13\n#### 632")["input_ids"]
    vllm_before = torch.tensor(ray.get(engine.score.remote([seq]))[0])
    learner_before = learner_logprobs(learner, seq)
    assert (vllm_before - learner_before).abs().max() < 1e-3

    ids = torch.tensor([seq])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 13:] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(mask), "response_mask": mask}
    for _ in range(3):
        learner.train_minibatch(batch, SftLoss())
    learner_after = learner_logprobs(learner, seq)
    assert (learner_after - learner_before).abs().max() > 0.1  # the update moved the policy

    stats = learner.sync_weights([engine], version=1)
    assert stats["sync/bytes"] > 0
    vllm_after = torch.tensor(ray.get(engine.score.remote([seq]))[0])
    assert (vllm_after - learner_after).abs().max() < 1e-3
    assert (vllm_after - vllm_before).abs().max() > 0.1
    assert ray.get(engine.get_weight_version.remote()) == 1

    # Generation uses the new weights too (prefix cache was reset): sampler logprobs of a
    # generated continuation equal the learner's.
    comps = ray.get(engine.generate.remote([seq[:13]], 2, 1.0, 1.0, 16, [7]))[0]
    for c in comps:
        full = seq[:13] + c.token_ids
        lp = learner_logprobs(learner, full)[12:]
        assert torch.allclose(torch.tensor(c.logprobs), lp, atol=1e-3)


def test_tied_embeddings_stay_in_sync(ray_session, tmp_path):
    """A tied lm_head (real small Qwen3s tie it) receives no weight of its own in a sync; vLLM's
    CPU logits GEMM reads a packed copy made at start-up. Before the fix the engine kept
    sampling from the initial output embeddings: the gap grew 0.42 → 2.45 over 6 syncs here.
    Now it stays at the untied level (~5e-7) over 6 updates and syncs."""
    from rl.models.tiny_model import TinyModelSpec, build_tiny_model

    path = str(build_tiny_model(tmp_path / "tied", TinyModelSpec(tie_word_embeddings=True)))
    engine = ray.remote(num_cpus=0.5)(VLLMEngine).remote(EngineConfig(path))
    learner = LearnerGroup(DSEngineConfig(path, lr=1e-2), num_ranks=1)
    try:
        tok = build_char_tokenizer()
        seq = tok("Add.\n347+285\n7+5=12\n4+8+1=13\n#### 632")["input_ids"]
        ids = torch.tensor([seq])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, 13:] = True
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(mask), "response_mask": mask}
        start = learner_logprobs(learner, seq)
        for version in range(1, 7):
            learner.train_minibatch(batch, SftLoss())
            learner.sync_weights([engine], version)
            ours = learner_logprobs(learner, seq)
            theirs = torch.tensor(ray.get(engine.score.remote([seq]))[0])
            assert (theirs - ours).abs().max() < 1e-5, (version, (theirs - ours).abs().max())
        assert (ours - start).abs().max() > 0.5  # the output embeddings really moved
    finally:
        learner.shutdown()
        ray.kill(engine)
