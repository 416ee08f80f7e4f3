"""The dataset loader on the shipped sample files, and its errors on malformed input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rewards.verifiers import resolve
from rl.tasks import DatasetError, get_task
from rl.tasks.jsonl import normalize_answer

DATA = Path(__file__).resolve().parents[2] / "data"
GSM8K = DATA / "gsm8k_sample.jsonl"
MATH = DATA / "math_sample.jsonl"


def test_gsm8k_sample_loads_and_solutions_verify():
    task = get_task("gsm8k", path=str(GSM8K), heldout_frac=0.0)
    rows = task.dataset("train")
    assert task.num_samples("train") == 5 and task.num_samples("test") == 0
    assert sorted(s.answer for s in rows) == sorted(["12", "210", "2", "5000", "51"])
    for s in rows:
        assert s.task == "math"
        assert s.segment_text("evidence")[0] in s.prompt and "muffins" in GSM8K.read_text()
        assert s.prompt.startswith(s.segment_text("system")[0])
        assert "<<" not in s.solution and s.solution.endswith(f"\n#### {s.answer}")
        assert resolve("math")(s.solution, s.answer, s.meta) == 1.0
        assert resolve("math")("#### 99999", s.answer, s.meta) == 0.0
    by_line = {s.meta["line"]: s for s in rows}
    assert by_line[1].segment_text("evidence") == [json.loads(GSM8K.read_text().splitlines()[0])["question"]]


def test_math_sample_boxed_answers_with_nested_braces():
    task = get_task("math", path=str(MATH), heldout_frac=0.0)
    answers = {s.meta["line"]: s.answer for s in task.dataset("train")}
    assert answers == {1: r"\frac{1}{2}", 2: r"3\sqrt{2}", 3: "4",
                       4: r"\frac{\sqrt{3}}{2}", 5: "(2,3)"}
    for s in task.dataset("train"):
        assert r"\boxed{" in s.solution and s.solution.endswith(f"#### {s.answer}")
        assert resolve("math")(s.solution, s.answer, s.meta) == 1.0
    one = next(s for s in task.dataset("train") if s.meta["line"] == 1)
    assert resolve("math")("#### 0.5", one.answer, one.meta) == 1.0


@pytest.mark.parametrize("raw,want", [
    ("work\n#### 1,234", "1234"),
    (r"so $\boxed{\frac{a}{\sqrt{b}}}$.", r"\frac{a}{\sqrt{b}}"),
    ("  42 ", "42"),
    (7, "7"),
])
def test_answer_normalisation(raw, want):
    assert normalize_answer(str(raw)) == want


def test_malformed_file_names_path_line_and_key():
    with pytest.raises(DatasetError) as err:
        get_task("gsm8k", path=str(DATA / "gsm8k_malformed.jsonl"))
    msg = str(err.value)
    assert "gsm8k_malformed.jsonl:3:" in msg and "'question'" in msg


@pytest.mark.parametrize("line3,fragment", [
    ('{"question": "q3", "answer": "#### 3"', "invalid JSON"),
    ('{"question": 17, "answer": "#### 3"}', "field 'question' must be str or list, got int"),
    ('{"question": "q3", "answer": ["3"]}', "field 'answer' must be str or int or float, got list"),
    ('{"question": "q3", "answer": null}', "got NoneType"),
    ('["q3", "3"]', "expected a JSON object"),
    ('{"question": "q3", "answer": "   "}', "empty"),
])
def test_malformed_rows(tmp_path, line3, fragment):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"question": "q", "answer": "#### 1"})
    path.write_text(f"{good}\n\n{line3}\n{good}\n")   # the blank line still counts as line 2
    with pytest.raises(DatasetError) as err:
        get_task("gsm8k", path=str(path))
    assert f"{path}:3:" in str(err.value) and fragment in str(err.value)


def test_configurable_keys_and_missing_file(tmp_path):
    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps({"q": "What is 6*7?", "final": 42}) + "\n")
    task = get_task("jsonl", path=str(path), prompt_key="q", answer_key="final", heldout_frac=0.0)
    s = task.sample("train", 0)
    assert s.answer == "42" and s.solution == "#### 42" and s.uid == "jsonl-train-0"
    with pytest.raises(DatasetError, match="missing key 'question' or 'problem'"):
        get_task("jsonl", path=str(path))
    with pytest.raises(DatasetError, match="no such file"):
        get_task("jsonl", path=str(tmp_path / "absent.jsonl"))
    with pytest.raises(DatasetError, match="path="):
        get_task("gsm8k")


def _rows(n: int) -> str:
    return "".join(json.dumps({"question": f"Problem number {i}?", "answer": f"#### {i}"}) + "\n"
                   for i in range(n))


def test_heldout_split_by_hash_is_disjoint_and_wraps(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text(_rows(200))
    task = get_task("jsonl", path=str(path), heldout_frac=0.2, seed=3)
    train, test = task.dataset("train"), task.dataset("test")
    assert len(train) + len(test) == 200 and 20 <= len(test) <= 60
    assert not {s.prompt for s in train} & {s.prompt for s in test}
    n = len(train)
    epoch0 = [task.sample("train", i).answer for i in range(n)]
    epoch1 = [task.sample("train", n + i).answer for i in range(n)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1   # each epoch reshuffled
    again = get_task("jsonl", path=str(path), heldout_frac=0.2, seed=3)
    assert [again.sample("train", i).answer for i in range(n)] == epoch0


def test_separate_test_file_removes_contaminated_train_rows(tmp_path):
    train_path, test_path = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train_path.write_text(_rows(10))
    test_path.write_text(json.dumps({"question": "problem  NUMBER 3?", "answer": "#### 3"}) + "\n")
    task = get_task("jsonl", path=str(train_path), test_path=str(test_path))
    assert task.num_samples("train") == 9 and task.num_samples("test") == 1
    assert "3" not in {s.answer for s in task.dataset("train")}
    assert task.sample("test", 0).meta["source"] == str(test_path)


def test_parquet_needs_pyarrow_or_reads(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path = tmp_path / "x.parquet"
        path.write_bytes(b"PAR1")
        with pytest.raises(DatasetError, match="pyarrow"):
            get_task("gsm8k", path=str(path))
        return
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"question": ["q1", "q2"], "answer": ["#### 1", "#### 2"]}), path)
    task = get_task("gsm8k", path=str(path), heldout_frac=0.0)
    assert sorted(s.answer for s in task.dataset("train")) == ["1", "2"]


def test_a_split_that_holds_out_nothing_fails_at_start(tmp_path):
    """A hash split can hold out none of a few rows (the shipped 5-row sample at 0.1 did): nothing to
    evaluate on is an error at start-up, not NaN accuracies after the run."""
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}?", "answer": f"#### {i}"}) + "\n"
                            for i in range(5)))
    with pytest.raises(DatasetError, match=r"few.jsonl: heldout_frac=0.001 of its 5 rows holds out none"):
        get_task("gsm8k", path=str(path), heldout_frac=0.001)
    with pytest.raises(DatasetError, match="no train rows"):
        get_task("gsm8k", path=str(path), test_path=str(path))


def test_shipped_samples_have_held_out_files():
    for name, n_test in (("gsm8k", 4), ("math", 3)):
        task = get_task(name, path=f"data/{name}_sample.jsonl",
                        test_path=f"data/{name}_sample_test.jsonl")
        assert (task.num_samples("train"), task.num_samples("test")) == (5, n_test)
