"""`chain`: evaluate a chain of variable assignments, ignoring the irrelevant ones.

Why a third task: arith and countdown put all the evidence in one span; here the evidence is
several statements that must be followed in order, and distractor statements look exactly
like evidence (`d=a+5` even reads a real variable) but do not reach the queried variable.
That makes it the natural check for LeaF-style confounder detection and for "evidence"
attention (AVAR): the labelled spans say precisely which tokens matter.

    prompt    "Vars.\\nk=3;q=k+4;d=k+5;m=q*2\\nm?\\n"   evidence: each relevant statement,
                                                         distractors: ";d=k+5" (with its
                                                         separator), query: "m?"
    solution  "k=3\\nq=3+4=7\\nm=7*2=14\\n#### 14"
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import List, Tuple

from rl.tasks.base import PromptBuilder, ProceduralTask, Sample, check_prob

SYSTEM = "Vars.\n"

Step = Tuple[str, int]    # (op, constant); the chain's first variable has op "="


def apply(op: str, a: int, c: int) -> int:
    return a + c if op == "+" else a - c if op == "-" else a * c


@dataclass
class ChainTask(ProceduralTask):
    n_vars: int = 3
    max_value: int = 99
    ops: str = "+-*"
    distractor_prob: float = 0.0
    n_distractors: int = 1        # statements injected when a sample gets distractors
    shuffle: bool = False         # statements in random order: the model must search
    seed: int = 0
    heldout_frac: float = 0.1

    name = "chain"
    verifier = "chain"

    def __post_init__(self) -> None:
        self._check_common()
        if self.n_vars < 1 or self.n_vars + self.n_distractors > 26:
            raise ValueError("chain: need n_vars >= 1 and n_vars + n_distractors <= 26")
        if self.max_value < 9 or not self.ops or set(self.ops) - set("+-*"):
            raise ValueError("chain: need max_value >= 9 and ops a non-empty subset of '+-*'")
        if self.n_distractors < 0:
            raise ValueError("chain: n_distractors must be >= 0")
        check_prob("chain", "distractor_prob", self.distractor_prob)

    def _draw(self, rng: random.Random) -> Tuple[int, List[Step]]:
        for _ in range(1000):
            start = rng.randint(1, 9)
            value, steps = start, []
            for _ in range(self.n_vars - 1):
                options = []
                for op in self.ops:
                    consts = range(2, 4) if op == "*" else range(1, 10)
                    options += [(op, c) for c in consts if 0 <= apply(op, value, c) <= self.max_value]
                if not options:       # e.g. ops="*" ran past max_value: start over
                    break
                op, c = rng.choice(options)
                value = apply(op, value, c)
                steps.append((op, c))
            if len(steps) == self.n_vars - 1:
                return start, steps
        raise ValueError("chain: cannot build a chain within max_value with these ops")

    def _key(self, problem: Tuple[int, List[Step]]) -> str:
        start, steps = problem   # letter names are surface form, not part of the problem
        return f"{start}" + "".join(f"{op}{c}" for op, c in steps)

    def _render(self, problem: Tuple[int, List[Step]], rng: random.Random) -> Sample:
        start, steps = problem
        n_noise = self.n_distractors if rng.random() < self.distractor_prob else 0
        names = rng.sample(string.ascii_lowercase, self.n_vars + n_noise)
        chain, noise_names = names[: self.n_vars], names[self.n_vars:]

        statements: List[Tuple[str, bool]] = [(f"{chain[0]}={start}", True)]
        work, value = [f"{chain[0]}={start}"], start
        for i, (op, c) in enumerate(steps, start=1):
            new = apply(op, value, c)
            statements.append((f"{chain[i]}={chain[i - 1]}{op}{c}", True))
            work.append(f"{chain[i]}={value}{op}{c}={new}")
            value = new
        for name in noise_names:
            # Reads a real variable (but is never read), inserted after that variable exists.
            src = chain[rng.randrange(self.n_vars)]
            pos = next(i for i, (t, rel) in enumerate(statements) if rel and t.startswith(src + "="))
            statements.insert(rng.randint(pos + 1, len(statements)), (f"{name}={src}+{rng.randint(1, 9)}", False))
        if self.shuffle:
            rng.shuffle(statements)

        b = PromptBuilder().add(SYSTEM, "system")
        skip_sep = False
        for i, (text, relevant) in enumerate(statements):
            sep = ";" if i and not skip_sep else ""
            skip_sep = False
            if relevant:
                b.add(sep).add(text, "evidence")
            elif sep or i == len(statements) - 1:
                b.add(sep + text, "distractor")   # with its separator: deleting the span
            else:                                 # leaves a well-formed chain (LeaF's oracle)
                b.add(text + ";", "distractor")
                skip_sep = True
        b.add("\n").add(f"{chain[-1]}?", "query").add("\n")
        answer = str(value)
        return Sample(uid="", task=self.verifier, prompt=b.text, answer=answer,
                      solution="\n".join(work + [f"#### {answer}"]),
                      segments=b.segments, distractors=b.distractors,
                      meta={"variables": chain, "distractor_variables": noise_names})
