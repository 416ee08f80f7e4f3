"""How a sample's prompt becomes the text the model reads: the model folder's chat template
(`tokenizer.apply_chat_template`, as every peer renders prompts), or — for a folder without
one (the tiny char-level model) — `model.prompt_prefix + prompt + model.response_prefix`.

Either way the rendered text comes back with where each piece of the sample's prompt landed in
it, so the token classes that AVAR and LeaF read (system / evidence / distractor) are taken
from the sample's own character spans, and what the template adds around them (`<|im_start|>`,
role names, the generation prompt) is class "other" and never prunable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rl.tasks import Sample


@dataclass(frozen=True)
class Placed:
    """`length` characters of the sample's prompt from `prompt_start` sit at `text_start` of
    the rendered text."""
    text_start: int
    prompt_start: int
    length: int


@dataclass(frozen=True)
class PromptFormat:
    prefix: str = ""
    suffix: str = ""
    chat_template: bool = False
    # Passed to the template (e.g. Qwen3's {"enable_thinking": False}); model.chat_template_kwargs.
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    def render(self, tokenizer, sample: Sample) -> tuple[str, list[Placed]]:
        if not self.chat_template:
            return (self.prefix + sample.prompt + self.suffix,
                    [Placed(len(self.prefix), 0, len(sample.prompt))])
        turns = sample.turns or [("user", 0, len(sample.prompt))]
        messages = [{"role": role, "content": sample.prompt[s:e]} for role, s, e in turns]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **self.template_kwargs)
        placed, cursor = [], 0
        for (role, s, e), m in zip(turns, messages):
            # Templates that trim a turn (Llama's `| trim`) keep its stripped text verbatim.
            content = m["content"]
            lead = len(content) - len(content.lstrip())
            for piece, start in ((content, s), (content.strip(), s + lead)):
                at = text.find(piece, cursor)
                if at >= 0:
                    placed.append(Placed(at, start, len(piece)))
                    cursor = at + len(piece)
                    break
            else:
                raise ValueError(
                    f"{sample.uid}: the chat template rewrites the {role} turn (its text is not "
                    "in the rendered prompt), so its tokens' classes cannot be placed")
        return text, placed


def prompt_format(model_cfg, tokenizer) -> PromptFormat:
    """The model's format: its folder's chat template when it has one (then the prefix keys,
    which stand in for a template, must be empty), else `model.prompt_prefix`/`response_prefix`."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    kwargs = dict(model_cfg.get("chat_template_kwargs") or {})
    if has_template and (model_cfg.prompt_prefix or model_cfg.response_prefix):
        raise ValueError(
            f"model.prompt_prefix/response_prefix stand in for a chat template, and the folder "
            f"{model_cfg.path} has one (prompts are rendered with it): set both to ''")
    if kwargs and not has_template:
        raise ValueError(f"model.chat_template_kwargs={kwargs} given, but the model folder has "
                         "no chat template to pass them to")
    return PromptFormat(model_cfg.prompt_prefix or "", model_cfg.response_prefix or "",
                        has_template, kwargs)


PLAIN = PromptFormat()
