"""The GPU path's plain-Python logic, on this CPU machine: who holds a shared GPU when (the
order of sleep / offload / sync / wake), the engines' memory share per device, the placement
rules of the GPU weight transports, and the GPU-only config combinations refused before any
actor starts. Each case is worked by hand from the rule it checks."""
import pytest

from rl.config_checks import check_config
from rl.cluster.gpu_sharing import learner_alone, shares_gpu, start_both, to_engines, to_learner
from rl.cluster.placement import check_transport_placement
from rollout.vllm_engine import EngineConfig, memory_utilization
from tests.unit.test_config import load


class Recorded:
    """Our learner and rollout groups' GPU-sharing calls, recorded in the order made (stand-ins
    for rl.cluster.learner_group.LearnerGroup / rl.cluster.rollout_group.RolloutGroup; the real groups run in
    tests/integration and tests/e2e)."""

    def __init__(self, sleep_level: int = 1):
        self.calls: list[str] = []
        self.sleep_level = sleep_level

    # LearnerGroup
    def offload(self):
        self.calls.append("learner.offload")
        return {"colocate/offload_s": 0.1}

    def save(self, path):
        self.calls.append("learner.save")

    # RolloutGroup
    def ready(self):
        self.calls.append("engines.ready")
        return []

    def sleep(self):
        self.calls.append("engines.sleep")
        return {"colocate/sleep_s": 0.2} if self.sleep_level else {}

    def sync_from(self, learner, version):
        # the engines wake inside the sync: weights, then the KV cache (VLLMEngine.update_weights)
        self.calls += ["engines.wake(weights)", f"sync v{version}", "engines.wake(kv_cache)"]
        return {"sync/total_s": 0.3}


def test_the_learner_offloads_before_the_sync_wakes_the_engines():
    """The sync used to run first: the engines' weights and KV cache came back onto the GPU
    while the learner still held its optimizer state (over budget for a 4B model on 80 GB)."""
    both = Recorded()
    metrics = to_engines(both, both, 7)
    assert both.calls == ["learner.offload", "engines.wake(weights)", "sync v7",
                          "engines.wake(kv_cache)"]
    assert metrics == {"colocate/offload_s": 0.1, "sync/total_s": 0.3}
    both.calls.clear()
    assert to_learner(both) == {"colocate/sleep_s": 0.2} and both.calls == ["engines.sleep"]


@pytest.mark.parametrize("shared, want", [
    # vLLM profiles the GPU's free memory while it starts: the learner waits until the engines
    # are up, and starts beside sleeping ones (they used to start at the same time)
    (True, ["engines.start", "engines.ready", "engines.sleep", "learner.start"]),
    (False, ["engines.start", "learner.start"]),  # nothing shared: their start-ups overlap
])
def test_on_a_shared_gpu_the_engines_start_alone(shared, want):
    both = Recorded()

    def start(side):
        def go():
            both.calls.append(f"{side}.start")
            return both if side == "engines" else "learner"
        return go

    engines, learner = start_both(start("engines"), start("learner"), shared)
    assert both.calls == want and engines is both and learner == "learner"


@pytest.mark.parametrize("sleep_level, want", [
    # the engines sleep while the learner's full state is back for the save, then get the GPU
    # (and, after a level-2 sleep, their weights) back through an offload + sync
    (1, ["engines.sleep", "learner.save", "learner.offload", "engines.wake(weights)", "sync v3",
         "engines.wake(kv_cache)"]),
    # nothing sleeps (no engine shares the GPU): only the learner's state goes back to CPU
    (0, ["engines.sleep", "learner.save", "learner.offload"]),
])
def test_a_checkpoint_has_the_gpu_to_itself(sleep_level, want):
    both = Recorded(sleep_level)
    with learner_alone(both, both, 3):
        both.save("ckpt")
    assert both.calls == want


@pytest.mark.parametrize("rank, engine, shared", [
    (0.5, 0.5, True), (1.0, 0.5, True), (0.5, 1.0, True), (1.0, 1.0, False), (0.0, 0.0, False),
    (1.0, 2.0, False)])
def test_a_gpu_is_shared_when_either_side_takes_a_fraction(rank, engine, shared):
    assert shares_gpu(rank, engine) is shared


@pytest.mark.parametrize("kwargs, on_gpu, want", [
    ({}, False, 0.1),                                        # CPU: a share of host RAM
    ({"gpu_share": 1.0}, True, 0.9),                         # a GPU of its own
    ({"gpu_share": 0.5}, True, 0.35),                        # debug_gpu: half a GPU, 0.7 of it
    ({"gpu_share": 0.25}, True, 0.175),
    ({"gpu_share": 1.0, "gpu_memory_utilization": 0.6}, True, 0.6),   # set: used as is
    ({"gpu_memory_utilization": 0.2}, False, 0.2),
])
def test_the_engines_memory_share_defaults_per_device(kwargs, on_gpu, want):
    """rollout.gpu_memory_utilization used to default to 0.1 everywhere: on a GPU a 4B model's
    bf16 weights (8 GB) alone exceed 0.1 × 80 GB, leaving no KV cache."""
    assert memory_utilization(EngineConfig("m", **kwargs), on_gpu) == pytest.approx(want)


def where(node: str, *gpus: str) -> dict:
    return {"node_id": node, "gpu_ids": list(gpus)}


def test_ipc_needs_each_engine_on_learner_rank_0s_gpu():
    check_transport_placement("ipc", where("A", "0"), [where("A", "0")])
    for engine in (where("A", "1"), where("B", "0")):  # another GPU; the same index elsewhere
        with pytest.raises(RuntimeError, match="CUDA IPC needs both on one GPU"):
            check_transport_placement("ipc", where("A", "0"), [engine])


def test_nccl_refuses_two_group_members_on_one_gpu():
    check_transport_placement("nccl", where("A", "0"), [where("A", "1"), where("B", "0"),
                                                        where("B", "1", "2")])
    with pytest.raises(RuntimeError, match="engine 0 and learner rank 0 share GPU 0"):
        check_transport_placement("nccl", where("A", "0"), [where("A", "0")])
    with pytest.raises(RuntimeError, match="engine 1 and rollout engine 0 share GPU 3"):
        check_transport_placement("nccl", where("A", "0"), [where("A", "2", "3"), where("A", "3")])


def test_payload_transports_and_cpu_ranks_need_no_placement():
    check_transport_placement("buckets", where("A", "0"), [where("B", "1")])
    check_transport_placement("nccl", where("A"), [where("A")])  # CPU: nothing to check


@pytest.mark.parametrize("overrides, match", [
    # cluster=ray skips the "needs GPUs" rule of this CPU machine: the GPU-side rules are named
    (["learner.weight_transport=ipc", "rollout.tensor_parallel_size=2"],
     "a tensor-parallel engine .* spans several: use nccl"),
    (["learner.num_ranks=2", "learner.num_gpus_per_rank=0.5", "algorithm.minibatch_size=64"],
     "NCCL refuses two ranks of one group on one GPU"),
])
def test_gpu_combinations_that_cannot_work_fail_before_any_actor(overrides, match):
    with pytest.raises(ValueError, match=match):
        check_config(load(["cluster=ray", "cluster.address=auto", *overrides]))


def test_ranks_sharing_a_gpu_over_gloo_pass():
    check_config(load(["cluster=ray", "cluster.address=auto", "learner.num_ranks=2",
                       "learner.num_gpus_per_rank=0.5", "learner.backend=gloo",
                       "algorithm.minibatch_size=64"]))
