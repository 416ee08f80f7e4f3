"""A safe evaluator for the small arithmetic expressions of countdown answers.

Model output is untrusted text, so it is never handed to `eval`: this recursive-descent parser
accepts only non-negative integer literals, `+ - * /`, parentheses and spaces, evaluates
exactly with `Fraction` (so `7/2*2` is 7, not 7.000000001), and caps the input size so a
pathological response cannot make the verifier slow.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

MAX_CHARS = 200
MAX_DEPTH = 32
MAX_LITERAL_DIGITS = 9

_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()]))")


class ExprError(ValueError):
    """The text is not an expression this evaluator accepts (or is too large)."""


@dataclass(frozen=True)
class Evaluated:
    value: Fraction
    literals: tuple[int, ...]   # every number written in the expression, in order


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    stripped = text.rstrip()
    while pos < len(stripped):
        m = _TOKEN.match(stripped, pos)
        if not m:
            raise ExprError(f"unexpected character {stripped[pos:].lstrip()[:1]!r} at {pos}")
        num, op = m.groups()
        if num is not None and len(num) > MAX_LITERAL_DIGITS:
            raise ExprError(f"number too long: {num[:12]}...")
        tokens.append(num if num is not None else op)
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.i = 0
        self.literals: list[int] = []

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise ExprError("unexpected end of expression")
        self.i += 1
        return tok

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self, depth: int) -> Fraction:
        value = self.atom(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.atom(depth)
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                raise ExprError("division by zero")
            else:
                value = value / rhs
        return value

    def atom(self, depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise ExprError("parentheses nested too deeply")
        tok = self.take()
        if tok == "(":
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise ExprError("missing ')'")
            return value
        if tok.isdigit():
            self.literals.append(int(tok))
            return Fraction(int(tok))
        raise ExprError(f"unexpected {tok!r}")


def evaluate(text: str) -> Evaluated:
    """Parse and evaluate `text`; raises ExprError for anything outside the grammar."""
    if len(text) > MAX_CHARS:
        raise ExprError(f"expression longer than {MAX_CHARS} characters")
    tokens = _tokenize(text)
    if not tokens:
        raise ExprError("empty expression")
    parser = _Parser(tokens)
    value = parser.expr(0)
    if parser.peek() is not None:
        raise ExprError(f"unexpected {parser.peek()!r} after a complete expression")
    return Evaluated(value=value, literals=tuple(parser.literals))
