"""Rewards for benchmarks whose models are random: a verifier scores every response 0, so every
advantage is 0, every update a no-op, and an exact-resume check would compare zeros. These give
each response a different, deterministic reward, so the updates and their comparison are real."""
from __future__ import annotations


def digit_share(response: str, answer: str, meta: dict) -> float:
    """The share of the response's characters that are digits (what an arithmetic answer is
    made of; a random model's responses differ in it)."""
    return sum(c.isdigit() for c in response) / max(1, len(response))
