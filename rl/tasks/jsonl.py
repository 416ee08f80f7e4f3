"""`jsonl` (and the `gsm8k` / `math` presets): a real dataset read from JSONL or parquet.

The whole file is read and validated when the task is built, so a malformed row stops the
run at start-up with the file and line that need fixing, not hours later in a data worker.
Answers are normalised with the same extraction the `math` verifier applies to responses
(`rewards.answers`), so gold and prediction are read by one set of rules.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from rewards.answers import FINAL_MARK, extract_answer, strip_thousands
from rl.tasks.base import TEST, TRAIN, PromptBuilder, Sample, Task, check_split, is_heldout, stable_hash

INSTRUCTION = "Solve the problem. End with a final line '#### <answer>'.\n"

_CALC = re.compile(r"<<[^<>]*>>")         # GSM8K calculator annotations: 48/2 = <<48/2=24>>24
_SPACES = re.compile(r"\s+")


class DatasetError(ValueError):
    """A dataset file or row that cannot be used; the message starts with `path:line:`."""


ROLES = {"system": "system", "user": "evidence", "assistant": None}  # role -> token class


@dataclass
class Row:
    line: int            # 1-based line (JSONL) or row number (parquet)
    prompt: str          # the prompt text (a conversation's turns joined by newlines)
    answer: str
    solution: str
    messages: Optional[List[Tuple[str, str]]] = None   # a conversational row: (role, content)


def _messages(value: list, path: Path, line: int) -> List[Tuple[str, str]]:
    """A conversation given as the prompt: {"role", "content"} turns (system / user, and
    assistant turns of a few-shot prompt), ending with the user turn the model answers."""
    turns = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise DatasetError(f"{path}:{line}: message {i} must be {{'role': one of "
                               f"{sorted(ROLES)}, 'content': str}}, got {m!r:.80}")
        turns.append((m["role"], m["content"].strip()))
    if not turns or turns[-1][0] != "user":
        raise DatasetError(f"{path}:{line}: the messages must end with a user turn (the one the "
                           f"model answers), got roles {[r for r, _ in turns]}")
    return turns


def _records(path: Path) -> Iterator[Tuple[int, Any]]:
    """(1-based line, parsed object) for every non-blank row of a JSONL or parquet file."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DatasetError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        for i, rec in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, rec
        return
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{i}: invalid JSON ({exc.msg} at column {exc.colno})") from None


def _field(rec: dict, keys: Sequence[str], path: Path, line: int, types: tuple) -> Any:
    for key in keys:
        if key in rec:
            value = rec[key]
            if isinstance(value, bool) or not isinstance(value, types):
                names = " or ".join(t.__name__ for t in types)
                raise DatasetError(f"{path}:{line}: field '{key}' must be {names}, "
                                   f"got {type(value).__name__}")
            return value
    wanted = " or ".join(f"'{k}'" for k in keys)
    raise DatasetError(f"{path}:{line}: missing key {wanted} (row has {sorted(rec)})")


def normalize_answer(raw: str) -> str:
    """`... #### 1,000` -> `1000`; `... \\boxed{\\frac{1}{2}}.` -> `\\frac{1}{2}`; else trimmed."""
    final = extract_answer(raw)
    return strip_thousands(final if final is not None else raw.strip())


def worked_solution(text: str, answer: str) -> str:
    """A worked response in the house format: reasoning, then exactly one `#### answer` line."""
    body = _CALC.sub("", text)
    lines = [ln for ln in body.rstrip().splitlines() if not ln.lstrip().startswith(FINAL_MARK)]
    return "\n".join(lines + [f"{FINAL_MARK} {answer}"]).strip()


def load_rows(path: Path, prompt_keys: Sequence[str], answer_keys: Sequence[str],
              solution_keys: Sequence[str]) -> List[Row]:
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    rows = []
    for line, rec in _records(path):
        if not isinstance(rec, dict):
            raise DatasetError(f"{path}:{line}: expected a JSON object, got {type(rec).__name__}")
        prompt = _field(rec, prompt_keys, path, line, (str, list))
        messages = _messages(prompt, path, line) if isinstance(prompt, list) else None
        if messages:
            prompt = "\n".join(content for _, content in messages)
        raw_answer = str(_field(rec, answer_keys, path, line, (str, int, float)))
        answer = normalize_answer(raw_answer)
        if not prompt.strip() or not answer:
            raise DatasetError(f"{path}:{line}: empty prompt or answer")
        worked = next((rec[k] for k in solution_keys if isinstance(rec.get(k), str)), None)
        if worked is None:   # a worked answer field (GSM8K) is a solution; a bare "42" is not
            worked = raw_answer if extract_answer(raw_answer) is not None else ""
        rows.append(Row(line, prompt.strip(), answer, worked_solution(worked, answer), messages))
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def _as_keys(key: Optional[str], defaults: Tuple[str, ...]) -> Tuple[str, ...]:
    return (key,) if key else defaults


