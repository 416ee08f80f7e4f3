"""Placement helpers without a cluster: the ranks' distributed environment from where their
bundles landed (hand-worked cases), and resource bundles."""
import signal
import os

import pytest

from rl.cluster.placement import actor_resources, bundle, rank_env
from rl.loop.stop_signal import StopOnSignal


def test_rank_env_on_two_nodes_interleaved():
    # bundles landed on nodes B, A, B, B (PACK may interleave): NODE_LOCAL_RANK counts this
    # node's earlier ranks; LOCAL_RANK, the rank's device among those it sees, is 0 for all
    # (Ray shows each its own GPU); MASTER_ADDR is rank 0's node whatever the others are
    envs = rank_env(["B", "A", "B", "B"], ["10.0.0.2", "10.0.0.1", "10.0.0.2", "10.0.0.2"])
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"]
    assert [e["NODE_LOCAL_RANK"] for e in envs] == ["0", "0", "1", "2"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "0", "0", "0"]
    assert [e["LOCAL_WORLD_SIZE"] for e in envs] == ["3", "1", "3", "3"]
    assert {e["WORLD_SIZE"] for e in envs} == {"4"}
    assert {e["MASTER_ADDR"] for e in envs} == {"10.0.0.2"}
    assert not any("MASTER_PORT" in e for e in envs)  # rank 0's store picks it at start


def test_rank_env_single_node():
    envs = rank_env(["n"], ["127.0.0.1"])
    assert envs == [{"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "NODE_LOCAL_RANK": "0",
                     "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}]


def test_a_learner_process_started_with_a_node_position_in_local_rank_uses_its_first_gpu():
    """DeepSpeed binds the process group to cuda:$LOCAL_RANK (deepspeed/comm/torch.py,
    init_process_group, world size > 1 on CUDA). A rank that sees one GPU and carries a
    torchrun-style LOCAL_RANK=1 would ask for a device it does not have; the engine hands
    DeepSpeed LOCAL_RANK=0 and keeps the node position."""
    from rl.engine.deepspeed_engine import device_env

    assert device_env({"LOCAL_RANK": "1"}) == {"LOCAL_RANK": "0", "NODE_LOCAL_RANK": "1"}
    assert device_env({"LOCAL_RANK": "0", "NODE_LOCAL_RANK": "3"}) == {
        "LOCAL_RANK": "0", "NODE_LOCAL_RANK": "3"}
    assert device_env({}) == {"LOCAL_RANK": "0", "NODE_LOCAL_RANK": "0"}


def test_bundles_drop_zero_entries_and_options_ask_for_exactly_the_bundle():
    assert bundle(0.5, 0.0) == {"CPU": 0.5}
    b = bundle(1, 2, {"node_b": 0.5})
    assert b == {"CPU": 1.0, "GPU": 2.0, "node_b": 0.5}
    assert actor_resources(b) == {"num_cpus": 1.0, "num_gpus": 2.0, "resources": {"node_b": 0.5}}
    assert actor_resources(bundle(0.5, 0)) == {"num_cpus": 0.5, "num_gpus": 0}


def test_first_signal_asks_to_stop_second_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGTERM)  # handled in this (main) thread
        assert stop.received == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before
