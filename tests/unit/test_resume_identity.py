"""resume=true refuses to load another run's checkpoints (the README's examples all write to
outputs/default/seed0 unless named): the keys that differ are named, before any actor starts."""
import pytest
from omegaconf import OmegaConf

from rl.loop.checkpoint import check_same_run
from tests.unit.test_config import load


def saved(tmp_path, overrides):
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.to_container(load(overrides), resolve=True)))
    return path


def current(overrides):
    return OmegaConf.to_container(load(overrides), resolve=True)


def test_same_run_with_more_steps_and_other_logging_resumes(tmp_path):
    path = saved(tmp_path, ["task=countdown", "steps=100"])
    check_same_run(path, current(["task=countdown", "steps=150", "resume=true", "eval_every=5",
                                  "logger=none", "algorithm.lr=1e-5"]))


@pytest.mark.parametrize("theirs, ours, named", [
    (["task=countdown"], [], "task.name: 'countdown' there, 'arith' here"),
    (["learner.num_ranks=2", "learner.zero_stage=3"], [], "learner.num_ranks: 2 there, 1 here"),
    (["credit=coupled"], [], "credit.name: 'coupled' there, 'none' here"),
    (["seed=1"], ["seed=2"], "seed: 1 there, 2 here"),
])
def test_a_different_run_is_refused_naming_the_keys(tmp_path, theirs, ours, named):
    with pytest.raises(ValueError, match="holds a different run") as err:
        check_same_run(saved(tmp_path, theirs), current(ours))
    assert named in str(err.value)


def test_no_saved_config_resumes(tmp_path):
    check_same_run(tmp_path / "config.yaml", current([]))
