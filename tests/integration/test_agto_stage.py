"""AVAR's AGTO as a stage after the LM cold start (`avar.agto_at=stage`), through the real
learner (DeepSpeed ranks in Ray actors): it starts from the cold start's weights (not the
built model's random ones), trains AGTO's terms down on the task's own prompts, is cached by
what shapes it, and its system set (`avar.system`) is part of that key.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from rl.config import register_configs

CONF = str(Path(__file__).resolve().parents[2] / "conf")
register_configs()
pytestmark = pytest.mark.timeout(1800)


def stage_cfg(cache: Path, extra=()):
    overrides = [
        f"cache_dir={cache}", "logger=none", "logger.progress=false", "experiment=avar_arith",
        "task.params.digits=1", "cold_start.steps=24", "cold_start.batch_size=16",
        "cold_start.warmup_steps=2", "avar=agto", "avar.agto_at=stage",
        "avar.agto_stage.batch_size=8", "avar.agto_stage.warmup_steps=0", "learner.num_ranks=2",
        *extra]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def weights(path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.detach().double() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def agto_terms(path: str, cfg) -> tuple[float, float]:
    """(L_img, L_sys) of the stage's first batch under `path`'s weights, from the kernels'
    key-class masses (tests/unit/test_avar_scores.py holds them equal to eager maps)."""
    from transformers import AutoModelForCausalLM

    from kernels import StatsSpec
    from kernels.capture import AttentionCapture
    from rl.loop.cold_start import load_tokenizer
    from rl.methods.avar.agto import agto_inputs
    from rl.methods.avar.scores import AgtoConfig, agto_loss
    from rl.tasks import get_task
    from rl.tasks.data import collate_sft, encode_prompt, train_samples_at

    tok = load_tokenizer(path)
    task = get_task(cfg.task.name, seed=cfg.task.seed, **cfg.task.params)
    samples = train_samples_at(task, 0, 8)
    b = collate_sft([encode_prompt(tok, s) for s in samples],
                    [tok(s.solution, add_special_tokens=False)["input_ids"] for s in samples],
                    tok.pad_token_id)
    b.update(agto_inputs(b, AgtoConfig(system=cfg.avar.system)))
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    cap = AttentionCapture(model, layers="all", spec=StatsSpec(n_classes=2), impl="blockwise")
    with torch.no_grad(), cap(key_classes=b["key_classes"]) as st:
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long())
    l_img, l_sys = agto_loss({layer: s.mass for layer, s in st.items()}, b["query_mask"],
                             b["key_classes"])
    return float(l_img.mean()), float(l_sys.mean())


def test_agto_stage_starts_from_the_cold_start_trains_its_terms_and_is_cached(tmp_path, ray_session):
    from rl.loop.cold_start import base_model_path, run_cold_start
    from rl.methods import build_methods

    cache = tmp_path / "cache"
    cfg = stage_cfg(cache, ["avar.agto_stage.steps=2", "avar.agto_stage.lr=1e-9"])
    (avar,) = [m for m in build_methods(cfg) if m.name == "vars"]
    assert avar.cold_start_objective() is None  # the cold start itself is the plain LM one
    cold = run_cold_start(cfg, cache, progress=False)
    base = base_model_path(cfg, cache)

    # at a vanishing learning rate the stage's weights are the cold start's, not the base's
    frozen = avar.before_rl(cold, False)
    assert Path(frozen).name.startswith("agto_stage-") and Path(frozen).parent == cache
    w_base, w_cold, w_frozen = weights(base), weights(cold), weights(frozen)
    assert max((w_frozen[k] - w_cold[k]).abs().max() for k in w_cold) < 1e-6
    assert max((w_cold[k] - w_base[k]).abs().max() for k in w_cold) > 1e-2

    # a real stage lowers both AGTO terms on its own prompts (more evidence, less system
    # attention from the user turn), and is reused, not retrained, by a second run
    cfg = stage_cfg(cache, ["avar.agto_stage.steps=8", "avar.agto_stage.lr=3e-3"])
    (avar,) = [m for m in build_methods(cfg) if m.name == "vars"]
    staged = avar.before_rl(cold, False)
    assert staged != frozen
    (img0, sys0), (img1, sys1) = agto_terms(cold, cfg), agto_terms(staged, cfg)
    assert img1 < img0 and sys1 < sys0, ((img0, sys0), (img1, sys1))
    stamp = (Path(staged) / "model.safetensors").stat().st_mtime_ns
    assert avar.before_rl(cold, False) == staged
    assert (Path(staged) / "model.safetensors").stat().st_mtime_ns == stamp

    # the system set shapes the stage: the authors' template prefix is another checkpoint
    cfg = stage_cfg(cache, ["avar.agto_stage.steps=2", "avar.agto_stage.lr=1e-9",
                            "avar.system=template_prefix:0.4"])
    (avar,) = [m for m in build_methods(cfg) if m.name == "vars"]
    assert avar.before_rl(cold, False) not in (frozen, staged)
