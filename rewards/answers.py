"""Pulling the final answer out of a response or a reference solution.

One module owns these rules so the task loaders (`rl/tasks/`, which normalise dataset answers)
and the verifiers (which read model responses) cannot drift apart: a reference answer is
extracted with exactly the code that later reads the model's answer.
"""
from __future__ import annotations

import re

FINAL_MARK = "####"

_FINAL_LINE = re.compile(r"^[ \t]*####[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


def final_line_answer(text: str) -> str | None:
    """The content of the last `#### ...` line, or None when there is none or it is empty.

    The last one wins because a model may restate a wrong draft before correcting itself;
    grading the last commitment is what the format asks the model to produce.
    """
    matches = _FINAL_LINE.findall(text)
    if not matches:
        return None
    answer = matches[-1].strip()
    return answer or None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), matching nested braces.

    A regex cannot match balanced braces, and MATH answers such as `\\frac{1}{\\sqrt{2}}`
    nest them, so this scans characters. Unbalanced braces (a truncated response) give None.
    """
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            ch = text[i]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
        # unbalanced: try the previous \boxed
    return None


def strip_thousands(answer: str) -> str:
    """`1,000` -> `1000`; GSM8K-style answers sometimes carry separators the model omits."""
    s = answer.strip()
    return s.replace(",", "") if _THOUSANDS.match(s) else s


def extract_answer(text: str) -> str | None:
    """The final answer of a worked text: the `####` line first, else the last `\\boxed{}`."""
    answer = final_line_answer(text)
    if answer is not None:
        return answer
    return last_boxed(text)


def is_well_formed(response: str) -> bool:
    """True when the last non-blank line is `#### <answer>` and is the only final-answer line.

    Several `####` lines mean the model kept going after committing; rewarding that would
    teach it to pad responses, so the format reward requires exactly one, at the end.
    """
    lines = [ln for ln in response.splitlines() if ln.strip()]
    if not lines:
        return False
    last = lines[-1].strip()
    if not last.startswith(FINAL_MARK + " "):
        return False
    content = last[len(FINAL_MARK):].strip()
    if not content or FINAL_MARK in content:
        return False
    return sum(1 for ln in lines if ln.lstrip().startswith(FINAL_MARK)) == 1
