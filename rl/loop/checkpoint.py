"""Checkpoints: written whole or not at all, verified before use, the last N kept.

Layout of `<output_dir>/checkpoints/step_000020/`:
    ds/                   DeepSpeed state of every rank (model, optimizer)
    hf/                   HF export (safetensors + tokenizer) that vLLM/transformers load
    trainer_state.json    step, data position, metrics history position, RNG seeds
    rollouts_in_flight.json  batches started for later steps (rollout.async_steps > 0), with the
                          policy version that sampled them
    manifest.json         every file above with its size and checksum (rl/loop/manifest.py),
                          written last
Everything is written into `.tmp-step_000020/` first, its manifest last, and renamed when
complete; older checkpoints are pruned only once the new one has verified. A resume takes the
newest checkpoint that verifies against its manifest and says which ones it skipped and why.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from rl.loop.manifest import Verdict, verify, write_manifest

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{6})$")
EARLIER = ".earlier-run"  # a fresh run's predecessor's checkpoints, until its own first one
KIND = "rl_step"  # the manifest's kind: a trainer checkpoint (learner + trainer state)
REQUIRED = ("trainer_state.json", "hf/config.json")


class CheckpointDamaged(RuntimeError):
    """Checkpoints exist but none verifies: resuming from any of them would load garbage."""


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, keep_last: int = 2, verify_mode: str = "full"):
        self.root = Path(root)
        self.keep_last = keep_last
        self.verify_mode = verify_mode
        self.root.mkdir(parents=True, exist_ok=True)

    def list(self) -> list[Path]:
        """Every step folder, oldest first, intact or not (temp folders are not listed)."""
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if (m := STEP_DIR.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def set_aside(self) -> int:
        """A fresh run (resume=false) where an earlier run left checkpoints: they move to
        `.earlier-run/`, so neither keep-last nor a later resume mistakes them for this run's
        (a higher step of theirs would outrank its own), and are removed once this run's first
        checkpoint verifies. Returns how many moved."""
        old = self.list()
        if old:
            aside = self.root / EARLIER
            shutil.rmtree(aside, ignore_errors=True)
            aside.mkdir()
            for ckpt in old:
                os.rename(ckpt, aside / ckpt.name)
        return len(old)

    def verify(self, ckpt: Path, mode: str | None = None) -> Verdict:
        """`ckpt` against its manifest, and the manifest against what a checkpoint holds."""
        verdict = verify(ckpt, mode or self.verify_mode, REQUIRED)
        if verdict.step is not None and f"step_{verdict.step:06d}" != ckpt.name:
            verdict.problems.append(f"the manifest is of step {verdict.step}, not {ckpt.name}")
        if verdict.intact and not any(f.startswith("ds/") for f in verdict.files):
            verdict.problems.append("no learner state (ds/) in the manifest")
        return verdict

    def newest_intact(self) -> Path | None:
        """The newest checkpoint that verifies, each newer one skipped with a warning saying
        why; None when there is none at all; CheckpointDamaged when none of them verifies."""
        damaged = []
        for ckpt in reversed(self.list()):
            verdict = self.verify(ckpt)
            if verdict.intact:
                if damaged:
                    log.warning("resuming from %s, the newest intact checkpoint (%.1f s to verify)",
                                ckpt.name, verdict.seconds)
                return ckpt
            log.warning("checkpoint %s skipped: %s", ckpt, verdict.describe())
            damaged.append(verdict)
        if damaged:
            lines = "\n".join(f"  {v.path.name}: {v.describe()}" for v in damaged)
            raise CheckpointDamaged(
                f"none of the {len(damaged)} checkpoints in {self.root} is intact:\n"
                f"{lines}\nNothing was started. To look closer: python -m launch.verify "
                f"{self.root.parent}. To start this run over, move {self.root} away; to keep "
                f"them and start a new run, give another name= or output_dir=.")
        return None

    def save(self, step: int, state: dict, write_learner) -> tuple[Path, dict[str, float]]:
        """`write_learner(tmp_dir)` writes the learner's parts; then the trainer state, the
        manifest, the rename; then the new checkpoint is verified and only then are old ones
        pruned. Returns the folder and the seconds each part took."""
        final = self.root / f"step_{step:06d}"
        tmp = self.root / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        write_learner(tmp)
        with open(tmp / "trainer_state.json", "w") as f:
            json.dump(state, f, indent=1)
        t1 = time.perf_counter()
        write_manifest(tmp, KIND, step)
        t2 = time.perf_counter()
        if final.exists():  # re-saving the same step (e.g. a resumed run's last step)
            shutil.rmtree(final)
        os.rename(tmp, final)
        verdict = self.verify(final)
        times = {"write_s": t1 - t0, "manifest_s": t2 - t1, "verify_s": verdict.seconds}
        if not verdict.intact:
            log.error("checkpoint %s does not verify right after it was written (%s): the older "
                      "checkpoints are kept; check the disk", final, verdict.describe())
            return final, times
        for old in self.list()[: -self.keep_last] if self.keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.root / EARLIER, ignore_errors=True)
        return final, times

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
