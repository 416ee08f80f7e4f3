"""LeaF's unit of data: an input, a reference continuation, and the positions LeaF may prune.

Instruction level (§2.1): the input is the prompt, the continuation the worked solution, the
prunable region the prompt's own text (not what the model's chat template adds). Response level
(§2.2): earlier response text becomes context — the input is prompt ⊕ the first segments of
the solution, the continuation the rest, and the region that response prefix.

Everything is token ids, so the same example feeds the gradient pass, the counterfactual
prompts (ids with a span deleted), the engines (greedy validation) and the KD loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from rl.batch import TOKEN_CLASS
from rl.tasks.data import encode_prompt, pad_rows
from rl.tasks.prompt_format import PLAIN, PromptFormat
from rl.methods.leaf.confounders import prune
from rl.tasks import Sample

Span = tuple[int, int]


@dataclass
class Example:
    sample: Sample
    input_ids: list[int]            # what precedes the continuation (prompt [+ response prefix])
    input_classes: list[int]        # TOKEN_CLASS per input position
    region: list[bool]              # input positions LeaF may call confounders
    continuation: list[int]         # reference tokens the losses are taken on (ends with eos)
    removed: list[Span] = field(default_factory=list)  # spans deleted (counterfactuals only)

    @property
    def is_counterfactual(self) -> bool:
        return bool(self.removed)


def instruction_example(tok, sample: Sample, fmt: PromptFormat = PLAIN) -> Example:
    p = encode_prompt(tok, sample, fmt)
    continuation = tok(sample.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return Example(sample, p.ids, p.classes, list(p.in_text), continuation)


def response_example(tok, sample: Sample, fmt: PromptFormat = PLAIN, segments: int = 2) -> Example | None:
    """The solution's lines split into `segments` parts: the first part becomes context (the
    prunable region), the rest is the continuation. None when the solution has too few lines
    to leave both parts non-empty (its final `####` line always stays in the continuation)."""
    lines = sample.solution.split("\n")
    head = math.ceil((len(lines) - 1) / segments)
    if head < 1 or head >= len(lines):
        return None
    p = encode_prompt(tok, sample, fmt)
    context = tok("\n".join(lines[:head]) + "\n", add_special_tokens=False)["input_ids"]
    rest = tok("\n".join(lines[head:]), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return Example(sample, p.ids + context, p.classes + [TOKEN_CLASS["response"]] * len(context),
                   [False] * len(p.ids) + [True] * len(context), rest)


def counterfactuals(ex: Example, spans: list[Span], mode: str) -> list[Example]:
    """One example per span with that span deleted (mode "span", §2.2), or one with every
    span deleted ("collective"). Ids, classes and region are cut alike."""
    ids = prune(ex.input_ids, spans, mode)
    classes = prune(ex.input_classes, spans, mode)
    region = prune(ex.region, spans, mode)
    return [replace(ex, input_ids=i, input_classes=c, region=r, removed=removed)
            for (i, removed), (c, _), (r, _) in zip(ids, classes, region)]


def batch_tensors(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [B, T] tensors of input ⊕ continuation; `response_mask` = the continuation
    (where losses and LeaF's cross-entropy are taken), `region` = prunable input positions."""
    ids = [e.input_ids + e.continuation for e in examples]
    return {
        "input_ids": pad_rows(ids, pad_id, torch.long),
        "attention_mask": pad_rows([[1] * len(x) for x in ids], 0, torch.bool),
        "response_mask": pad_rows([[0] * len(e.input_ids) + [1] * len(e.continuation)
                                   for e in examples], 0, torch.bool),
        "region": pad_rows([[int(r) for r in e.region] + [0] * len(e.continuation)
                            for e in examples], 0, torch.bool),
    }


def distractor_labels(examples: list[Example], width: int) -> torch.Tensor:
    """[B, T] True on input positions of the task's labelled distractor spans (ground truth)."""
    rows = [[c == TOKEN_CLASS["distractor"] for c in e.input_classes] for e in examples]
    out = torch.zeros(len(examples), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.bool)
    return out
