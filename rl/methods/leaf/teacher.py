"""The LeaF teacher: where its weights come from, and the Ray actors that serve it.

`teacher=tiny` is built and trained here by the cold-start SFT code (on the run's task with
`teacher.train.task_params` overrides, e.g. distractors) and cached like the cold start;
`teacher=hf` is an HF folder. Either way it must share the student's tokenizer: LeaF compares
gradients per prompt token and distributions per vocabulary id, both meaningless across
tokenizers. It is frozen and served behind the scoring half of the engine boundary
(`ScoringEngine`): log-probs, and the probes LeaF hands it (input-embedding gradient norms,
top-k next-token log-probs).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import ray
import torch
from omegaconf import OmegaConf

from rl.engine.frozen import FrozenModel

log = logging.getLogger(__name__)


def teacher_path(cfg, cache: Path, progress: bool = True) -> str | None:
    """The teacher's HF folder (training the tiny teacher first if it is not cached)."""
    t = cfg.teacher
    if t.name == "none":
        return None
    if t.name == "hf":
        return t.path
    from rl.loop.cold_start import run_cold_start

    tcfg = OmegaConf.merge(cfg, {
        "model": {"path": None, "tiny": OmegaConf.to_container(t.tiny, resolve=True)},
        "cold_start": {"enabled": True, "steps": t.train.steps, "batch_size": t.train.batch_size,
                       "lr": t.train.lr, "warmup_steps": t.train.warmup_steps, "reuse": True},
        "avar": {"name": "none"}})  # next-token likelihood, whatever the student's objective
    tcfg.cold_start.task_params = t.train.task_params  # replaces (merge would keep old keys)
    return run_cold_start(tcfg, cache, progress, prefix="teacher")


def student_vocab_size(student_path: str, teacher: str) -> int:
    """The student's vocabulary size, after checking the teacher shares its tokenizer.

    Same token → id map required (a clear error otherwise, at start-up). A teacher with a
    larger embedding matrix over the same tokenizer (padded rows) is fine: its distributions
    are cut to the student's ids."""
    from transformers import AutoConfig, AutoTokenizer

    s_tok, t_tok = AutoTokenizer.from_pretrained(student_path), AutoTokenizer.from_pretrained(teacher)
    if s_tok.get_vocab() != t_tok.get_vocab():
        s_v, t_v = s_tok.get_vocab(), t_tok.get_vocab()
        diff = sorted(set(s_v.items()) ^ set(t_v.items()))[:5]
        raise ValueError(
            f"teacher {teacher} and student {student_path} have different tokenizers "
            f"({len(t_v)} vs {len(s_v)} tokens; first differences {diff}): LeaF needs the "
            "student's tokenizer in the teacher")
    s_n = AutoConfig.from_pretrained(student_path).vocab_size
    t_n = AutoConfig.from_pretrained(teacher).vocab_size
    if t_n < s_n:
        raise ValueError(f"teacher vocab_size {t_n} < student vocab_size {s_n}")
    return s_n


class TeacherWorker:
    """One teacher actor (a full copy of the frozen model)."""

    def __init__(self, path: str, dtype: str, vocab_size: int, torch_threads: int):
        torch.set_num_threads(torch_threads)
        self.model = FrozenModel(path, dtype, vocab_size=vocab_size)

    def call(self, method: str, *args, **kwargs):
        return getattr(self.model, method)(*args, **kwargs)


class TeacherGroup:
    """The teacher's own actors (`teacher.num_actors`); every call splits rows over them.

    A colocated teacher (`learner` given) is served by the learner ranks instead, each
    holding a copy next to the policy; the calls and results are the same."""

    def __init__(self, path: str, tcfg, dtype: str, vocab_size: int, learner=None):
        self.path, self.owned = path, learner is None
        if learner is not None:  # the learner ranks hold it as their frozen model "teacher"
            self.workers = learner.workers
            self.call = lambda w, *a: w.call_frozen.remote("teacher", *a)
            return
        remote = ray.remote(num_cpus=tcfg.num_cpus_per_actor)(TeacherWorker)
        self.workers = [remote.remote(path, dtype, vocab_size, tcfg.torch_threads)
                        for _ in range(tcfg.num_actors)]
        self.call = lambda w, *a: w.call.remote(*a)

    def _split(self, method: str, tensors: dict[str, torch.Tensor], *args):
        n = len(tensors["input_ids"])
        parts = [p for p in np.array_split(np.arange(n), len(self.workers)) if len(p)]
        outs = ray.get([self.call(w, method, {k: v[p] for k, v in tensors.items()}, *args)
                        for w, p in zip(self.workers, parts)])
        if isinstance(outs[0], tuple):
            return tuple(torch.cat(xs) for xs in zip(*outs))
        if isinstance(outs[0], dict):
            return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
        return torch.cat(outs)

    def score(self, tensors, temperature: float = 1.0) -> dict[str, torch.Tensor]:
        return self._split("score", tensors, temperature)

    def probe(self, tensors, probe):
        return self._split("probe", tensors, probe)

    def shutdown(self) -> None:
        if self.owned:
            for w in self.workers:
                ray.kill(w)
        self.workers = []

