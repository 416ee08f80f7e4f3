"""Bad config fails at composition — naming the key — before Ray or any actor starts."""
import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from rl.config import (AlgorithmConfig, CreditConfig, DistillConfig, LearnerConfig, LoggerConfig,
                       ModelConfig, RolloutConfig, TaskConfig, TeacherConfig, register_configs)
from rl.config_checks import check_config

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


def test_trainer_rejects_bad_config_before_ray_starts(monkeypatch, tmp_path):
    import rl.loop.trainer as trainer

    def must_not_start(*_):
        raise AssertionError("Ray was started before the config was validated")

    monkeypatch.setattr(trainer, "init_ray", must_not_start)
    with pytest.raises(ValueError, match="loss_agg"):
        trainer.Trainer(load(["algorithm.loss_agg=median"]))
    with pytest.raises(TypeError, match="digitz"):
        trainer.Trainer(load(["+task.params.digitz=3"]))
    # a layer beyond the model's 4: known once the base model is, still before Ray
    with pytest.raises(ValueError, match=r"learner.stats_layers: layer indices \[99\] out of range"):
        trainer.Trainer(load(["learner.stats_layers='99'", "credit=coupled",
                              f"output_dir={tmp_path}/run", f"cache_dir={tmp_path}/cache"]))


@pytest.mark.parametrize("name", ["none", "random", "entropy", "local_chunk", "global_anchor", "coupled",
                                  "attention_entropy", "mc"])
def test_every_credit_file_builds_and_picks_the_attention(name):
    from rl.config_checks import build_credit, learner_attention

    cfg = load([f"credit={name}"])
    check_config(cfg)
    assert build_credit(cfg).strategy == name
    reads_attention = name in ("local_chunk", "global_anchor", "coupled", "attention_entropy")
    assert learner_attention(cfg) == ("kernels" if reads_attention else "sdpa")


def test_credit_param_typo_and_sdpa_conflict_are_named():
    with pytest.raises(ValueError, match="credit.params.gama_amp"):
        check_config(load(["credit=coupled", "+credit.params.gama_amp=2"]))
    # a key of coupled that global_anchor does not read
    with pytest.raises(ValueError, match="credit.params.alpha: unknown for credit=global_anchor"):
        check_config(load(["credit=global_anchor", "+credit.params.alpha=0.3"]))
    with pytest.raises(ValueError, match="learner.attention"):
        check_config(load(["credit=coupled", "learner.attention=sdpa"]))
    with pytest.raises(ValueError, match="rank must be top or bottom"):
        check_config(load(["credit=coupled", "credit.params.rank=lowest"]))


