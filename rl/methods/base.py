"""What a method may do in an RL step: the one interface that credit strategies, LeaF in RL,
AVAR (VARS, VAS, AGTO) and the next method implement. Every hook is optional; the trainer calls
each enabled method's hooks at fixed points of the step and names none of them.

    cold_start_objective()             what it adds to the cold start (AGTO)
    before_rl(policy, progress)        a stage between the cold start and RL (distillation)
    setup(run)                         the run's facts: the policy's depth, steps, seed
    learner_options() / start / stop   what it loads beside the learner; its own actors
    scoring_request() / key_classes()  what the scoring forward captures for it
    after_rewards(batch, step, tools)  extra rows or groups; loss terms with their rows
    shape_rewards(batch, step)         rewards from the scored batch, before advantages
    token_weights(batch, step)         γ_t from the scored batch and its advantages
    evaluate(batch, tools)             figures from the greedy held-out responses
    draw(...) / draw_eval(...)         its tables and plots

Metrics a hook returns are logged under the method's `name` ("credit/…"); the seconds its
step hooks take as time/<name>_s and, with the statistics pass when it reads one,
time/<name>_share of the step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rl.batch import RolloutBatch


@dataclass(frozen=True)
class RunInfo:
    num_layers: int      # decoder layers of the policy RL starts from
    steps: int           # RL steps of the run


@dataclass
class Tools:
    """What a hook may use of the running system (rebuilt after a learner restart)."""
    learner: Any                  # rl.cluster.learner_group.LearnerGroup: score, probe, ...
    tok: Any
    temperature: float           # the rollout temperature (scoring forwards use it too)
    # prompts, sampling seeds, first group id → their rollouts, collated and rewarded
    roll: Callable[[list, list[int], int], RolloutBatch]
    # continuations of token-id prefixes by the rollout engines at the rollout temperature
    # (rl/algorithms/mc_values.py Sampler: prefixes, K, seeds, token budgets)
    sample: Callable[[list, int, list[int], list[int]], list]
    max_new_tokens: int          # a response's token budget


@dataclass
class ExtraRows:
    """A loss term on rows of its own (e.g. LeaF's KD rows): the policy loss's forward carries
    them, and the update deals them out over its minibatches."""
    term: Any                     # rl.algorithms.losses.DistillTerm or alike: name, bind, __call__
    rows: dict[str, torch.Tensor]


@dataclass
class ColdStartObjective:
    """A cold start's loss beyond next-token likelihood (AVAR's AGTO)."""
    loss: Any                     # rl.engine.base.Loss
    inputs: Callable[[dict], dict]  # what the loss reads beside the tokens, from an SFT batch
    key: dict                     # what makes its checkpoints differ (the cold start cache key)


@dataclass
class AfterRewards:
    batch: RolloutBatch
    extra_rows: list[ExtraRows] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


class Method:
    name: str = "method"
    reads_statistics: bool = False  # its cost includes the statistics pass

    def cold_start_objective(self) -> ColdStartObjective | None:
        return None

    def before_rl(self, policy: str, progress: bool) -> str:
        """The policy RL starts from, given the cold start's (offline distillation)."""
        return policy

    def setup(self, run: RunInfo) -> None:
        pass

    def learner_options(self) -> dict:
        """Keyword arguments for the learner group (e.g. a teacher loaded in each rank)."""
        return {}

    def start(self, tools: Tools) -> None:
        """The learner group is up (again, after a restart): start what reads through it."""

    def stop(self) -> None:
        pass

    def scoring_request(self) -> dict | None:
        """StatsSpec keyword arguments + "layers" (indices) for the scoring forward."""
        return None

    def key_classes(self, batch: RolloutBatch) -> torch.Tensor | None:
        """[B, T] key-class ids for the class masses it asks for (one reader at most)."""
        return None

    def after_rewards(self, batch: RolloutBatch, step: int, tools: Tools) -> AfterRewards:
        return AfterRewards(batch)

    def shape_rewards(self, batch: RolloutBatch, step: int) -> dict[str, float]:
        return {}

    def token_weights(self, batch: RolloutBatch, step: int) -> dict[str, float]:
        return {}

    def evaluate(self, batch: RolloutBatch, tools: Tools) -> dict[str, float]:
        return {}

    def draw(self, tracker, tok, batch: RolloutBatch, rows: int, step: int) -> None:
        pass

    def draw_eval(self, tracker, evals: dict, step: int) -> None:
        """At every evaluation, the one before RL (step 0) included."""

    def summary(self, before: dict, after: dict) -> dict:
        """Run-summary figures from the evaluations before and after RL."""
        return {}


def own_layers(stats: dict | None, layers: list[int]) -> dict | None:
    """A method's layers of the scoring forward's statistics (which hold every reader's)."""
    if not stats or not layers:
        return None
    return {layer: stats[layer] for layer in layers}
