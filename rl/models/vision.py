"""Images on the learner side: pixel values, and the image-pad expansion the model expects.

The rollout engine gets each prompt with ONE `<|image_pad|>` per image plus the PIL image and
expands it itself; the learner's forward needs the expanded ids (one pad per image token) and
the processed pixels. This module makes the second from the first, with the model folder's
own image processor (the one vLLM reads), so both sides see the same pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def image_processor_for(model_path: str) -> "ImageProcessor | None":
    """The processor of a vision-language model's folder; None for a text model."""
    from transformers import AutoConfig

    vl = getattr(AutoConfig.from_pretrained(model_path), "vision_config", None) is not None
    return ImageProcessor(model_path) if vl else None


@dataclass
class ImageInputs:
    """A prompt's images as the learner's forward takes them."""
    pixel_values: torch.Tensor     # [patches, C·T·P·P] float32, all images of the prompt
    image_grid_thw: torch.Tensor   # [images, 3] long
    tokens: list[int]              # image tokens per image (what one pad expands to)


class ImageProcessor:
    def __init__(self, model_path: str):
        from transformers import AutoConfig, AutoImageProcessor

        cfg = AutoConfig.from_pretrained(model_path)
        self.image_token_id = cfg.image_token_id
        self.processor = AutoImageProcessor.from_pretrained(model_path)
        self.merge = self.processor.merge_size

    def process(self, images: list) -> ImageInputs:
        out = self.processor(images=images, return_tensors="pt")
        grid = out["image_grid_thw"].long()
        tokens = (grid.prod(-1) // self.merge**2).tolist()
        return ImageInputs(out["pixel_values"].float(), grid, tokens)

    def expand(self, ids: list[int], per_position: list[list], tokens: list[int]):
        """Repeat each image pad (and the entries of every per-position list) by its image's
        token count. A prompt whose pad count differs from its image count is an error."""
        pads = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(pads) != len(tokens):
            raise ValueError(f"prompt has {len(pads)} image pad tokens but {len(tokens)} images")
        reps = [1] * len(ids)
        for pos, n in zip(pads, tokens):
            reps[pos] = n
        rep = lambda xs: [x for x, r in zip(xs, reps) for _ in range(r)]  # noqa: E731
        return rep(ids), [rep(xs) for xs in per_position]
