"""Engine scheduling keys that would crash or stall inside an engine actor fail in
check_config first, naming the key (this machine has no GPU: the CPU rules apply)."""
import pytest

from rl.config import check_config
from tests.unit.test_config import load


@pytest.mark.parametrize("override, match", [
    ("rollout.chunked_prefill=true", "rollout.chunked_prefill=true is not supported on CPU"),
    ("rollout.max_num_batched_tokens=100", "rollout.max_num_batched_tokens=100 is below rollout.max_model_len=256"),
    ("rollout.max_num_seqs=0", "rollout.max_num_seqs must be >= 1"),
    ("rollout.max_new_tokens=256", r"rollout.max_new_tokens=256 must be in \[1, rollout.max_model_len=256\)"),
])
def test_bad_engine_scheduling_fails_before_any_actor(override, match):
    with pytest.raises(ValueError, match=match):
        check_config(load([override]))


def test_explicit_scheduling_that_works_on_cpu_passes():
    check_config(load(["rollout.chunked_prefill=false", "rollout.max_num_batched_tokens=256",
                       "rollout.max_num_seqs=16"]))
