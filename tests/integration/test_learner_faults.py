"""A learner rank that stops answering (frozen: SIGSTOP, so its peer waits in a collective
forever) or dies (SIGKILL) ends the call with a clear LearnerFailure — after
cluster.call_timeout_s for the silent one, at once for the dead one — instead of a hang."""
import os
import signal
import time

import pytest
import torch

from rl.engine.deepspeed_engine import DSEngineConfig
from rl.cluster.learner_group import LearnerGroup
from rl.cluster.remote_calls import LearnerFailure

TIMEOUT_S = 8.0


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (4, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool)}


@pytest.mark.parametrize("how", ["frozen", "killed"])
def test_a_lost_rank_fails_the_call_not_the_driver(ray_session, tiny_model_dir, how):
    # Started without the short deadline: on a busy 2-core host the ranks' start (DeepSpeed
    # init) alone once took longer than 8 s. The deadline under test is the calls'.
    group = LearnerGroup(DSEngineConfig(tiny_model_dir, zero_stage=3), num_ranks=2,
                         call_timeout_s=120.0)
    group.call_timeout_s = TIMEOUT_S
    try:
        group.score(batch(), 1.0)  # a healthy group answers well within the deadline
        pid = group.where()[1]["pid"]
        os.kill(pid, signal.SIGSTOP if how == "frozen" else signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(LearnerFailure) as err:
            group.score(batch(), 1.0)  # ZeRO-3: rank 0 waits in a gather for rank 1
        waited = time.monotonic() - t0
        if how == "frozen":
            assert "no answer within 8 s" in str(err.value)
            assert TIMEOUT_S - 0.5 < waited < TIMEOUT_S + 10
        else:
            assert "an actor died" in str(err.value)
            assert waited < TIMEOUT_S
    finally:
        group.shutdown()  # ray.kill also ends a stopped process
