"""Bad config fails at composition — naming the key — before Ray or any actor starts."""
import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from rl.config import (AlgorithmConfig, CreditConfig, DistillConfig, LearnerConfig, LoggerConfig,
                       ModelConfig, RolloutConfig, TaskConfig, TeacherConfig, check_config,
                       register_configs)

CONF = str(Path(__file__).resolve().parents[2] / "conf")
register_configs()


def load(overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_default_composes_and_passes_checks():
    cfg = load([])
    check_config(cfg)
    assert cfg.task.name == "arith" and cfg.credit.name == "none"
    assert cfg.learner.num_ranks == 1 and cfg.rollout.num_engines == 1


GROUP_SCHEMAS = {"algorithm": AlgorithmConfig, "rollout": RolloutConfig, "learner": LearnerConfig,
                 "task": TaskConfig, "model": ModelConfig, "logger": LoggerConfig, "credit": CreditConfig,
                 "teacher": TeacherConfig, "distill": DistillConfig}


def _overlay(base: dict, top: dict) -> dict:
    """`base` with every key of `top` set to top's value (recursively into dicts)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _overlay(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.mark.parametrize("group", sorted(GROUP_SCHEMAS))
def test_every_group_file_is_valid(group):
    """Selecting a group file gives exactly: the schema's defaults, overridden by what the
    file says (the file read on its own, not through Hydra's composition)."""
    files = sorted((Path(CONF) / group).glob("*.yaml"))
    assert files
    for f in files:
        cfg = load([f"{group}={f.stem}"])
        written = OmegaConf.to_container(OmegaConf.load(f))
        want = _overlay(dataclasses.asdict(GROUP_SCHEMAS[group]()), written)
        assert OmegaConf.to_container(cfg[group], resolve=True) == want, f.name


def test_unknown_key_names_the_key():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as exc:
        load(["algorithm.clip_hihg=0.3"])
    assert "clip_hihg" in str(exc.value) + str(exc.value.__cause__)


def test_unknown_key_in_a_group_file_names_the_key(tmp_path):
    conf = tmp_path / "conf"
    import shutil

    shutil.copytree(CONF, conf)
    (conf / "algorithm" / "typo.yaml").write_text("lerning_rate: 0.1\n")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with pytest.raises(Exception) as exc:
            compose(config_name="config", overrides=["algorithm=typo"])
    assert "lerning_rate" in str(exc.value) + str(exc.value.__cause__)


def test_mistyped_value_names_the_key():
    with pytest.raises((ConfigCompositionException, ValidationError)) as exc:
        load(["algorithm.n_samples=eight"])
    assert "n_samples" in str(exc.value) + str(exc.value.__cause__)


def test_cross_field_checks_name_the_key():
    cfg = load(["algorithm.advantage=ppo2"])
    with pytest.raises(ValueError, match="algorithm.advantage"):
        check_config(cfg)
    cfg = load(["algorithm.minibatch_size=48"])
    with pytest.raises(ValueError, match="minibatch_size"):
        check_config(cfg)


def test_trainer_rejects_bad_config_before_ray_starts(monkeypatch):
    import rl.trainer as trainer

    def must_not_start(*_):
        raise AssertionError("Ray was started before the config was validated")

    monkeypatch.setattr(trainer, "init_ray", must_not_start)
    with pytest.raises(ValueError, match="loss_agg"):
        trainer.Trainer(load(["algorithm.loss_agg=median"]))
    with pytest.raises(TypeError, match="digitz"):
        trainer.Trainer(load(["+task.params.digitz=3"]))


@pytest.mark.parametrize("name", ["none", "random", "entropy", "local_chunk", "global_anchor", "coupled"])
def test_every_credit_file_builds_and_picks_the_attention(name):
    from rl.config import build_credit, learner_attention

    cfg = load([f"credit={name}"])
    check_config(cfg)
    assert build_credit(cfg).name == name
    reads_attention = name in ("local_chunk", "global_anchor", "coupled")
    assert learner_attention(cfg) == ("kernels" if reads_attention else "sdpa")


def test_credit_param_typo_and_sdpa_conflict_are_named():
    with pytest.raises(ValueError, match="credit.params.gama_amp"):
        check_config(load(["credit=coupled", "+credit.params.gama_amp=2"]))
    with pytest.raises(ValueError, match="learner.attention"):
        check_config(load(["credit=coupled", "learner.attention=sdpa"]))


@pytest.mark.parametrize("overrides, message", [
    (["distill=leaf"], "distils from a teacher"),
    (["distill=kd", "teacher=hf"], "teacher=hf needs teacher.path"),
    (["teacher.path=/x"], "only read with teacher=hf"),
    (["distill=leaf", "teacher=tiny", "leaf.quantile=1.5"], "leaf.quantile"),
    (["distill=leaf", "teacher=tiny", "leaf.pruning=all"], "leaf.pruning"),
    (["distill=leaf", "teacher=tiny", "distill.mix=2"], "distill.mix"),
    (["teacher=tiny", "teacher.placement=gpu"], "teacher.placement"),
])
def test_leaf_settings_fail_before_any_actor(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(load(overrides))


@pytest.mark.parametrize("overrides, message", [
    (["avar.vars_norm=softmax"], "avar.vars_norm"),
    (["avar.evidence=audio"], "avar.evidence"),
    (["avar.vas=sometimes"], "avar.vas"),
    (["cold_start.objective=rl"], "cold_start.objective"),
    (["avar.vars_coef=-1"], "avar.vars_coef"),
    (["avar.layers=top:3"], "layers must be"),
    (["avar.vars_coef=0.3", "learner.attention=sdpa"], "learner.attention must be kernels"),
    (["avar.vars_coef=0.3", "avar.evidence=image"], "needs a vision-language model"),
    (["cold_start.objective=agto", "learner.attention=sdpa"], "learner.attention must be kernels"),
])
def test_avar_settings_fail_before_any_actor(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(load(overrides))


@pytest.mark.parametrize("overrides, attention", [
    ([], "sdpa"), (["avar.vars_coef=0.3"], "kernels"), (["cold_start.objective=agto"], "kernels"),
    (["avar.vas=always"], "kernels"), (["avar.vas=auto"], "sdpa"),
])
def test_avar_picks_the_kernels_when_it_reads_attention(overrides, attention):
    from rl.config import learner_attention

    cfg = load(overrides)
    check_config(cfg)
    assert learner_attention(cfg) == attention
