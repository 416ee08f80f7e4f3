"""`arith`: multi-digit addition with column-by-column worked steps (the embedded default).

Why this task: a char-level model trained from scratch learns the step format in minutes of
supervised warm-start, but carries keep exact accuracy well below 100%, which leaves RL room
to improve. `digits`/`n_terms` set difficulty; `distractor_prob` injects a number that does
not take part in the sum, labelled, so LeaF-style confounder detection can be checked.

    prompt    "Add.\\n347+285\\n"          system "Add.\\n", evidence "347+285"
    solution  "7+5=12\\n4+8+1=13\\n3+2+1=6\\n#### 632"   (least significant column first)
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional, Tuple

from rl.tasks.base import PromptBuilder, ProceduralTask, Sample, check_prob, distractor_number

SYSTEM = "Add.\n"


def column_steps(terms: List[int]) -> Tuple[List[str], int]:
    """One line per column: the digits of that column, the incoming carry, and their sum."""
    width = max(len(str(t)) for t in terms)
    carry, lines = 0, []
    for col in range(width):
        digits = [int(str(t)[-1 - col]) for t in terms if col < len(str(t))]
        total = sum(digits) + carry
        lhs = "+".join(str(d) for d in digits) + (f"+{carry}" if carry else "")
        lines.append(f"{lhs}={total}")
        carry = total // 10
    return lines, sum(terms)


@dataclass
class ArithTask(ProceduralTask):
    digits: int = 3
    n_terms: int = 2
    distractor_prob: float = 0.0
    min_digits: Optional[int] = None     # None = every term has exactly `digits` digits
    seed: int = 0
    heldout_frac: float = 0.1

    name = "arith"
    verifier = "arith"
    max_digits = 12

    def __post_init__(self) -> None:
        self._check_common()
        lo = self.digits if self.min_digits is None else self.min_digits
        if not 1 <= lo <= self.digits <= self.max_digits:
            raise ValueError(f"{self.name}: need 1 <= min_digits <= digits <= {self.max_digits}, "
                             f"got {lo}, {self.digits}")
        if self.n_terms < 2:
            raise ValueError(f"{self.name}: n_terms must be >= 2, got {self.n_terms}")
        check_prob(self.name, "distractor_prob", self.distractor_prob)
        self._lo = lo

    def _draw(self, rng: random.Random) -> List[int]:
        terms = []
        for _ in range(self.n_terms):
            d = rng.randint(self._lo, self.digits)
            terms.append(rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1))
        return terms

    def _key(self, terms: List[int]) -> str:
        # Order-free: 285+347 is the same problem as 347+285 for split purposes.
        return "+".join(str(t) for t in sorted(terms))

    def _render(self, terms: List[int], rng: random.Random) -> Sample:
        expr = "+".join(str(t) for t in terms)
        b = PromptBuilder().add(SYSTEM, "system")
        where = rng.choice(("before", "after")) if rng.random() < self.distractor_prob else None
        noise = distractor_number(rng, self.digits)
        if where == "before":
            b.add(f"x={noise}", "distractor").add(" ")
        b.add(expr, "evidence")
        if where == "after":
            b.add(" ").add(f"(note {noise})", "distractor")
        b.add("\n")
        lines, total = column_steps(terms)
        answer = str(total)
        return Sample(uid="", task=self.verifier, prompt=b.text, answer=answer,
                      solution="\n".join(lines + [f"#### {answer}"]),
                      segments=b.segments, distractors=b.distractors,
                      meta={"terms": terms})
