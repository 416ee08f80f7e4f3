"""Rewards: verifiers by name and a process pool that runs them with timeouts.

This package must never import `rl` (DESIGN.md: dependencies point one way).
"""
from rewards.pool import RewardPool
from rewards.types import RewardItem, RewardResult, summarize
from rewards.verifiers import REGISTRY, register, resolve

__all__ = ["RewardPool", "RewardItem", "RewardResult", "summarize", "REGISTRY", "register", "resolve"]
