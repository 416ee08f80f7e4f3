"""The learner group's rendezvous port cannot be taken between its choice and the group's start
(issue 27: a rank died in its creation with `DistNetworkError ... EADDRINUSE` when something
on the node took the port first).

The test is that something: as soon as the driver learns the port (rl.cluster.learner_group
rendezvous_port), it binds and listens on it in this process. Where the port was picked by
binding and closing a socket, that bind wins and the group cannot start; where rank 0's store
already listens on it, the bind is refused and the group starts."""
import errno
import socket

import torch

import rl.cluster.learner_group as learner_group
from rl.cluster.learner_group import LearnerGroup
from rl.engine.deepspeed_engine import DSEngineConfig


def test_a_port_taken_right_after_its_choice_does_not_stop_the_group(
        ray_session, tiny_model_dir, monkeypatch):
    choose = learner_group.rendezvous_port
    chosen, taken, refused = [], [], []

    def then_take_it(*args, **kwargs):
        port = choose(*args, **kwargs)
        chosen.append(port)
        s = socket.socket()
        try:
            s.bind(("", port))
            s.listen()
            taken.append(s)  # held: the ranks bind (or connect) after this
        except OSError as e:
            s.close()
            refused.append(e.errno)
        return port

    monkeypatch.setattr(learner_group, "rendezvous_port", then_take_it)
    try:
        group = LearnerGroup(DSEngineConfig(tiny_model_dir, zero_stage=3), num_ranks=2,
                             call_timeout_s=300.0)
        try:
            assert taken == [] and refused == [errno.EADDRINUSE]
            assert [w["rank"] for w in group.where()] == ["0", "1"]
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(3, 40, (4, 12), generator=g)
            out = group.score({"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool)},
                              1.0)  # ZeRO-3: each rank's forward gathers the other's shards
            assert out["logprobs"].shape == (4, 12) and torch.isfinite(out["logprobs"]).all()
        finally:
            group.shutdown()
    finally:
        for s in taken:
            s.close()
    assert len(chosen) == 1
