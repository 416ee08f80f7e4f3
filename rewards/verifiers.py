"""Verifiers: `(response, answer, meta) -> float`, looked up by name.

A task names its verifier (`Sample.task`), a config names extra reward components, and the
reward pool's worker processes resolve both through `resolve()` — so a name, or a
`"package.module:function"` string for user code, is all that crosses a process boundary.
A malformed *response* scores 0.0 (that is the model's mistake); a malformed *reference*
(missing meta, unparsable gold answer) raises, because that is a pipeline bug worth counting.
"""
from __future__ import annotations

import importlib
import threading
from typing import Callable, Dict

from rewards.answers import extract_answer, final_line_answer, is_well_formed, last_boxed, strip_thousands
from rewards.expr import ExprError, evaluate

Verifier = Callable[[str, str, dict], float]

REGISTRY: Dict[str, Verifier] = {}


def register(*names: str) -> Callable[[Verifier], Verifier]:
    """Add a built-in verifier under one or more names."""
    def deco(fn: Verifier) -> Verifier:
        for name in names:
            if name in REGISTRY:
                raise ValueError(f"verifier {name!r} registered twice")
            REGISTRY[name] = fn
        return fn
    return deco


@register("exact", "arith", "chain")
def exact_match(response: str, answer: str, meta: dict) -> float:
    """1.0 when the last `####` line equals the reference exactly (after trimming spaces)."""
    got = final_line_answer(response)
    return 1.0 if got is not None and got == answer.strip() else 0.0


@register("countdown")
def countdown(response: str, answer: str, meta: dict) -> float:
    """1.0 when the `####` expression uses exactly `meta["numbers"]` and equals the target."""
    if "numbers" not in meta:
        raise ValueError("countdown verifier needs meta['numbers']")
    numbers = sorted(int(n) for n in meta["numbers"])
    target = int(meta.get("target", answer))
    expr = final_line_answer(response)
    if expr is None:
        return 0.0
    try:
        result = evaluate(expr)
    except ExprError:
        return 0.0
    if sorted(result.literals) != numbers:
        return 0.0
    return 1.0 if result.value == target else 0.0


@register("format")
def format_reward(response: str, answer: str, meta: dict) -> float:
    """1.0 when the response ends with exactly one well-formed `#### <answer>` line."""
    return 1.0 if is_well_formed(response) else 0.0


def _math_timeout() -> int | None:
    # math_verify times itself out with SIGALRM, which only the main thread may install;
    # elsewhere (a Ray actor's thread) rely on the reward pool's process-level timeout.
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse_math(text: str, timeout: int | None) -> list:
    import math_verify

    # Wrapping in \boxed{} makes math_verify read the whole string as one LaTeX answer:
    # a bare `3\sqrt{2}` would otherwise be read as the number 3.
    parsed = math_verify.parse("\\boxed{" + text + "}", parsing_timeout=timeout)
    return parsed or math_verify.parse(text, parsing_timeout=timeout)


@register("math", "gsm8k")
def math_equivalence(response: str, answer: str, meta: dict) -> float:
    """1.0 when the response's final answer is mathematically equal to the reference.

    The candidate is the `####` line, else the last `\\boxed{}`; if neither exists,
    math_verify's own extraction over the whole response is the fallback, so a correct
    but unformatted answer still counts here (the `format` component prices the format).
    """
    import math_verify

    timeout = _math_timeout()
    gold_text = extract_answer(answer) or answer.strip()
    gold = _parse_math(strip_thousands(gold_text), timeout)
    if not gold:
        raise ValueError(f"math verifier cannot parse the reference answer {answer[:80]!r}")
    candidate = final_line_answer(response) or last_boxed(response)
    if candidate is not None:
        pred = _parse_math(strip_thousands(candidate), timeout)
    else:
        pred = math_verify.parse(response, parsing_timeout=timeout)
    if not pred:
        return 0.0
    return 1.0 if math_verify.verify(gold, pred, timeout_seconds=timeout) else 0.0


_RESOLVED: Dict[str, Verifier] = {}


def resolve(spec: str) -> Verifier:
    """A registered name, or `"package.module:function"` imported on first use.

    Raises KeyError/ImportError/AttributeError with the spec in the message; call it at
    start-up to fail fast on a typo instead of scoring every sample 0.
    """
    fn = _RESOLVED.get(spec)
    if fn is not None:
        return fn
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ValueError(f"verifier spec {spec!r} must look like 'package.module:function'")
        module = importlib.import_module(module_name)
        try:
            fn = getattr(module, attr)
        except AttributeError:
            raise AttributeError(f"verifier spec {spec!r}: module {module_name!r} has no {attr!r}") from None
        if not callable(fn):
            raise TypeError(f"verifier spec {spec!r} is not callable")
    else:
        try:
            fn = REGISTRY[spec]
        except KeyError:
            raise KeyError(f"unknown verifier {spec!r}; known: {sorted(REGISTRY)} "
                           "or a 'package.module:function' string") from None
    _RESOLVED[spec] = fn
    return fn


def check_spec(spec: str) -> None:
    """Cheap validation without importing user code: registry names must exist."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ValueError(f"verifier spec {spec!r} must look like 'package.module:function'")
    elif spec not in REGISTRY:
        raise KeyError(f"unknown verifier {spec!r}; known: {sorted(REGISTRY)} "
                       "or a 'package.module:function' string")
