"""Credit pictures (rl/methods/credit/render.py) and the `launch.inspect` tool end to end on a tiny model."""
import html
import re
from pathlib import Path

import numpy as np
import pytest

from rl.methods.credit.render import credit_html, credit_page, credit_png

TOKENS = ["<script>", "&", ">", " ", "a\n", "b"]
VALUES = {"WAAD": [0.1, 2.5, -3.0, 7.25, 1e-07, 0.3333333333333333],
          "FAI": [0.0, 0.0, 0.5, 0.0, 0.125, 0.0],
          "γ": [1.0, 1.5, 1.0, 1.75, 1.0, 1.25]}
MARKS = {"preplan": [True, False, False, True, False, False],
         "anchor": [False, True, False, True, False, False]}

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_credit_html_escapes_tokens_and_has_one_span_per_token_per_statistic():
    out = credit_html(TOKENS, VALUES, title="t <1>", marks=MARKS)
    assert "<script>" not in out and "t <1>" not in out
    assert "&lt;script&gt;" in out and "&amp;" in out and "&gt;" in out
    assert out.count('class="cr-tok"') == len(TOKENS) * len(VALUES)
    for name in VALUES:
        assert f'data-stat="{name}"' in out
    assert "⏎" in out and "<br>" in out and "·" in out  # whitespace stays visible
    assert "preplan (2)" in out and "anchor (2)" in out  # the marks' legend


def test_credit_html_tooltips_hold_the_exact_values():
    out = credit_html(TOKENS, VALUES)
    tips = re.findall(r'title="([^"]*)"', out)
    assert len(tips) == len(TOKENS) * len(VALUES)
    n = len(TOKENS)
    for k, (name, vals) in enumerate(VALUES.items()):  # one block of spans per statistic
        for v, tip in zip(vals, tips[k * n:(k + 1) * n]):
            assert tip.endswith(f"{name} = {v!r}"), tip


def test_credit_html_rejects_misaligned_inputs_and_page_wraps_fragments():
    with pytest.raises(ValueError, match="WAAD"):
        credit_html(["a", "b"], {"WAAD": [1.0]})
    with pytest.raises(ValueError, match="anchor"):
        credit_html(["a"], {"WAAD": [1.0]}, marks={"anchor": [True, False]})
    page = credit_page([credit_html(["x"], {"γ": [1.0]})], title="a & b")
    assert page.startswith("<!DOCTYPE html>") and "<title>a &amp; b</title>" in page
    assert page.count('class="cr-tok"') == 1


def test_credit_png_writes_a_png(tmp_path):
    path = tmp_path / "c.png"
    long_tokens = TOKENS * 25  # 150 cells: wraps over several lines
    credit_png(long_tokens, {k: v * 25 for k, v in VALUES.items()}, path, title="t",
               marks={k: v * 25 for k, v in MARKS.items()})
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    flat = tmp_path / "flat.png"  # a constant statistic and a NaN must not break the colour scale
    credit_png(["a", "b"], {"γ": [1.0, 1.0], "FAI": [float("nan"), 0.0]}, flat)
    assert flat.read_bytes().startswith(PNG_MAGIC)


def _sections(html: str) -> set[str]:
    return set(re.findall(r'data-stat="([^"]+)"', html))


def test_inspect_generates_and_writes_pages(tiny_model_dir, tmp_path, capsys):
    from launch.inspect import main

    out = tmp_path / "out"
    paths = main(["--checkpoint", tiny_model_dir, "--prompt", "Add.\n347+285\n", "--samples", "2",
                  "--temperature", "1.0", "--max-new-tokens", "30", "--out", str(out)])
    assert [p.name for p in paths] == ["sample_0.html", "sample_0.png", "sample_1.html", "sample_1.png"]
    html = (out / "sample_0.html").read_text(encoding="utf-8")
    assert _sections(html) == {"WAAD", "FAI", "γ"}
    for needle in ("head groups", "local heads", "global heads", "parameters", "preplan", "anchor",
                   "intro", "dominated", "2 response(s)", "Add.\n347+285\n"):
        assert needle in html, needle
    assert (out / "sample_0.png").read_bytes().startswith(PNG_MAGIC)
    assert str(out / "sample_1.png") in capsys.readouterr().out


def test_inspect_scores_a_given_response_from_a_trainer_output_dir(tiny_model_dir, tmp_path):
    from launch.inspect import main

    import shutil

    from rl.loop.checkpoint import CheckpointManager

    def write(tmp: Path) -> None:  # a checkpoint's learner part: an HF folder and a ds/ file
        shutil.copytree(tiny_model_dir, tmp / "hf")
        (tmp / "ds").mkdir()
        (tmp / "ds" / "state.pt").write_bytes(b"not read by inspect")

    run = tmp_path / "run"
    manager = CheckpointManager(run / "checkpoints")
    for step in (1, 2):
        manager.save(step, {"step": step}, write)
    response = "7+5=12\n4+8+1=13\n3+2+1=6\n#### 632"
    out = tmp_path / "out"
    main(["--checkpoint", str(run), "--prompt", "Add.\n347+285\n", "--response", response,
          "--strategy", "local_chunk", "--out", str(out)])
    html = (out / "sample_0.html").read_text(encoding="utf-8")
    assert "step_000002" in html  # the latest checkpoint
    assert html.count('class="cr-tok"') == 3 * len(response)  # one char = one token


