"""Tasks: deterministic sources of prompts with verifiable answers.

    task = get_task("arith", seed=1234, digits=3)
    sample = task.sample("train", index)        # or task.dataset("test", 200)
    sample.task                                  # the verifier name for rewards/

A new task is one module here plus one line in TASKS (and a conf/task/ file).
"""
from __future__ import annotations

from typing import Any, Callable, Dict

from rl.tasks.arith import ArithTask
from rl.tasks.base import SPLITS, TEST, TRAIN, Sample, Task
from rl.tasks.chain import ChainTask
from rl.tasks.countdown import CountdownTask
from rl.tasks.image_arith import ImageArithTask
from rl.tasks.jsonl import DatasetError, JsonlTask, gsm8k_preset, math_preset

TASKS: Dict[str, Callable[..., Task]] = {
    "arith": ArithTask,
    "countdown": CountdownTask,
    "chain": ChainTask,
    "image_arith": ImageArithTask,
    "jsonl": JsonlTask,
    "gsm8k": gsm8k_preset,
    "math": math_preset,
}


def get_task(name: str, **params: Any) -> Task:
    """Build a task by registry name; unknown names and parameters fail naming the culprit."""
    try:
        factory = TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}") from None
    try:
        return factory(**params)
    except TypeError as exc:
        raise TypeError(f"task {name!r}: {exc}") from None


__all__ = ["TASKS", "get_task", "Task", "Sample", "SPLITS", "TRAIN", "TEST", "DatasetError",
           "ArithTask", "CountdownTask", "ChainTask", "ImageArithTask", "JsonlTask"]