@pytest.mark.parametrize("overrides, message", [
    (["distill=leaf"], "distils from a teacher"),
    (["distill=kd", "teacher=hf"], "teacher=hf needs teacher.path"),
    (["teacher.path=/x"], "only read with teacher=hf"),
    (["distill=leaf", "teacher=tiny", "leaf.quantile=1.5"], "leaf.quantile"),
    (["distill=leaf", "teacher=tiny", "leaf.pruning=all"], "leaf.pruning"),
    (["distill=leaf", "teacher=tiny", "leaf.unit=sentence"], "leaf.unit"),
    (["distill=leaf", "teacher=tiny", "distill.mix=2"], "distill.mix"),
    (["teacher=tiny", "teacher.placement=gpu"], "teacher.placement"),
    (["leaf=rl", "teacher=none"], "leaf=rl needs a teacher"),
    (["leaf=rl", "leaf.kd_coef=0", "leaf.counterfactual_groups=0"], "does nothing"),
    (["leaf=rl", "algorithm.prompts_per_step=8"],
     r"must divide \(prompts_per_step \+ leaf.counterfactual_groups with leaf=rl\) \* n_samples=192"),
])
def test_leaf_settings_fail_before_any_actor(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(load(overrides))


@pytest.mark.parametrize("overrides, message", [
    (["avar.vars_norm=softmax"], "avar.vars_norm"),
    (["avar.evidence=audio"], "avar.evidence"),
    (["avar=vars", "avar.vars_coef=-1"], "avar.vars_coef"),
    (["avar.layers=top:3"], "layers must be"),
    (["avar=vars", "learner.attention=sdpa"], "learner.attention must be kernels"),
    (["avar=vars", "avar.evidence=image"], "needs a vision-language model"),
    (["avar=agto", "learner.attention=sdpa"], "learner.attention must be kernels"),
    (["avar=agto", "avar.agto_at=rl"], "avar.agto_at"),
    (["avar=agto", "avar.agto_at=stage", "avar.agto_stage.steps=0"], "avar.agto_stage"),
    (["avar=vas", "avar.system=template_prefix:2"], "avar.system"),
])
def test_avar_settings_fail_before_any_actor(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(load(overrides))


def test_a_method_is_switched_on_by_its_group():
    """leaf=rl alone is a valid run (it brings the tiny teacher; teacher=... still wins);
    avar=<part> alone turns the kernels on."""
    from rl.methods import build_methods

    cfg = load(["leaf=rl"])
    check_config(cfg)
    assert cfg.teacher.name == "tiny" and load(["leaf=rl", "teacher=hf"]).teacher.name == "hf"
    assert [m.name for m in build_methods(cfg)] == ["leaf", "credit"]
    for part, on in (("vas", (False, False)), ("vars", (True, False)), ("agto", (False, True)),
                     ("agto_vars", (True, True))):
        (avar, _) = build_methods(load([f"avar={part}"]))
        assert (avar.vars_on, avar.agto is not None) == on, part
    # AGTO as a stage after the cold start: no cold-start objective; the stage gets the run's
    # config and exactly the AGTO terms the overrides name
    from rl.methods.avar.agto import run_agto_stage
    from rl.methods.avar.scores import AgtoConfig

    cfg = load(["avar=agto", "avar.agto_at=stage", "avar.agto_beta=0.015",
                "avar.system=template_prefix:0.4", "avar.layers=middle:2"])
    (avar, _) = build_methods(cfg)
    assert avar.cold_start_objective() is None
    assert avar.stage.func is run_agto_stage and avar.stage.args[0] is cfg
    assert avar.stage.args[1] == AgtoConfig(alpha=0.15, beta=0.015, layers="middle:2", eps=1e-6,
                                            evidence="evidence", system="template_prefix:0.4")
    # the cold-start placement: the same terms as the cold start's objective, no stage
    (avar, _) = build_methods(load(["avar=agto", "avar.agto_beta=0.015"]))
    assert avar.stage is None and avar.agto == AgtoConfig(beta=0.015)
    assert build_methods(load(["avar=vas"]))[0].before_rl("policy_dir", False) == "policy_dir"


@pytest.mark.parametrize("overrides, message", [
    # old spellings fail naming the new ones
    (["cold_start.objective=agto"], "cold_start.objective='agto' was moved: .*avar=agto"),
    (["avar.vas=always"], "avar.vas='always' was moved: .*avar=vas"),
    (["leaf.kl_coef=0.1"], "leaf.kl_coef=0.1 was moved: .*leaf=rl leaf.kd_coef"),
    (["learner.attn_impl=triton"], "learner.attn_impl='triton' was moved: .*learner.attention"),
    (["learner.plain_attention=kernels"], "was moved: learner.attention=kernels_everywhere"),
])
def test_moved_keys_name_their_new_spelling(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(load(overrides))


@pytest.mark.parametrize("overrides, attention", [
    ([], "sdpa"), (["avar=vars"], "kernels"), (["avar=agto"], "kernels"),
    (["avar=vas"], "kernels"), (["avar=none"], "sdpa"),
    (["learner.attention=kernels_everywhere"], "kernels_everywhere"),
])
def test_avar_picks_the_kernels_when_it_reads_attention(overrides, attention):
    from rl.config_checks import learner_attention

    cfg = load(overrides)
    check_config(cfg)
    assert learner_attention(cfg) == attention


@pytest.mark.parametrize("overrides, message", [
    (["rollout.num_engines=0"], r"rollout.num_engines=0: must be >= 1"),
    (["rollout.num_engines=3", "algorithm.prompts_per_step=2", "algorithm.minibatch_size=8"],
     r"rollout.num_engines=3 must not exceed algorithm.prompts_per_step=2"),
    (["learner.num_ranks=0"], r"learner.num_ranks=0: must be >= 1"),
    (["learner.zero_stage=4"], r"learner.zero_stage=4: must be one of \(0, 1, 2, 3\)"),
    (["learner.backend=mpi"], r"learner.backend='mpi'"),
    (["learner.micro_batch_size=0"], r"learner.micro_batch_size"),
    (["learner.torch_threads=0"], r"learner.torch_threads"),
    (["learner.num_cpus_per_rank=0"], r"learner.num_cpus_per_rank=0.0: must be > 0"),
    (["rollout.temperature=0"], r"rollout.temperature"),
    (["rollout.top_p=1.5"], r"rollout.top_p=1.5"),
    (["rollout.gpu_memory_utilization=0"], r"rollout.gpu_memory_utilization"),
    (["rollout.eval_samples=-1"], r"rollout.eval_samples"),
    (["eval_every=0"], r"eval_every=0: must be >= 1"),
    (["steps=-1"], r"steps=-1"),
    (["cluster.num_cpus=0"], r"cluster.num_cpus=0"),
    (["cluster.name=slurm"], r"cluster.name='slurm'"),
    (["cluster.address=auto"], r"cluster=local starts a private Ray instance"),
    (["cluster=ray", "cluster.address=null"], r"cluster=ray joins a running Ray cluster"),
    (["learner.stats_layers=middle:0"], r"learner.stats_layers: layers must be"),
    (["learner.stats_layers=first"], r"learner.stats_layers: layers must be"),
    (["avar.layers=middle:x"], r"avar.layers: layers must be"),
    (["rollout.tensor_parallel_size=0"], r"rollout.tensor_parallel_size=0: must be >= 1"),
    (["rollout.max_restarts=-1"], r"rollout.max_restarts=-1: must be >= 0"),
    (["max_failures=-1"], r"max_failures=-1: must be >= 0"),
    (["learner.num_gpus_per_rank=-1"], r"learner.num_gpus_per_rank=-1.0: must be >= 0"),
    (["cluster.call_timeout_s=0"], r"cluster.call_timeout_s=0.0: must be > 0"),
    (["+learner.resources_per_rank.node_b=0"], r"learner.resources_per_rank.node_b=0.0"),
    (["+rollout.resources_per_engine.GPU=1"], r"not CPU/GPU"),
    (["learner.weight_transport=rdma"], r"learner.weight_transport='rdma'"),
    (["learner.weight_bucket_mb=0"], r"learner.weight_bucket_mb=0: must be >= 1"),
    (["rollout.sleep_level=3"], r"rollout.sleep_level=3: must be one of \(0, 1, 2\)"),
    (["learner.offload_between_updates=true", "learner.zero_stage=3"],
     r"offload_between_updates needs learner.zero_stage 1 or 2"),
])
def test_sizes_choices_and_cluster_fail_before_any_actor_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(load(overrides))


@pytest.mark.parametrize("override", ["learner.backend=nccl", "learner.weight_transport=nccl",
                                      "learner.weight_transport=ipc", "rollout.sleep_level=1"])
def test_gpu_only_choices_need_a_gpu_here(override):
    import torch

    if torch.cuda.is_available():  # the lent GPU machine: a valid choice there
        check_config(load([override]))
    else:
        with pytest.raises(ValueError, match=f"{override} needs GPUs"):
            check_config(load([override]))


@pytest.mark.parametrize("value, want", [("all", [0, 1, 2, 3]), ("middle:1", [1]), ("3", [3]),
                                         ("0, 2", [0, 2]), ("none", [])])
def test_layer_selections_accept_indices_and_check_the_range(value, want):
    from kernels.capture import select_layers

    from rl.config_checks import check_layers

    assert select_layers(value, 4) == want
    cfg = load([f"learner.stats_layers='{value}'"])
    check_config(cfg)
    check_layers(cfg, num_layers=4)
    with pytest.raises(ValueError, match=r"learner.stats_layers: layer indices \[99\] out of range for 4 layers"):
        check_layers(load(["learner.stats_layers='99'"]), num_layers=4)


def test_steps_zero_and_keep_all_are_valid():
    check_config(load(["steps=0", "keep_last=0"]))


def test_stage_entry_points_check_the_layer_range_before_ray(tmp_path, monkeypatch):
    """launch.sft / launch.distill (stage_session): a layer beyond the model fails before Ray
    starts, as it does for launch.train."""
    import rl.cluster.runtime

    started = []
    monkeypatch.setattr(rl.cluster.runtime, "init_ray", started.append)  # records; starts nothing
    cfg = load([f"cache_dir={tmp_path}", f"output_dir={tmp_path}/out", "avar.layers='7'"])
    with pytest.raises(ValueError, match=r"avar.layers: layer indices \[7\] out of range for 4 layers"):
        with rl.cluster.runtime.stage_session(cfg):
            pass
    assert started == []
