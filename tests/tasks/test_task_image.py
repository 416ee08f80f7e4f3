"""image_arith: the operands exist only as pixels. The glyphs are read back from the image by
their segments (a hand-worked seven-segment decoder, not the drawing code), the prompt's text
never holds an operand, splits are disjoint, and the worked solution verifies."""
from __future__ import annotations

import random

import pytest

from rewards.verifiers import resolve
from rl.tasks import get_task
from rl.tasks.base import IMAGE_PAD, VISION_END, VISION_START
from rl.tasks.image_arith import CELL, DIGITS, SEGMENTS, draw_expression

LIT = 100  # a pixel's channel sum on a lit segment is >= 3 × 170; background is 0


def read_cell(img, i: int, jitter: tuple[int, int]) -> str:
    """The glyph in cell i, from the ink at the centre of each of its seven segments."""
    dx, dy = i * CELL + jitter[0], jitter[1]

    def lit(x, y) -> bool:
        return sum(img.getpixel((x + dx, y + dy))) > LIT

    # the plus's vertical bar above and below the middle: no digit segment passes there
    if lit(13, 9) and lit(13, 17):
        return "+"
    segs = "".join(sorted(s for s, (x0, y0, x1, y1) in SEGMENTS.items()
                          if lit((x0 + x1) // 2, (y0 + y1) // 2)))
    by_segments = {"".join(sorted(v)): k for k, v in DIGITS.items()}
    return by_segments.get(segs, " " if not segs else "?")


def test_glyphs_read_back_without_jitter():
    text = "0123456789+"
    img = draw_expression(text, len(text) + 1, random.Random(0), jitter=0)
    assert img.size == ((len(text) + 1) * CELL, CELL)
    assert "".join(read_cell(img, i, (0, 0)) for i in range(len(text) + 1)) == text + " "


def test_jittered_glyphs_stay_in_their_cells():
    rng = random.Random(3)
    for _ in range(20):
        img = draw_expression("88+88", 5, rng)
        for i in range(5):  # the 2 pixel columns at each cell edge are never inked
            for x in (i * CELL, i * CELL + 1, i * CELL + CELL - 2, i * CELL + CELL - 1):
                assert all(sum(img.getpixel((x, y))) == 0 for y in range(CELL))


@pytest.mark.parametrize("params", [{}, {"digits": 3, "distractor_prob": 1.0}])
def test_samples_hold_their_operands_only_in_the_image(params):
    task = get_task("image_arith", seed=7, **params)
    verify = resolve(task.verifier)
    heldout = {s.meta["problem_key"] for s in task.dataset("test", 60)}
    for s in task.dataset("train", 100):
        assert s.meta["problem_key"] not in heldout
        assert verify(s.solution, s.answer, s.meta) == 1.0
        a, b = s.meta["terms"]
        assert int(s.answer) == a + b and s.meta["expression"] == f"{a}+{b}"
        assert len(s.images) == 1 and s.images[0].size == (task.cells * CELL, CELL)
        assert s.prompt.count(IMAGE_PAD) == 1
        (start, end), = s.segments["image"]
        assert s.prompt[start:end] == IMAGE_PAD
        assert s.prompt[start - len(VISION_START):start] == VISION_START
        assert s.prompt[end:end + len(VISION_END)] == VISION_END
        assert s.prompt.startswith("Add the numbers in the image.\n")
        text = s.prompt.replace(IMAGE_PAD, "")
        for span in s.distractors:   # the only number in the text is a labelled distractor
            text = text.replace(s.prompt[span[0]:span[1]], "")
        assert not any(c.isdigit() for c in text)


def glyph_offset(img, i: int):
    """The jitter of cell i's glyph from its inked bounding box: every digit has a segment on
    the box's top row (a, b or f start at y = 3) and on its right column (b or c end at
    x = 19); the plus spans y 7..19 and x 7..20. None for an empty cell."""
    ink = [(x, y) for x in range(CELL) for y in range(CELL)
           if sum(img.getpixel((i * CELL + x, y))) > LIT]
    if not ink:
        return None
    top, bottom, right = min(y for _, y in ink), max(y for _, y in ink), max(x for x, _ in ink)
    if bottom - top + 1 == 13:   # the plus's height (digits are 22 rows tall)
        return right - 20, top - 7
    return right - 19, top - 3


def test_the_image_shows_the_expression():
    task = get_task("image_arith", seed=11, digits=3)
    for i in range(20):
        s = task.sample("train", i)
        img = s.images[0]
        offsets = [glyph_offset(img, c) for c in range(task.cells)]
        read = "".join(" " if o is None else read_cell(img, c, o) for c, o in enumerate(offsets))
        a, b = s.meta["terms"]
        assert read == f"{a:>3}+{b:>3}" and s.meta["expression"] == f"{a}+{b}"
        assert all(abs(o[0]) <= 2 and abs(o[1]) <= 2 for o in offsets if o)


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="min_digits"):
        get_task("image_arith", digits=7)
    with pytest.raises(ValueError, match="distractor_prob"):
        get_task("image_arith", distractor_prob=2.0)
