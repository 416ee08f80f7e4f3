"""Where the RL policy starts: the base model, then a supervised warm-start on worked solutions.

Both products are cached under `<cache>/` by a hash of the config that made them, written to a
temporary folder with a manifest (rl/loop/manifest.py) and renamed into place, so a crash never
leaves a half-written model that a later run would trust, a damaged one is rebuilt, and
seeds × methods sweeps share one cold start.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf
from tqdm import tqdm

from rl.algorithms.losses import SftLoss
from rl.loop.manifest import MANIFEST, verify, write_manifest
from rl.tasks.data import collate_sft, encode_prompt, train_samples_at
from rl.tasks.prompt_format import prompt_format
from rl.tasks import get_task
from rl.models.tiny_model import TinyModelSpec, build_tiny_model
from rl.models.tiny_vl import TinyVisionSpec, build_tiny_vl_model
from rl.models.vision import image_processor_for

log = logging.getLogger(__name__)


def config_hash(*parts) -> str:
    blob = json.dumps([OmegaConf.to_container(p, resolve=True) if OmegaConf.is_config(p) else p
                       for p in parts], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def reusable(final: Path) -> bool:
    """A cached folder can be used: it verifies against its manifest (sizes; checksums of files
    up to 64 MiB), or it was cached before manifests existed (no manifest: used as it is). A
    damaged one is removed, to be built again."""
    if not final.exists():
        return False
    if not (final / MANIFEST).exists():
        return True
    verdict = verify(final, "fast")
    if not verdict.intact:
        log.warning("cached %s is damaged (%s): building it again", final, verdict.describe())
        shutil.rmtree(final, ignore_errors=True)
    return verdict.intact


def atomic_dir(final: Path, build) -> Path:
    """Run build(tmp_dir), write its manifest and rename tmp_dir to `final`; a concurrent
    winner is kept."""
    if reusable(final):
        return final
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    write_manifest(tmp, kind=final.name.split("-")[0], step=None)
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    return final


def model_key(model) -> dict:
    """The model config as cache keys see it. A text model's leaves out the (null) vision
    block, so models and cold starts cached before vision-language models stay valid."""
    key = OmegaConf.to_container(model, resolve=True)
    if key.get("vision") is None:
        key.pop("vision", None)
    return key


def base_model_path(cfg, cache: Path) -> str:
    if cfg.model.path:
        return cfg.model.path
    spec = TinyModelSpec(**OmegaConf.to_container(cfg.model.tiny))
    if cfg.model.vision is None:
        final = cache / f"tiny-{config_hash(asdict(spec))}"
        return str(atomic_dir(final, lambda tmp: build_tiny_model(tmp, spec)))
    vision = TinyVisionSpec(**OmegaConf.to_container(cfg.model.vision))
    final = cache / f"tiny_vl-{config_hash(asdict(spec), asdict(vision))}"
    return str(atomic_dir(final, lambda tmp: build_tiny_vl_model(tmp, spec, vision)))


def num_layers(model_path: str) -> int:
    """Decoder layers of an HF folder (the text model's, for a vision-language model)."""
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    return int(cfg["num_hidden_layers"] if "num_hidden_layers" in cfg
               else cfg["text_config"]["num_hidden_layers"])


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def cold_start_on(cfg) -> bool:
    """cold_start.enabled, where null means: for a model built here (random weights), not for
    a checkpoint the user gives — peers start RL from the given weights, and so do we."""
    enabled = cfg.cold_start.enabled
    return (not cfg.model.path) if enabled is None else bool(enabled)


def run_cold_start(cfg, cache: Path, progress: bool = True, prefix: str = "cold_start") -> str:
    """The HF folder the RL stage starts from (the base model if cold start is disabled),
    trained on next-token likelihood or on a method's objective (AVAR's AGTO). The same code
    trains the tiny LeaF teacher (rl/methods/leaf/teacher.py, `prefix="teacher"`)."""
    from rl.methods import cold_start_objective

    base = base_model_path(cfg, cache)
    cs = cfg.cold_start
    if not cold_start_on(cfg):
        if cfg.model.path and cs.enabled is None:
            log.info("%s: off for the checkpoint given as model.path=%s (cold_start.enabled=true "
                     "fine-tunes it on the task's solutions first)", prefix.replace("_", " "), base)
        return base
    # Everything that shapes the cold-start weights, and nothing else (not eval settings).
    # The SFT data's task parameters enter as one dict, so an empty override keeps the key.
    params = sft_task_params(cfg)
    schedule = {k: v for k, v in OmegaConf.to_container(cs, resolve=True).items()
                if k not in ("task_params", "objective")}
    schedule["enabled"] = True  # (a bool when the cold starts cached so far were keyed)
    objective = cold_start_objective(cfg)
    # (the plain objective adds nothing, so checkpoints cached before AGTO existed stay valid)
    key = config_hash(model_key(cfg.model), cfg.task.name, params, cfg.task.seed, schedule,
                      *([objective.key] if objective else []))
    final = cache / f"{prefix}-{key}"
    if cs.reuse and reusable(final):
        log.info("%s: reusing %s", prefix.replace("_", " "), final)
        return str(final)

    shutil.rmtree(final, ignore_errors=True)
    return sft_stage(cfg, base, cs, params, objective, final, prefix, progress)


def sft_task_params(cfg) -> dict:
    """The task parameters of the cold start's SFT data: the task's, with
    `cold_start.task_params` on top (e.g. a share of distractors)."""
    return {**OmegaConf.to_container(cfg.task.params, resolve=True),
            **OmegaConf.to_container(cfg.cold_start.task_params, resolve=True)}


def sft_stage(cfg, start: str, schedule, params: dict, objective, final: Path, prefix: str,
              progress: bool) -> str:
    """Train `start` on the task's worked solutions (task parameters `params`) for
    `schedule` (an SftSchedule) on next-token likelihood or `objective`'s loss, and save it
    as `final` (atomic, with a manifest). The cold start, the tiny teacher and AVAR's AGTO
    stage (rl/methods/avar/agto.py) are this loop with different starts and schedules."""

    def build(tmp: Path) -> None:
        from rl.cluster.runtime import start_learner

        tok = load_tokenizer(start)
        images = image_processor_for(start)
        task = get_task(cfg.task.name, seed=cfg.task.seed, **params)
        fmt = prompt_format(cfg.model, tok)
        learner = start_learner(cfg, start, lr=schedule.lr, minibatch_size=schedule.batch_size)
        t0 = time.perf_counter()
        bar = tqdm(range(schedule.steps), desc=f"{prefix.replace('_', ' ')} (SFT)",
                   disable=not progress, dynamic_ncols=True)
        for step in bar:
            samples = train_samples_at(task, step * schedule.batch_size, schedule.batch_size)
            prompts = [encode_prompt(tok, s, fmt, images) for s in samples]
            responses = [tok(s.solution, add_special_tokens=False)["input_ids"]
                         + [tok.eos_token_id] for s in samples]
            learner.set_lr(lr_at(step, schedule.steps, schedule.lr, schedule.warmup_steps))
            batch = collate_sft(prompts, responses, tok.pad_token_id)
            if objective:
                batch.update(objective.inputs(batch))
            else:
                batch.pop("token_classes")
            m = learner.train_minibatch(batch, objective.loss if objective else SftLoss())
            bar.set_postfix({k: f"{m[k]:.3f}" for k in ("loss", "lm_nll", "agto_img", "agto_sys")
                             if k in m})
        learner.export_hf(str(tmp))
        learner.shutdown()
        log.info("%s: %d SFT steps in %.1f s", prefix, schedule.steps, time.perf_counter() - t0)
        if objective:  # its terms at the last step (AGTO: L_sys near log ε = system attention ≈ 0)
            log.info("%s: the last step's %s", prefix,
                     ", ".join(f"{k} {v:.3f}" for k, v in m.items() if k not in ("weights", "skipped")))

    return str(atomic_dir(final, build))
