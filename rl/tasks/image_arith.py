"""`image_arith`: addition whose operands are only in the image (the vision-language task).

Why this task: AVAR's question is whether the reasoning looks at the evidence, and here the
evidence can only be looked at — the numbers are drawn, not written. The prompt's text holds
the instruction (system) and, with `distractor_prob`, a number that takes no part in the sum
(a labelled distractor the model could copy instead of reading the image). The answer is
checked and worked like `arith` (same verifier, same column steps), so the text side is a
skill the tiny model learns quickly and what remains is reading.

    image     "47+ 8" drawn as seven-segment glyphs, one per 28 × 28 cell (one image token each),
              each term right-aligned in a field of `digits` cells
    prompt    "Add the numbers in the image.\\n<|vision_start|><|image_pad|><|vision_end|>\\n"
    solution  "7+8=15\\n4+1=5\\n#### 55"

Glyphs are drawn with rectangles (no font file: identical on every machine) with a per-glyph
jitter and ink level drawn from the sample's RNG, so no two images of a problem are the same
pixels and held-out images are new pixels as well as new problems.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional

from rl.tasks.arith import ArithTask, column_steps
from rl.tasks.base import PromptBuilder, Sample, distractor_number

SYSTEM = "Add the numbers in the image.\n"
CELL = 28   # pixels per glyph: one patch-merge window of Qwen-VL (14 × 2), so one image token

# Seven segments (a top, b top-right, c bottom-right, d bottom, e bottom-left, f top-left,
# g middle) as boxes in a 28 × 28 cell; which ones each digit lights.
SEGMENTS = {"a": (8, 3, 20, 6), "b": (17, 3, 20, 14), "c": (17, 13, 20, 25), "d": (8, 22, 20, 25),
            "e": (8, 13, 11, 25), "f": (8, 3, 11, 14), "g": (8, 12, 20, 15)}
DIGITS = {"0": "abcdef", "1": "bc", "2": "abged", "3": "abgcd", "4": "fgbc", "5": "afgcd",
          "6": "afgedc", "7": "abc", "8": "abcdefg", "9": "abcdfg"}
PLUS = ((7, 12, 21, 15), (12, 7, 15, 20))
GLYPHS = "0123456789+ "   # everything a cell can show (blank: the padding of a short term)


def draw_expression(text: str, cells: int, rng: random.Random, jitter: int = 2):
    """`text` (digits, '+' and blanks) from the left of a `cells`-wide strip, light on black;
    each glyph shifted by up to `jitter` pixels (it stays inside its cell)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (cells * CELL, CELL), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for i, ch in enumerate(text):
        dx, dy = i * CELL + rng.randint(-jitter, jitter), rng.randint(-jitter, jitter)
        ink = tuple(rng.randint(170, 255) for _ in range(3))
        boxes = PLUS if ch == "+" else [SEGMENTS[s] for s in DIGITS.get(ch, "")]
        for x0, y0, x1, y1 in boxes:
            draw.rectangle((x0 + dx, y0 + dy, x1 + dx - 1, y1 + dy - 1), fill=ink)
    return img


@dataclass
class ImageArithTask(ArithTask):
    """arith's problems (drawing, split keys, checks), rendered as an image."""
    digits: int = 2
    min_digits: Optional[int] = 1

    name = "image_arith"
    verifier = "arith"
    max_digits = 6

    def __post_init__(self) -> None:
        super().__post_init__()
        self.cells = self.n_terms * (self.digits + 1) - 1   # widest expression: one token per glyph

    def _render(self, terms: List[int], rng: random.Random) -> Sample:
        expr = "+".join(str(t) for t in terms)
        # Each term right-aligned in a `digits`-wide field: a column's digits sit at the same
        # image tokens in every problem (" 7+ 4", "66+91"), as on paper.
        drawn = "+".join(str(t).rjust(self.digits) for t in terms)
        b = PromptBuilder().add(SYSTEM, "system").add_image(draw_expression(drawn, self.cells, rng))
        if rng.random() < self.distractor_prob:
            b.add(" ").add(f"(note {distractor_number(rng, self.digits)})", "distractor")
        b.add("\n")
        lines, total = column_steps(terms)
        answer = str(total)
        return Sample(uid="", task=self.verifier, prompt=b.text, answer=answer,
                      solution="\n".join(lines + [f"#### {answer}"]), segments=b.segments,
                      distractors=b.distractors, images=b.images,
                      meta={"terms": terms, "expression": expr})
