"""A tiny Qwen2.5-VL built from a config (no download): the vision-language model of AVAR.

Same idea as `rl/models/tiny_model.py` (a character tokenizer; head_dim 64 for vLLM's CPU attention),
plus a small vision tower and the processor files vLLM reads from the model folder. The
tokenizer gets Qwen-VL's special tokens; a prompt carries ONE `<|image_pad|>` per image, which
vLLM expands itself and the learner expands by `expand_image_pads` (ENVIRONMENT.md: ids that
are already expanded would be silently expanded again by vLLM).

Images are the size the task draws them (a multiple of patch × merge = 28 pixels a side), so
the processor never resizes and every image of a task gives the same number of tokens.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from rl.models.tiny_model import TinyModelSpec, build_char_tokenizer
from rl.tasks.base import IMAGE_PAD, VISION_END, VISION_START

VL_SPECIAL = ["<|im_start|>", "<|im_end|>", VISION_START, VISION_END, IMAGE_PAD,
              "<|video_pad|>", "<|vision_pad|>"]
PATCH, MERGE, TEMPORAL = 14, 2, 2
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] if m['content'] is string else "
                 "m['content'] | map(attribute='text') | join('') }}{% endfor %}")


@dataclass
class TinyVisionSpec:
    """The vision tower added to a `TinyModelSpec` text model (patch 14, merge 2: one image
    token per 28 × 28 pixels)."""
    depth: int = 2
    hidden_size: int = 128
    num_heads: int = 2
    pretrain_steps: int = 80   # glyph classification before the LM sees it; 0 = random tower


def build_vl_tokenizer():
    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": VL_SPECIAL})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_image_processor():
    """Qwen2-VL's image processor (the class vLLM uses too), bounded to small images."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    side = PATCH * MERGE
    return Qwen2VLImageProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
                                 size={"shortest_edge": side * side, "longest_edge": 64 * side * side})


def build_tiny_vl_model(out_dir: str | os.PathLike, spec: TinyModelSpec | None = None,
                        vision: TinyVisionSpec | None = None) -> Path:
    """Write a Qwen2.5-VL (text part from `spec`, random; the tower from `vision`, pretrained
    on glyphs) + tokenizer + processor as an HF folder vLLM can load."""
    import torch
    from transformers import (GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    spec, vision = spec or TinyModelSpec(), vision or TinyVisionSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_vl_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in VL_SPECIAL}
    # M-RoPE splits the rotary frequencies over (time, height, width), highest first. Qwen's
    # split ([8, 12, 12] at this head_dim) with θ = 1e6 leaves the width section only the
    # lowest frequencies: the image tokens of one row then differ by < 1e-3 rad and a tiny
    # model cannot tell which glyph is which (measured: reading stayed at chance after 200
    # SFT steps). Here the width section starts at the 5th frequency, θ = 1e4. Text tokens
    # (equal t, h, w positions) get plain RoPE whatever the split.
    half = spec.head_dim // 2
    mrope = [half // 16, half // 16, half - 2 * (half // 16)]
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads, head_dim=spec.head_dim,
            max_position_embeddings=spec.max_position_embeddings,
            tie_word_embeddings=spec.tie_word_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            bos_token_id=tok.eos_token_id),
        vision_config=dict(
            depth=vision.depth, hidden_size=vision.hidden_size,
            intermediate_size=2 * vision.hidden_size, num_heads=vision.num_heads,
            out_hidden_size=spec.hidden_size, patch_size=PATCH, spatial_merge_size=MERGE,
            temporal_patch_size=TEMPORAL, window_size=PATCH * MERGE * 4,
            fullatt_block_indexes=[vision.depth - 1]),
        image_token_id=ids[IMAGE_PAD], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=spec.tie_word_embeddings, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.float32)
    pretrain_vision_tower(model.model.visual, build_image_processor(), vision.pretrain_steps,
                          spec.seed)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    processor = Qwen2_5_VLProcessor(image_processor=build_image_processor(), tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(),
                                    chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    (out / "tiny_model_spec.json").write_text(json.dumps({**spec.__dict__, "vision": vision.__dict__},
                                                         indent=1))
    return out


def pretrain_vision_tower(tower, image_processor, steps: int, seed: int,
                          batch: int = 16, cells: int = 5, lr: float = 3e-3) -> None:
    """Teach the tower (patch embedding, blocks, merger) to tell the glyphs apart: a linear
    head (then discarded) classifies each image token of random glyph strips.

    Real VLMs start from a pretrained vision encoder; a random one, trained only through the
    LM, is what made the tiny VLM unable to read: one glyph in a one-token image took ~600
    SFT steps to reach 84%, and the full task stayed at chance, while the same LM, given a
    learned embedding per glyph in place of the image features, read one glyph perfectly in
    50 steps and five in ~150. After this step (80 steps, ~5 s) the LM reads 5-glyph images
    in ~100 steps. The strips are random characters, never task problems (no held-out leak)."""
    import random

    import torch

    from rl.tasks.image_arith import GLYPHS, draw_expression

    if steps <= 0:
        return
    rng = random.Random(seed)
    head = torch.nn.Linear(tower.merger.mlp[-1].out_features, len(GLYPHS))
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=lr)
    for _ in range(steps):
        strips = ["".join(rng.choice(GLYPHS) for _ in range(cells)) for _ in range(batch)]
        x = image_processor(images=[draw_expression(t, cells, rng) for t in strips],
                            return_tensors="pt")
        feats = tower(x["pixel_values"].float(), grid_thw=x["image_grid_thw"]).pooler_output
        labels = torch.tensor([GLYPHS.index(c) for t in strips for c in t])
        loss = torch.nn.functional.cross_entropy(head(feats), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tower.zero_grad(set_to_none=True)
