"""Tokenizing samples and collating rollouts into a RolloutBatch.

The trainer tokenizes (not vLLM), so each prompt token's class — system, evidence, distractor —
comes from the sample's character spans through the tokenizer's offsets, and stays aligned
with the ids the engines and the learner see.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from rl.batch import TOKEN_CLASS, RolloutBatch
from rl.tasks.prompt_format import PLAIN, PromptFormat
from rl.tasks import Sample
from rl.models.vision import ImageInputs, ImageProcessor


def train_samples_at(task, start: int, n: int) -> list[Sample]:
    """Train samples at data positions start..start+n-1. Positions never run out: finite
    datasets wrap around in a fresh order per epoch (inside the task), so a run's data order
    is a pure function of the position, which is what makes resume exact."""
    return [task.sample("train", i) for i in range(start, start + n)]


@dataclass
class EncodedPrompt:
    sample: Sample
    ids: list[int]
    classes: list[int]
    # Positions inside the sample's own text (not what the chat template or the model's
    # prompt_prefix/response_prefix adds): the tokens LeaF may call confounders.
    in_text: list[bool] | None = None
    # A vision-language prompt: `ids` have each image pad expanded to the image's tokens (what
    # the learner reads); the engine gets `engine_ids` (one pad per image) and the images.
    engine_ids: list[int] | None = None
    image_inputs: ImageInputs | None = None

    @property
    def request(self) -> dict:
        """What a rollout engine is sent for this prompt."""
        if self.image_inputs is not None:
            return {"prompt_token_ids": self.engine_ids, "images": list(self.sample.images)}
        return {"prompt_token_ids": self.ids}


def encode_prompt(tokenizer, sample: Sample, fmt: PromptFormat = PLAIN,
                  images: ImageProcessor | None = None) -> EncodedPrompt:
    """Token ids and per-token classes of the sample's prompt as `fmt` renders it (the model's
    chat template, or prefix + prompt + suffix); with `images` (a vision-language model's
    processor) also the pixel values, pads expanded."""
    if sample.images and images is None:
        raise ValueError(f"{sample.uid}: the task draws images but the model is text-only "
                         "(use a vision-language model, e.g. model=tiny_vl)")
    if images is not None and not sample.images:
        raise ValueError(f"{sample.uid}: a vision-language model needs an image in every "
                         "prompt and this one has none (use an image task, e.g. task=image_arith)")
    text, placed = fmt.render(tokenizer, sample)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labelled = [(TOKEN_CLASS[name], spans) for name, spans in sample.segments.items()
                if name in TOKEN_CLASS]
    labelled.append((TOKEN_CLASS["distractor"], sample.distractors))
    classes, in_text = [], []
    for start, end in enc["offset_mapping"]:
        # A subword's leading space separates; the word it carries says where it belongs (a
        # template's "] " before a turn's text must not pull " sys" out of the turn).
        piece = text[start:end]
        at = start + len(piece) - len(piece.lstrip()) if piece.strip() else start
        pos = next((p.prompt_start + at - p.text_start for p in placed
                    if p.text_start <= at < p.text_start + p.length), None)
        c = TOKEN_CLASS["other"]
        for cls, spans in labelled:
            if pos is not None and any(s <= pos < e for s, e in spans):
                c = cls
        classes.append(c)
        in_text.append(pos is not None)
    ids = list(enc["input_ids"])
    if images is None:
        return EncodedPrompt(sample, ids, classes, in_text)
    inputs = images.process(sample.images)
    try:
        expanded, (classes, in_text) = images.expand(ids, [classes, in_text], inputs.tokens)
    except ValueError as exc:
        raise ValueError(f"{sample.uid}: {exc}") from None
    return EncodedPrompt(sample, expanded, classes, in_text, engine_ids=ids, image_inputs=inputs)


def image_fields(prompts: list[EncodedPrompt], rows_per_prompt: list[int]) -> dict:
    """pixel_values [B, patches, D] and image_grid_thw [B, images, 3] for rows made from
    `prompts` (prompt i giving rows_per_prompt[i] rows); {} for a text model. Every prompt of
    a batch must give the same image shapes (a task draws fixed-size images)."""
    if prompts[0].image_inputs is None:
        return {}
    shapes = {tuple(p.image_inputs.pixel_values.shape) for p in prompts}
    if len(shapes) > 1:
        raise ValueError(f"images of one batch must have one size; got pixel shapes {sorted(shapes)}")
    rep = lambda x: torch.stack([t for t, n in zip(x, rows_per_prompt) for _ in range(n)])  # noqa: E731
    return {"pixel_values": rep([p.image_inputs.pixel_values for p in prompts]),
            "image_grid_thw": rep([p.image_inputs.image_grid_thw for p in prompts])}


def check_prompt_lengths(prompts: list[EncodedPrompt], max_model_len: int) -> None:
    """A prompt must leave the engine room for at least one response token; vLLM would
    otherwise refuse it in the middle of a step. Names the row so the data can be fixed."""
    for p in prompts:
        if len(p.ids) >= max_model_len:
            s = p.sample
            where = f"{s.meta['source']}:{s.meta['line']}" if "line" in s.meta else s.uid
            raise ValueError(
                f"{where}: prompt is {len(p.ids)} tokens, rollout.max_model_len={max_model_len} "
                f"leaves no room for a response; raise rollout.max_model_len or drop the row")


def pad_rows(rows: list[list], value, dtype) -> torch.Tensor:
    """Right-padded [len(rows), longest] (one tensor built from all values: a tensor per row
    cost ~20 ms per 256-response step)."""
    lengths = torch.tensor([len(r) for r in rows])
    out = torch.full((len(rows), int(lengths.max())), value, dtype=dtype)
    out[torch.arange(out.shape[1]) < lengths[:, None]] = torch.tensor(
        list(itertools.chain.from_iterable(rows)), dtype=dtype)
    return out


def collate_rollouts(prompts: list[EncodedPrompt], completions: list[list], pad_id: int,
                     first_group: int = 0) -> RolloutBatch:
    """One row per (prompt, completion): prompt ⊕ response, right-padded.

    `completions[i]` are the n completions (token_ids, logprobs) of `prompts[i]`.
    """
    ids, attn, resp, lps, classes, groups, meta = [], [], [], [], [], [], []
    for g, (p, comps) in enumerate(zip(prompts, completions)):
        for c in comps:
            n_p, n_r = len(p.ids), len(c.token_ids)
            ids.append(p.ids + list(c.token_ids))
            attn.append([1] * (n_p + n_r))
            resp.append([0] * n_p + [1] * n_r)
            lps.append([0.0] * n_p + list(c.logprobs))
            classes.append(p.classes + [TOKEN_CLASS["response"]] * n_r)
            groups.append(first_group + g)
            meta.append({"uid": p.sample.uid, "answer": p.sample.answer, "task": p.sample.task,
                         "sample_meta": p.sample.meta, "finish_reason": c.finish_reason,
                         "prompt_len": n_p, "prompt": p})
    b = len(ids)
    return RolloutBatch(
        input_ids=pad_rows(ids, pad_id, torch.long),
        attention_mask=pad_rows(attn, 0, torch.bool),
        response_mask=pad_rows(resp, 0, torch.bool),
        sampler_logprobs=pad_rows(lps, 0.0, torch.float32),
        token_classes=pad_rows(classes, 0, torch.int8),
        group_ids=torch.tensor(groups, dtype=torch.long),
        rewards=torch.zeros(b),
        token_weights=pad_rows([[1.0] * len(r) for r in ids], 1.0, torch.float32),
        meta=meta,
        **image_fields(prompts, [len(c) for c in completions]),
    )


def collate_sft(prompts: list[EncodedPrompt], responses: list[list[int]], pad_id: int):
    """Prompt ⊕ worked solution ⊕ eos, with the loss on the solution tokens only."""
    ids = [p.ids + r for p, r in zip(prompts, responses)]
    resp = [[0] * len(p.ids) + [1] * len(r) for p, r in zip(prompts, responses)]
    return {
        "input_ids": pad_rows(ids, pad_id, torch.long),
        "attention_mask": pad_rows([[1] * len(x) for x in ids], 0, torch.bool),
        "response_mask": pad_rows(resp, 0, torch.bool),
        "token_classes": pad_rows([p.classes + [TOKEN_CLASS["response"]] * len(r)
                                   for p, r in zip(prompts, responses)], 0, torch.int8),
        **image_fields(prompts, [1] * len(prompts)),
    }
