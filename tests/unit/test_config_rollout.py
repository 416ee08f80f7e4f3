"""Engine scheduling keys that would crash or stall inside an engine actor fail in
check_config first, naming the key (this machine has no GPU: the CPU rules apply)."""
import pytest

from rl.config_checks import check_config
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


@pytest.mark.parametrize("overrides, match", [
    (["rollout.async_steps=-1"], "rollout.async_steps=-1: must be >= 0"),
    (["algorithm.tis_mode=clip"], r"algorithm.tis_mode='clip': must be one of \('truncate', 'mask'\)"),
    (["algorithm.tis_cap=0.5"], r"algorithm.tis_cap=0.5: the cap c must be >= 1"),
    (["algorithm.tis_cap=-1"], "algorithm.tis_cap=-1.0: must be >= 0"),
    # vLLM sleep mode (one shared GPU) idles the engines during the update: no overlap to have.
    # Checked before the GPU-only rule, so it is named on CPU too.
    (["rollout.async_steps=1", "rollout.sleep_level=1"], "rollout.async_steps=1 generates while"),
])
def test_async_and_sampler_correction_settings_are_checked(overrides, match):
    with pytest.raises(ValueError, match=match):
        check_config(load(overrides))


def test_async_settings_that_work_pass():
    check_config(load(["rollout.async_steps=2", "algorithm.tis_cap=2", "algorithm.tis_mode=mask"]))


@pytest.mark.parametrize("overrides", [["learner.compile=true", "credit=coupled"],
                                       ["learner.compile=true", "learner.zero_stage=3"],
                                       ["learner.compile=true", "learner.attention=kernels"]])
def test_compile_needs_the_stock_attention_and_zero_up_to_2(overrides):
    with pytest.raises(ValueError, match="learner.compile needs the stock attention"):
        check_config(load(overrides))


def test_compile_on_the_default_passes():
    check_config(load(["learner.compile=true"]))