@dataclass
class JsonlTask(Task):
    """Rows of `path` (train) and `test_path` (held-out); without `test_path`, a
    `heldout_frac` share of the problems (by a hash of the prompt) is held out instead.
    Prompts that appear in the held-out file are dropped from train (contamination guard).
    Indices past the end wrap around, in a fresh seeded order per epoch for train.
    """
    path: str = ""
    test_path: Optional[str] = None
    # None: "question", "problem", "prompt", then "messages". A string, or a conversation: a
    # list of {"role": system|user|assistant, "content"} ending with the user turn; a
    # conversation is used as given (no `instruction` added: its system turn is the instruction).
    prompt_key: Optional[str] = None
    answer_key: Optional[str] = None       # None: "answer", then "solution"
    solution_key: Optional[str] = None     # None: "solution", then the answer field
    instruction: str = INSTRUCTION
    verifier: str = "math"
    heldout_frac: float = 0.1
    seed: int = 0
    name: str = "jsonl"
    _splits: Dict[str, List[Row]] = field(default_factory=dict, init=False, repr=False)
    _perm: Tuple[int, List[int]] = field(default=(-1, []), init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.path:
            raise DatasetError(f"task {self.name!r}: pass path=<file.jsonl|file.parquet>")
        keys = dict(prompt_keys=_as_keys(self.prompt_key, ("question", "problem", "prompt", "messages")),
                    answer_keys=_as_keys(self.answer_key, ("answer", "solution")),
                    solution_keys=_as_keys(self.solution_key, ("solution",)))
        train = load_rows(Path(self.path), **keys)
        if self.test_path:
            test = load_rows(Path(self.test_path), **keys)
            seen = {_canon(r.prompt) for r in test}
            train = [r for r in train if _canon(r.prompt) not in seen]
        else:
            if not 0.0 <= self.heldout_frac < 1.0:
                raise DatasetError(f"task {self.name!r}: heldout_frac must be in [0, 1)")
            flags = [is_heldout(self.name, _canon(r.prompt), self.heldout_frac) for r in train]
            test = [r for r, held in zip(train, flags) if held]
            train = [r for r, held in zip(train, flags) if not held]
            if not test and self.heldout_frac > 0:
                raise DatasetError(
                    f"{self.path}: heldout_frac={self.heldout_frac} of its {len(train)} rows "
                    f"holds out none, so there is nothing to evaluate on; pass test_path= or "
                    f"a larger heldout_frac")
        if not train:
            raise DatasetError(f"{self.path}: every row is also in {self.test_path}; no train rows")
        self._splits = {TRAIN: train, TEST: test}

    def num_samples(self, split: str) -> Optional[int]:
        return len(self._splits[check_split(split)])

    def _row_index(self, split: str, index: int) -> int:
        n = len(self._splits[split])
        if n == 0:
            raise IndexError(f"task {self.name!r} has no {split} rows")
        if index < 0:
            raise IndexError(f"negative index {index}")
        epoch, pos = divmod(index, n)
        if split == TEST:
            return pos
        if self._perm[0] != epoch:
            order = list(range(n))
            random.Random(stable_hash(self.name, self.seed, epoch)).shuffle(order)
            self._perm = (epoch, order)
        return self._perm[1][pos]

    def sample(self, split: str, index: int) -> Sample:
        check_split(split)
        i = self._row_index(split, index)
        row = self._splits[split][i]
        if row.messages:
            b = PromptBuilder()
            for role, content in row.messages:
                b.add_turn(role, content, ROLES[role])
        else:
            b = PromptBuilder().add(self.instruction, "system").add(row.prompt, "evidence").add("\n")
        source = self.test_path if split == TEST and self.test_path else self.path
        return Sample(uid=f"{self.name}-{split}-{i}", task=self.verifier, prompt=b.text,
                      answer=row.answer, solution=row.solution, segments=b.segments,
                      distractors=[], meta={"source": source, "line": row.line}, turns=b.turns)


def _canon(prompt: str) -> str:
    return _SPACES.sub(" ", prompt).strip().lower()


def gsm8k_preset(**params: Any) -> JsonlTask:
    """GSM8K rows: `question` (or a conversation in `messages` / `prompt`), and `answer` =
    worked text ending in `#### <number>`."""
    params = {"answer_key": "answer", "solution_key": "answer", **params}
    return JsonlTask(**{"name": "gsm8k", **params})


def math_preset(**params: Any) -> JsonlTask:
    """MATH rows: `problem` (or a conversation), `solution` with a `\\boxed{}` answer (and
    optionally `answer`)."""
    return JsonlTask(**{"name": "math", **params})
