"""The README's commands, read from the README itself, and how the smoke suite shortens them.

Every line of a ```bash block in README.md that runs one of our entry points (`python -m
launch.*`, or `make run`, which is `python -m launch.train`) is a command users will paste.
The suite runs each one as they would (same argument text, through bash, from the repository
root), with `SHORTEN` appended so that it takes seconds: few steps, tiny batches, a tiny eval,
a short cold start shared by every command of the same task. Editing the README edits the suite.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

# Appended to every Hydra command (the last value of a key wins). They shrink the run, never
# change what it exercises: the README's own keys (task, algorithm, credit, ranks, engines,
# ZeRO stage, resume, experiment preset) are kept.
# The short cold start teaches the answer format, not the task, so the format reward counts
# (weight 0.5): samples that differ in format give every step a learning signal to check.
SHORTEN = [
    "steps=2", "eval_every=2", "save_every=2", "task.eval_size=4", "rollout.eval_samples=2",
    "cold_start.steps=40", "cold_start.batch_size=16", "cold_start.warmup_steps=4",
    "algorithm.prompts_per_step=2", "algorithm.n_samples=4", "algorithm.minibatch_size=8",
    "rollout.max_new_tokens=40", "reward.components.format=0.5",
    "teacher.train.steps=40", "teacher.train.batch_size=16", "teacher.train.warmup_steps=4",
    "distill.steps=2", "distill.batch_size=8", "distill.detect_samples=16",
    "logger.progress=false", "logger.mode=offline",
]
# A `resume=true` command continues the run before it by one more step.
SHORTEN_RESUME = ["steps=3"]
# Arguments that need hardware or files this machine does not have (the GPU example): the
# command is still run, and must fail before any actor starts, naming what is missing.
NEEDS_GPU = re.compile(r"model=qwen3_")


@dataclass(frozen=True)
class Command:
    text: str      # as written in the README (continuations joined, comment dropped)
    line: int      # README line where it starts
    entry: str     # launch.train | launch.sft | launch.distill | launch.inspect | launch.verify

    @property
    def sweep(self) -> bool:
        return " -m " in f" {self.text} ".replace(" -m launch.", " ")

    @property
    def gpu_only(self) -> bool:
        return bool(NEEDS_GPU.search(self.text))

    @property
    def hydra(self) -> bool:
        return self.entry in ("launch.train", "launch.sft", "launch.distill")

    def shortened(self) -> str:
        if not self.hydra:
            return self.text
        extra = SHORTEN + (SHORTEN_RESUME if "resume=true" in self.text.split() else [])
        return f"{self.text} {' '.join(extra)}"

    def id(self) -> str:
        return f"L{self.line}:" + re.sub(r"[^\w=.,:-]+", "_", self.text.split(" -m ", 1)[-1])[:70]


ENTRY = re.compile(r"^(?:python -m (launch\.\w+)|make run)\b")


def commands(readme: Path = README) -> list[Command]:
    """Every entry-point command in the README's bash blocks, in README order."""
    out, in_block, pending, start = [], False, "", 0
    for n, raw in enumerate(readme.read_text().splitlines(), start=1):
        line = raw.strip()
        if line.startswith("```"):
            in_block, pending = line.startswith("```bash"), ""
            continue
        if not in_block or not line:
            continue
        if not pending:
            start = n
        line = re.sub(r"\s+#.*$", "", line) if not line.startswith("#") else ""
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        text, pending = (pending + line).strip(), ""
        m = ENTRY.match(text)
        if not m:
            continue
        if text.startswith("make run"):  # the Makefile's run target (checked in the suite)
            text = "python -m launch.train" + text[len("make run"):]
        out.append(Command(text=text, line=start, entry=m.group(1) or "launch.train"))
    return out
