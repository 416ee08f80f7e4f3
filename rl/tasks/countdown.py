"""`countdown`: combine the given numbers with + - * (each exactly once) to hit a target.

Why: unlike addition it has many correct answers, so the reward is verification rather than
string match; the target is built from a random expression tree over the numbers, so a
solution always exists.

    prompt    "Countdown.\\n12 3 5 -> 51\\n"          system "Countdown.\\n", evidence "12 3 5 -> 51"
    solution  "12+5=17\\n17*3=51\\n#### (12+5)*3"
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Tuple, Union

from rl.tasks.base import PromptBuilder, ProceduralTask, Sample, check_prob, distractor_number

SYSTEM = "Countdown.\n"
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}

Node = Union[int, Tuple[str, "Node", "Node"]]


def value(node: Node) -> Fraction:
    if isinstance(node, int):
        return Fraction(node)
    op, left, right = node
    a, b = value(left), value(right)
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else Fraction(10**9)}[op]


def integral(node: Node) -> bool:
    """Every intermediate is a non-negative integer, so the worked steps stay readable."""
    if isinstance(node, int):
        return True
    v = value(node)
    return v.denominator == 1 and v >= 0 and integral(node[1]) and integral(node[2])


def to_expr(node: Node, parent: str = "", right_side: bool = False) -> str:
    """Infix with only the parentheses the precedence rules need."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    text = to_expr(left, op) + op + to_expr(right, op, True)
    if parent and (_PREC[op] < _PREC[parent] or
                   (right_side and _PREC[op] == _PREC[parent] and parent in "-/")):
        return f"({text})"
    return text


def steps(node: Node, out: List[str]) -> None:
    """Post-order `a op b=v` lines: the order a person would compute the tree in."""
    if isinstance(node, int):
        return
    op, left, right = node
    steps(left, out)
    steps(right, out)
    out.append(f"{value(left)}{op}{value(right)}={value(node)}")


@dataclass
class CountdownTask(ProceduralTask):
    n_numbers: int = 3
    max_number: int = 20
    max_target: int = 200
    ops: str = "+-*"
    distractor_prob: float = 0.0
    seed: int = 0
    heldout_frac: float = 0.1

    name = "countdown"
    verifier = "countdown"

    def __post_init__(self) -> None:
        self._check_common()
        if self.n_numbers < 2:
            raise ValueError(f"countdown: n_numbers must be >= 2, got {self.n_numbers}")
        if self.max_number < 2 or self.max_target < 1:
            raise ValueError("countdown: need max_number >= 2 and max_target >= 1")
        if not self.ops or set(self.ops) - set(_PREC):
            raise ValueError(f"countdown: ops must be a non-empty subset of '+-*/', got {self.ops!r}")
        check_prob("countdown", "distractor_prob", self.distractor_prob)

    def _tree(self, nums: List[int], rng: random.Random) -> Node:
        if len(nums) == 1:
            return nums[0]
        k = rng.randint(1, len(nums) - 1)
        left, right = self._tree(nums[:k], rng), self._tree(nums[k:], rng)
        a, b = value(left), value(right)
        choices = [op for op in self.ops
                   if not (op == "-" and a < b) and not (op == "/" and (b == 0 or (a / b).denominator != 1))]
        if not choices:   # e.g. ops="-" with a < b: swap so subtraction stays non-negative
            left, right = right, left
            choices = ["-"] if "-" in self.ops else list(self.ops)
        return (rng.choice(choices), left, right)

    def _draw(self, rng: random.Random) -> Tuple[Node, List[int], int]:
        for _ in range(1000):
            nums = [rng.randint(1, self.max_number) for _ in range(self.n_numbers)]
            tree = self._tree(nums, rng)
            target = value(tree)
            if integral(tree) and 1 <= target <= self.max_target:
                shown = list(nums)
                rng.shuffle(shown)   # the prompt's order must not leak the tree's order
                return tree, shown, int(target)
        raise ValueError("countdown: no target within max_target in 1000 draws; raise max_target")

    def _key(self, problem: Tuple[Node, List[int], int]) -> str:
        _, nums, target = problem
        return f"{sorted(nums)}->{target}"

    def _render(self, problem: Tuple[Node, List[int], int], rng: random.Random) -> Sample:
        tree, nums, target = problem
        b = PromptBuilder().add(SYSTEM, "system")
        where = rng.choice(("before", "after")) if rng.random() < self.distractor_prob else None
        noise = distractor_number(rng, len(str(self.max_number)))
        if where == "before":
            b.add(f"x={noise}", "distractor").add(" ")
        b.add(" ".join(map(str, nums)) + f" -> {target}", "evidence")
        if where == "after":
            b.add(" ").add(f"(note {noise})", "distractor")
        b.add("\n")
        lines: List[str] = []
        steps(tree, lines)
        return Sample(uid="", task=self.verifier, prompt=b.text, answer=str(target),
                      solution="\n".join(lines + [f"#### {to_expr(tree)}"]),
                      segments=b.segments, distractors=b.distractors,
                      meta={"numbers": nums, "target": target})
