"""learner.offload_between_updates (single-GPU colocated mode): DeepSpeed's offload_states /
reload_states between updates change nothing about training. Runs on CPU (the states move CPU
→ CPU, but through the same DeepSpeed calls and bookkeeping as on a GPU, where the freed device
memory is measured by benchmarks/gpu_check.sh): two ranks, ZeRO-1 and ZeRO-2 (DeepSpeed moves
ZeRO-3 state only with its FusedAdam; checked in the config), an offload after every update,
losses and optimizer state equal to a learner that never offloads."""
import pytest

from rl.engine.deepspeed_engine import DSEngineConfig
from rl.learner_group import LearnerGroup
from tests.integration.test_learner import sft_batch


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_offloading_between_updates_changes_nothing(ray_session, tiny_model_dir, zero_stage):
    runs = {}
    for offload in (False, True):
        cfg = DSEngineConfig(tiny_model_dir, lr=3e-3, zero_stage=zero_stage, micro_batch_size=2,
                             offload_between_updates=offload)
        group = LearnerGroup(cfg, num_ranks=2)
        try:
            losses = []
            for _ in range(3):
                losses.append(group.train_minibatch(sft_batch(), "sft", None, "token_mean")["loss"])
                moved = group.offload()
                assert ("colocate/offload_s" in moved) == offload
                group.score({k: v for k, v in sft_batch().items() if k != "response_mask"}, 1.0)
            runs[offload] = losses, group.optimizer_state_digest()
        finally:
            group.shutdown()
    (plain, digest), (offloaded, digest_off) = runs[False], runs[True]
    assert offloaded == pytest.approx(plain, rel=1e-6)
    assert plain[-1] < plain[0]
    assert digest_off == pytest.approx(digest, rel=1e-6) and digest > 0
