"""What a task is: a deterministic map (split, index) -> Sample, with disjoint splits.

Determinism matters twice: a resumed run must see the same problems at the same data
position, and every rank/actor can rebuild a sample from its uid-like coordinates instead of
shipping text around. Disjointness is decided per *problem* (a hash of its canonical key),
never per index, so no train index can ever produce a held-out problem.
"""
from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

Span = Tuple[int, int]

TRAIN, TEST = "train", "test"

# An image in a prompt, in the Qwen-VL convention our vision-language models read: ONE pad
# token per image (the model side expands it to the image's token count).
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
SPLITS = (TRAIN, TEST)


@dataclass
class Sample:
    """One problem as the model sees it, plus the labels the credit methods need.

    `segments` and `distractors` are character spans `[start, end)` into `prompt`:
    AVAR contrasts attention to "evidence" with attention to "system" tokens, and LeaF's
    confounder detection can be scored against the injected `distractors`.
    """
    uid: str
    task: str                       # also the verifier name in rewards/
    prompt: str
    answer: str
    solution: str                   # worked response ending in the line "#### <answer>"
    segments: Dict[str, List[Span]] = field(default_factory=dict)
    distractors: List[Span] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)
    # PIL images of a vision-language task, one per `IMAGE_PAD` in `prompt`, in order.
    images: List[Any] = field(default_factory=list)
    # Chat turns as (role, start, end) spans of `prompt`, for a conversational row (a system
    # and a user turn): a model's chat template renders each as its own message. Empty: the
    # whole prompt is one user turn.
    turns: List[Tuple[str, int, int]] = field(default_factory=list)

    def segment_text(self, key: str) -> List[str]:
        return [self.prompt[s:e] for s, e in self.segments.get(key, [])]


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


def stable_hash(*parts: object) -> int:
    """A 64-bit hash that, unlike `hash()`, is the same in every process and Python run."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def is_heldout(task_name: str, key: str, heldout_frac: float) -> bool:
    """Whether a problem (by canonical key) belongs to the held-out split.

    Independent of the seed on purpose: changing the seed reshuffles which problems a run
    trains on but never moves a problem across the train/held-out boundary.
    """
    return stable_hash("heldout", task_name, key) / 2.0**64 < heldout_frac


class Task(ABC):
    """A source of samples. `name` selects it in the registry; `verifier` scores it."""

    name: str = ""
    verifier: str = ""

    @abstractmethod
    def sample(self, split: str, index: int) -> Sample:
        """The sample at `index` of `split`; the same arguments always give the same sample."""

    def num_samples(self, split: str) -> Optional[int]:
        """How many distinct samples `split` has; None for an unbounded generator."""
        return None

    def dataset(self, split: str, n: Optional[int] = None, start: int = 0) -> List[Sample]:
        """Samples `start .. start+n-1` of `split` (for a finite dataset, at most all of it)."""
        size = self.num_samples(check_split(split))
        if n is None:
            if size is None:
                raise ValueError(f"task {self.name!r} is unbounded: pass n")
            n = size - start
        if size is not None:
            n = max(0, min(n, size - start))
        return [self.sample(split, start + i) for i in range(n)]


class PromptBuilder:
    """Concatenates prompt pieces and records labelled spans as it goes, so the spans
    are right by construction rather than recomputed with `str.find`."""

    def __init__(self) -> None:
        self._parts: List[str] = []
        self._len = 0
        self.segments: Dict[str, List[Span]] = {}
        self.distractors: List[Span] = []
        self.images: List[Any] = []
        self.turns: List[Tuple[str, int, int]] = []

    def add(self, text: str, label: Optional[str] = None) -> "PromptBuilder":
        start, self._len = self._len, self._len + len(text)
        self._parts.append(text)
        if label == "distractor":
            self.distractors.append((start, self._len))
        elif label is not None:
            self.segments.setdefault(label, []).append((start, self._len))
        return self

    def add_turn(self, role: str, text: str, label: Optional[str] = None) -> "PromptBuilder":
        """A chat turn. A model with a chat template reads each turn as its own message; one
        without reads the turns joined by newlines."""
        if self.turns:
            self.add("\n")
        start = self._len
        self.add(text, label)
        self.turns.append((role, start, self._len))
        return self

    def add_image(self, image) -> "PromptBuilder":
        """An image at this point of the prompt; its pad token is labelled "image"."""
        self.images.append(image)
        return self.add(VISION_START).add(IMAGE_PAD, "image").add(VISION_END)

    @property
    def text(self) -> str:
        return "".join(self._parts)


MAX_DRAWS = 10_000


class ProceduralTask(Task):
    """A generated task: draw a problem from an RNG seeded by (seed, split, index, attempt),
    and redraw until the problem's held-out hash matches the requested split.

    Subclasses set `name`/`verifier`, and implement `_draw` (the problem), `_key` (its
    canonical identity, excluding surface noise such as distractors) and `_render`.
    """

    seed: int = 0
    heldout_frac: float = 0.1

    def _check_common(self) -> None:
        if not 0.0 < self.heldout_frac < 1.0:
            raise ValueError(f"{self.name}: heldout_frac must be in (0, 1), got {self.heldout_frac}")

    @abstractmethod
    def _draw(self, rng: random.Random) -> Any: ...

    @abstractmethod
    def _key(self, problem: Any) -> str: ...

    @abstractmethod
    def _render(self, problem: Any, rng: random.Random) -> Sample:
        """Build the sample (uid is filled in by `sample`)."""

    def sample(self, split: str, index: int) -> Sample:
        want_test = check_split(split) == TEST
        if index < 0:
            raise IndexError(f"negative index {index}")
        for attempt in range(MAX_DRAWS):
            rng = random.Random(stable_hash(self.name, self.seed, split, index, attempt))
            problem = self._draw(rng)
            key = self._key(problem)
            if is_heldout(self.name, key, self.heldout_frac) == want_test:
                out = self._render(problem, rng)
                return replace(out, uid=f"{self.name}-{split}-{self.seed}-{index}",
                               meta={**out.meta, "problem_key": key})
        raise ValueError(f"{self.name}: no {split} problem found in {MAX_DRAWS} draws; "
                         "the problem space is too small for heldout_frac")


def check_prob(name: str, key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: {key} must be in [0, 1], got {value}")


def distractor_number(rng: random.Random, digits: int) -> str:
    """A number shaped like the real operands, so it is a plausible confounder."""
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return str(rng.randint(lo, 10 ** digits - 1))
