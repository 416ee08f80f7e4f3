"""A prompt that leaves the engine no room for a response is named (file:line for a data set,
the sample id otherwise) before any actor starts, not refused by vLLM mid-step."""
import json

import pytest

from rl.tasks.data import check_prompt_lengths, encode_prompt
from rl.tasks import get_task
from rl.models.tiny_model import build_char_tokenizer


def test_overlong_row_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"question": "1+1?", "answer": "#### 2"}, {"question": "x" * 300, "answer": "#### 1"},
            {"question": "2+2?", "answer": "#### 4"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("gsm8k", path=str(path), heldout_frac=0.0)
    tok = build_char_tokenizer()
    prompts = [encode_prompt(tok, s) for s in task.dataset("train")]
    lengths = sorted(len(p.ids) for p in prompts)
    # instruction (58 chars) + question + "\n": one token per character
    assert lengths == [58 + 4 + 1, 58 + 4 + 1, 58 + 300 + 1]
    check_prompt_lengths(prompts, max_model_len=360)  # 359 tokens leave room for one
    with pytest.raises(ValueError, match=r"rows.jsonl:2: prompt is 359 tokens, rollout.max_model_len=359"):
        check_prompt_lengths(prompts, max_model_len=359)


def test_procedural_prompt_is_named_by_uid():
    task = get_task("arith", seed=0)
    s = task.sample("train", 3)
    p = encode_prompt(build_char_tokenizer(), s)
    with pytest.raises(ValueError, match=f"{s.uid}: prompt is {len(s.prompt)} tokens"):
        check_prompt_lengths([p], max_model_len=len(s.prompt))
