"""Checkpoints: written whole or not at all, the last N kept, found again on resume.

Layout of `<output_dir>/checkpoints/step_000020/`:
    ds/                   DeepSpeed state of every rank (model, optimizer)
    hf/                   HF export (safetensors + tokenizer) that vLLM/transformers load
    trainer_state.json    step, data position, metrics history position, RNG seeds
    rollouts_in_flight.json  batches started for later steps (rollout.async_steps > 0), with the
                          policy version that sampled them
Everything is written into `.tmp-step_000020/` first and renamed when complete: a crash
mid-write leaves only a temp folder, which `latest()` never returns.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

STEP_DIR = re.compile(r"^step_(\d{6})$")


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last
        self.root.mkdir(parents=True, exist_ok=True)

    def list(self) -> list[Path]:
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if (m := STEP_DIR.match(p.name)) and (p / "trainer_state.json").exists()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        ckpts = self.list()
        return ckpts[-1] if ckpts else None

    def save(self, step: int, state: dict, write_learner) -> Path:
        """`write_learner(tmp_dir)` writes the learner's parts; then the state, then rename."""
        final = self.root / f"step_{step:06d}"
        tmp = self.root / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_learner(tmp)
        with open(tmp / "trainer_state.json", "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving the same step (e.g. a resumed run's last step)
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in self.list()[: -self.keep_last] if self.keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load_state(ckpt: Path) -> dict:
        with open(ckpt / "trainer_state.json") as f:
            return json.load(f)


# What makes two runs the same run: a resumed run may change its length, logging and
# evaluation, not what it trains (these keys), or its checkpoints would not fit it.
RUN_IDENTITY = ("seed", "model", "task", "cold_start", "credit", "reward", "distill", "leaf", "teacher.name",
                "teacher.path", "teacher.tiny", "teacher.train", "algorithm.advantage",
                "algorithm.std_normalize", "algorithm.n_samples", "algorithm.prompts_per_step",
                "learner.num_ranks", "learner.zero_stage", "rollout.async_steps")


def _flat(d, prefix=""):
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_same_run(saved_config: Path, config: dict) -> None:
    """Before resuming: the output dir's run (its config.yaml) must be this command's run.
    Raises naming the keys that differ, instead of loading one run's state into another."""
    from omegaconf import OmegaConf

    if not saved_config.exists():
        return
    saved = OmegaConf.to_container(OmegaConf.load(saved_config), resolve=True)
    old, new = _flat(saved), _flat(config)
    differ = sorted(k for k in set(old) | set(new)
                    if any(k == i or k.startswith(i + ".") for i in RUN_IDENTITY)
                    and old.get(k) != new.get(k))
    if differ:
        shown = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in differ[:6])
        raise ValueError(
            f"resume=true: {saved_config.parent} holds a different run ({shown}). Repeat that "
            f"run's settings (its config.yaml) to continue it, or start a new run with another "
            f"name= or output_dir=.")
