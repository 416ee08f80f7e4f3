"""Prompts rendered the way a real checkpoint expects them (rl/tasks/prompt_format.py): through the
folder's chat template, for plain and conversational rows, with the token classes AVAR and LeaF
read placed on the sample's own text. References are independent: transformers'
`apply_chat_template` for the ids, the row's own strings for the classes."""
import json

import pytest

from rl.batch import TOKEN_CLASS
from rl.models.bpe_model import SMALL_SHAPE, build_bpe_model, task_corpus
from rl.tasks.data import encode_prompt
from rl.tasks.prompt_format import PromptFormat, prompt_format
from rl.tasks import get_task
from rl.tasks.jsonl import DatasetError

SYSTEM = "You are exact. End with '#### <answer>'."
ROWS = [
    {"messages": [{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": "What is 12+30?"}], "answer": "42"},
    {"question": "What is 1+2?", "answer": "#### 3"},
    {"prompt": [{"role": "user", "content": "  Compute 7*6.  "}], "answer": 42},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = build_bpe_model(tmp_path_factory.mktemp("bpe"), SMALL_SHAPE, task_corpus(per_task=100))
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return get_task("gsm8k", path=str(path), heldout_frac=0.0)


def row_sample(task, i: int):
    """The sample of ROWS[i] (train order is shuffled per epoch; the line says which row)."""
    return next(s for s in task.dataset("train") if s.meta["line"] == i + 1)


def messages_of(row: dict, instruction: str) -> list[dict]:
    """What a user would hand `apply_chat_template` for the row, written out independently."""
    if "question" in row:
        return [{"role": "user", "content": instruction + row["question"] + "\n"}]
    turns = row.get("messages") or row["prompt"]
    return [{"role": m["role"], "content": m["content"].strip()} for m in turns]


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}])
def test_templated_ids_equal_apply_chat_template(tok, task, kwargs):
    fmt = PromptFormat(chat_template=True, template_kwargs=kwargs)
    for i, row in enumerate(ROWS):
        ids = encode_prompt(tok, row_sample(task, i), fmt).ids
        ref = tok.apply_chat_template(messages_of(row, task.instruction), tokenize=True,
                                      add_generation_prompt=True, **kwargs)["input_ids"]
        assert ids == list(ref)
    if kwargs:  # the thinking switch reached the template: an empty thinking block closes it
        assert tok.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_a_system_turn_gives_system_and_evidence_classes_and_the_template_is_other(tok, task):
    p = encode_prompt(tok, row_sample(task, 0), PromptFormat(chat_template=True))

    def text_of(cls: str) -> str:
        return tok.decode([t for t, c in zip(p.ids, p.classes) if c == TOKEN_CLASS[cls]])

    assert text_of("system") == SYSTEM
    assert text_of("evidence") == "What is 12+30?"
    assert text_of("other") == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|im_end|>\n"
                                "<|im_start|>assistant\n")
    # LeaF may prune only the row's own text, never the template
    assert tok.decode([t for t, f in zip(p.ids, p.in_text) if f]) == SYSTEM + "What is 12+30?"


def test_a_plain_row_is_one_user_turn_with_the_instruction_as_system_text(tok, task):
    p = encode_prompt(tok, row_sample(task, 1), PromptFormat(chat_template=True))
    system = tok.decode([t for t, c in zip(p.ids, p.classes) if c == TOKEN_CLASS["system"]])
    evidence = tok.decode([t for t, c in zip(p.ids, p.classes) if c == TOKEN_CLASS["evidence"]])
    assert system == task.instruction and evidence == "What is 1+2?"


def test_without_a_template_prefixes_wrap_the_flat_prompt(tok, task):
    s = row_sample(task, 0)
    assert s.prompt == SYSTEM + "\nWhat is 12+30?"   # turns joined by a newline
    p = encode_prompt(tok, s, PromptFormat("Q: ", "\nA: "))
    assert p.ids == tok("Q: " + s.prompt + "\nA: ", add_special_tokens=False)["input_ids"]
    assert tok.decode([t for t, c in zip(p.ids, p.classes) if c == TOKEN_CLASS["system"]]) == SYSTEM


def test_a_trimming_template_still_places_the_text_and_a_rewriting_one_fails(tok):
    from rl.tasks import Sample

    prompt = "  sys text \nuser text "   # turns with spaces a Llama-style `| trim` drops
    s = Sample(uid="u", task="math", prompt=prompt, answer="1", solution="",
               segments={"system": [(0, 11)], "evidence": [(12, 22)]},
               turns=[("system", 0, 11), ("user", 12, 22)])
    saved = tok.chat_template
    try:
        tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | trim }}\n"
                             "{% endfor %}[assistant] ")
        p = encode_prompt(tok, s, PromptFormat(chat_template=True))
        assert p.ids == tok("[system] sys text\n[user] user text\n[assistant] ",
                            add_special_tokens=False)["input_ids"]
        assert tok.decode([t for t, c in zip(p.ids, p.classes) if c == TOKEN_CLASS["system"]]) == " sys text"
        assert tok.decode([t for t, c in zip(p.ids, p.classes) if c == TOKEN_CLASS["evidence"]]) == "user text"
        tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
        with pytest.raises(ValueError, match="rewrites the system turn"):
            encode_prompt(tok, s, PromptFormat(chat_template=True))
    finally:
        tok.chat_template = saved


def test_prompt_format_refuses_prefixes_beside_a_template_and_kwargs_without_one(tok):
    from omegaconf import OmegaConf

    def model(**kw):
        return OmegaConf.create({"path": "x", "prompt_prefix": "", "response_prefix": "",
                                 "chat_template_kwargs": {}, **kw})

    assert prompt_format(model(), tok) == PromptFormat(chat_template=True)
    with pytest.raises(ValueError, match="prompt_prefix/response_prefix stand in"):
        prompt_format(model(prompt_prefix="<|im_start|>user\n"), tok)
    from rl.models.tiny_model import build_char_tokenizer

    with pytest.raises(ValueError, match="no chat template"):
        prompt_format(model(chat_template_kwargs={"enable_thinking": False}), build_char_tokenizer())


@pytest.mark.parametrize("row,fragment", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "answer": "1"}, "must end with a user turn"),
    ({"messages": [{"role": "tool", "content": "q"}], "answer": "1"}, "message 0 must be"),
    ({"messages": [{"role": "user", "content": 3}], "answer": "1"}, "message 0 must be"),
    ({"messages": [], "answer": "1"}, "must end with a user turn"),
])
def test_malformed_conversations_name_file_and_line(tmp_path, row, fragment):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[1]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DatasetError, match=rf"rows.jsonl:2: .*{fragment}"):
        get_task("gsm8k", path=str(path), heldout_frac=0.0)


def test_conversational_parquet_rows_read_like_jsonl(tmp_path, task):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([ROWS[0]]), path)
    s = get_task("gsm8k", path=str(path), heldout_frac=0.0).sample("train", 0)
    ref = row_sample(task, 0)
    assert (s.prompt, s.turns, s.segments, s.answer) == (ref.prompt, ref.turns, ref.segments, "42")
