"""The tiny VLM's vision tower comes out of `build_tiny_vl_model` pretrained on the glyphs
(the stand-in for a real VLM's pretrained vision encoder): its image features tell glyphs
apart on strips it never saw, read by a nearest-class-mean rule (not the discarded training
head), and far better than the same tower left random."""
from __future__ import annotations

import random

import torch

from rl.tasks.image_arith import GLYPHS, draw_expression
from rl.models.tiny_model import TinyModelSpec
from rl.models.tiny_vl import TinyVisionSpec, build_image_processor, build_tiny_vl_model


def glyph_features(tower, strips, rng):
    x = build_image_processor()(images=[draw_expression(t, len(t), rng) for t in strips],
                                return_tensors="pt")
    with torch.no_grad():
        feats = tower(x["pixel_values"].float(), grid_thw=x["image_grid_thw"]).pooler_output
    return feats, torch.tensor([GLYPHS.index(c) for t in strips for c in t])


def nearest_mean_accuracy(model_dir, seed=7) -> float:
    from transformers import Qwen2_5_VLForConditionalGeneration

    tower = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).model.visual.eval()
    rng = random.Random(seed)   # strips unlike the build's (seed 0): new pixels, new strings
    strips = lambda n: ["".join(rng.choice(GLYPHS) for _ in range(6)) for _ in range(n)]  # noqa: E731
    fit_x, fit_y = glyph_features(tower, strips(40), rng)
    means = torch.stack([fit_x[fit_y == k].mean(0) for k in range(len(GLYPHS))])
    test_x, test_y = glyph_features(tower, strips(40), rng)
    return (torch.cdist(test_x, means).argmin(-1) == test_y).float().mean().item()


def test_pretrained_tower_tells_glyphs_apart(tmp_path):
    spec = TinyModelSpec()
    pretrained = build_tiny_vl_model(tmp_path / "pre", spec, TinyVisionSpec())
    random_tower = build_tiny_vl_model(tmp_path / "rand", spec, TinyVisionSpec(pretrain_steps=0))
    acc_pre, acc_rand = nearest_mean_accuracy(pretrained), nearest_mean_accuracy(random_tower)
    assert acc_pre >= 0.97, acc_pre
    assert acc_rand < acc_pre - 0.2, (acc_rand, acc_pre)