def test_inspect_names_a_missing_checkpoint(tmp_path):
    from launch.inspect import main

    with pytest.raises(SystemExit, match="does not exist"):
        main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"])
    with pytest.raises(SystemExit, match="not an HF model folder"):
        main(["--checkpoint", str(tmp_path), "--prompt", "x"])


def stat_tooltips(html_text: str, stat: str) -> list[tuple[float, set[str]]]:
    """Per token of the `stat` view (credit_html's tooltips, in token order): the exact value
    and the names of the marks on it. A tooltip reads "#j 'tok'\n<stat> = <repr>[\nmark, mark]"."""
    start = html_text.index(f'data-stat="{stat}"')
    end = html_text.find('data-stat="', start + 1)
    tips = re.findall(r'class="cr-tok" style="[^"]*" title="([^"]*)"', html_text[start:end if end > 0 else None])
    out = []
    for j, tip in enumerate(html.unescape(t) for t in tips):
        lines = tip.split("\n")
        assert lines[0].startswith(f"#{j} ") and lines[1].startswith(f"{stat} = "), tip
        out.append((float(lines[1][len(stat) + 3:]), set(lines[2].split(", ")) if len(lines) > 2 else set()))
    return out


def test_inspect_with_a_teacher_draws_leafs_view_of_the_prompt(tiny_model_dir, tmp_path):
    """--teacher adds ĝ_T, ĝ_S, Δ over the prompt tokens, the confounders and the task's
    distractor labels. LeaF's detection, run here directly on the same prompt, response and
    models, must give every token's Δ as the page's tooltip holds it (a float32 shown as its
    shortest decimal, so exactly equal once read back as float32) and the same confounder
    marks; the distractor marks are the task's labelled character spans (one char = one token)."""
    from launch.inspect import main, task_prompt, task_sample
    from rl.engine.frozen import FrozenModel
    from rl.methods.leaf.detect import detect
    from rl.methods.leaf.examples import Example
    from rl.methods.leaf.teacher import student_vocab_size
    from rl.models.tiny_model import TinyModelSpec, build_char_tokenizer, build_tiny_model

    teacher = str(build_tiny_model(tmp_path / "teacher", TinyModelSpec(seed=7)))
    out = tmp_path / "out"
    response = "7+5=12\n#### 12"
    paths = main(["--checkpoint", tiny_model_dir, "--task-sample", "0", "--distractors",
                  "--response", response, "--teacher", teacher, "--out", str(out)])
    assert [p.name for p in paths] == ["sample_0.html", "sample_0.png", "sample_0_leaf.png"]
    page = (out / "sample_0.html").read_text(encoding="utf-8")
    assert _sections(page) == {"WAAD", "FAI", "γ", "ĝ_T", "ĝ_S", "Δ"}
    assert (out / "sample_0_leaf.png").read_bytes().startswith(PNG_MAGIC)
    prompt, _ = task_prompt(0, distractors=True)
    sample = task_sample(0, distractors=True)
    assert sample.distractors and sample.prompt in prompt
    tok = build_char_tokenizer()
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(prompt)  # one char = one token
    ex = Example(None, ids, [0] * len(ids), [True] * len(ids),
                 tok(response, add_special_tokens=False)["input_ids"])
    det = detect([ex], FrozenModel(teacher, vocab_size=student_vocab_size(tiny_model_dir, teacher)),
                 FrozenModel(tiny_model_dir), tok, 0.1, 0.5)
    delta, confounder = det.delta[0, :len(ids)], det.confounders[0, :len(ids)].tolist()
    assert 0 < sum(confounder) < len(ids)  # the marks can tell a wrong token set
    offset = prompt.index(sample.prompt)
    labelled = [any(s <= j - offset < e for s, e in sample.distractors) for j in range(len(ids))]
    shown = stat_tooltips(page, "Δ")
    assert len(shown) == len(ids)
    for j, (value, marks) in enumerate(shown):
        assert np.float32(value) == delta[j].numpy(), (j, value, float(delta[j]))
        want = {name for name, on in (("confounder", confounder[j]), ("distractor (label)", labelled[j])) if on}
        assert marks == want, (j, marks, want)
    # the legend counts the same marks
    assert f"confounder ({sum(confounder)})" in page
    assert f"distractor (label) ({sum(labelled)})" in page
