"""learner.offload_between_updates (single-GPU colocated mode): DeepSpeed's offload_states /
reload_states between updates change nothing about training. Runs on CPU (the states move CPU
→ CPU, but through the same DeepSpeed calls and bookkeeping as on a GPU, where the freed device
memory is measured by benchmarks/gpu_check.sh): two ranks, ZeRO-1 and ZeRO-2 (DeepSpeed moves
ZeRO-3 state only with its FusedAdam; checked in the config), an offload after every update,
losses and optimizer state equal to a learner that never offloads.

On CPU a tensor's device cannot tell offloaded from resident state, so each rank is asked what
DeepSpeed itself recorded: its ZeRO optimizer's `offloaded_states` (the set offload_states adds
to and reload_states empties), beside the engine's own `offloaded` flag."""
import pytest
import ray

from rl.engine.deepspeed_engine import DSEngineConfig
from rl.cluster.learner_group import LearnerGroup
from tests.integration.test_learner import sft_batch
from rl.algorithms.losses import SftLoss

# what DSEngine.OFFLOADED asks for that a ZeRO-1/2 optimizer moves (it has no contiguous
# gradient buffer: stage_1_and_2.offload_states skips that one)
MOVED = ["hp_params", "lp_grads", "optim_states"]
RESIDENT, OFFLOADED = [(False, [])] * 2, [(True, MOVED)] * 2  # offload_record of the 2 ranks


def offload_record(group: LearnerGroup) -> list[tuple[bool, list[str]]]:
    """Per rank: (the engine's `offloaded` flag, DeepSpeed's optimizer.offloaded_states), read
    inside the rank's actor (Ray's __ray_call__ runs a function on the actor instance)."""
    def probe(worker):
        return worker.engine.offloaded, sorted(s.value for s in worker.engine.optimizer.offloaded_states)

    flags = group._all("__getattribute__", "offloaded")  # the same flag through the group's own call
    record = ray.get([w.__ray_call__.remote(probe) for w in group.workers])
    assert [f for f, _ in record] == flags
    return record


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
                losses.append(group.train_minibatch(sft_batch(), SftLoss())["loss"])
                assert offload_record(group) == RESIDENT  # the update reloaded everything
                moved = group.offload()
                if offload:  # CPU: no device memory to free, so exactly 0 bytes
                    assert set(moved) == {"colocate/offload_s", "colocate/offload_freed_bytes"}
                    assert moved["colocate/offload_freed_bytes"] == 0.0 and moved["colocate/offload_s"] > 0
                else:
                    assert moved == {}
                assert offload_record(group) == (OFFLOADED if offload else RESIDENT)
                group.score({k: v for k, v in sft_batch().items() if k != "response_mask"}, 1.0)
                # a scoring forward needs only the weights: the states stay where they are
                assert offload_record(group) == (OFFLOADED if offload else RESIDENT)
            runs[offload] = losses, group.optimizer_state_digest()
            assert offload_record(group) == RESIDENT  # the digest reloaded them to read them
        finally:
            group.shutdown()
    (plain, digest), (offloaded, digest_off) = runs[False], runs[True]
    assert offloaded == pytest.approx(plain, rel=1e-6)
    assert plain[-1] < plain[0]
    assert digest_off == pytest.approx(digest, rel=1e-6) and digest > 0
