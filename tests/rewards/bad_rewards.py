"""Reward functions that misbehave on purpose, importable by the pool's worker processes
as "tests.rewards.bad_rewards:<name>" (a test module cannot be, since workers are spawned)."""
from __future__ import annotations

import os
import time


def hang(response: str, answer: str, meta: dict) -> float:
    while True:          # a verifier stuck forever (think: sympy on a hostile expression)
        time.sleep(0.05)


def boom(response: str, answer: str, meta: dict) -> float:
    raise RuntimeError("boom: verifier bug")


def crash(response: str, answer: str, meta: dict) -> float:
    os._exit(3)          # the worker process dies mid-call (segfault stand-in)


def not_a_number(response: str, answer: str, meta: dict) -> float:
    return "high"        # type: ignore[return-value]


def length_bonus(response: str, answer: str, meta: dict) -> float:
    """A well-behaved user component: its value is easy to predict in a test."""
    return len(response) / 100.0


def hang_if_marked(response: str, answer: str, meta: dict) -> float:
    if meta.get("hang"):
        return hang(response, answer, meta)
    return 1.0


def hang_once(response: str, answer: str, meta: dict) -> float:
    """Hangs on the first call of a whole test session (marker file from the environment),
    then behaves: one timeout, deterministic values elsewhere."""
    marker = os.environ.get("BAD_REWARD_MARKER")
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        return hang(response, answer, meta)
    return 0.5
