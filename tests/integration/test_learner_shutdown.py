"""A learner group's shutdown, as the GPU path needs it: its ranks' processes have exited when
`shutdown` returns (a GPU's memory is only free then, and vLLM's start-up profiling fails when
free memory grows while it measures; the rank processes used to be killed asynchronously), and
a collective weight transport's group is closed first (it never was: a restarted learner group
built a new one over it)."""
import psutil

from rl.engine.deepspeed_engine import DSEngineConfig
from rl.cluster.learner_group import LearnerGroup
from tests.integration.recording_transport import RecordingTransport


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_shutdown_closes_the_transport_and_returns_once_the_ranks_have_exited(
        ray_session, tiny_model_dir, tmp_path):
    group = LearnerGroup(DSEngineConfig(tiny_model_dir, zero_stage=3), num_ranks=2,
                         transport=RecordingTransport(str(tmp_path)), call_timeout_s=120.0)
    pids = [w["pid"] for w in group.where()]
    try:
        group.push_weights([], version=1)
        group.push_weights([], version=2)
    finally:
        group.shutdown()
    assert not [pid for pid in pids if running(pid)]
    logs = {r: (tmp_path / f"rank{r}.log").read_text().split("\n")[:-1] for r in (0, 1)}
    # every rank connects once, gathers and sends per sync, and leaves the group at shutdown
    assert logs[0] == logs[1] == ["connect 0", "send v1", "send v2", "close"]
