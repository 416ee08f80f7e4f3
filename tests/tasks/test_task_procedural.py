"""The generated tasks: determinism, disjoint splits, labelled spans, and worked solutions
that the task's own verifier accepts."""
from __future__ import annotations

import string

import pytest

from rewards.expr import evaluate
from rewards.verifiers import resolve
from rl.tasks import TASKS, get_task

PRINTABLE = set(string.printable) - set("\t\r\x0b\x0c")

# name -> (default params, harder params with distractors)
VARIANTS = {
    "arith": [{}, {"digits": 4, "n_terms": 3, "distractor_prob": 0.5}, {"digits": 3, "min_digits": 1}],
    "countdown": [{}, {"n_numbers": 4, "distractor_prob": 0.5}, {"ops": "+-*/", "max_number": 12}],
    "chain": [{}, {"n_vars": 5, "distractor_prob": 0.5, "n_distractors": 2},
              {"distractor_prob": 1.0, "shuffle": True}],
}
CASES = [(name, params) for name, variants in VARIANTS.items() for params in variants]
IDS = [f"{name}-{i}" for name, variants in VARIANTS.items() for i in range(len(variants))]


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_solutions_verify_and_spans_point_at_text(name, params):
    task = get_task(name, seed=7, **params)
    verify = resolve(task.verifier)
    for split in ("train", "test"):
        for s in task.dataset(split, 200 if split == "train" else 50):
            assert s.task == task.verifier == name
            assert verify(s.solution, s.answer, s.meta) == 1.0, s
            assert resolve("format")(s.solution, s.answer, s.meta) == 1.0
            if name != "countdown":   # countdown's final line is an expression, not the target
                assert s.solution.splitlines()[-1] == f"#### {s.answer}"
            assert set(s.prompt) <= PRINTABLE and set(s.solution) <= PRINTABLE
            assert s.prompt.endswith("\n") and len(s.prompt) <= 100
            # spans: in range, non-overlapping, and covering the expected text
            spans = sorted([sp for v in s.segments.values() for sp in v] + s.distractors)
            assert all(0 <= a < b <= len(s.prompt) for a, b in spans)
            assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))
            assert set(s.segments) >= {"system", "evidence"}
            for a, b in s.distractors:
                assert s.prompt[a:b] and s.prompt[a:b].strip() == s.prompt[a:b]


def test_default_solutions_fit_a_tiny_model():
    for name in VARIANTS:
        task = get_task(name)
        lengths = [len(s.solution) for s in task.dataset("train", 200)]
        assert 20 <= min(lengths) and max(lengths) <= 80, (name, min(lengths), max(lengths))
        assert max(len(s.prompt) for s in task.dataset("train", 200)) <= 40


def test_arith_layout_and_column_steps():
    task = get_task("arith", digits=3, n_terms=2, seed=1)
    s = task.sample("train", 0)
    a, b = s.meta["terms"]
    assert s.prompt == f"Add.\n{a}+{b}\n"
    assert s.segment_text("system") == ["Add.\n"] and s.segment_text("evidence") == [f"{a}+{b}"]
    assert s.answer == str(a + b) and s.distractors == []
    from rl.tasks.arith import column_steps
    assert column_steps([347, 285]) == (["7+5=12", "4+8+1=13", "3+2+1=6"], 632)
    assert column_steps([999, 1]) == (["9+1=10", "9+1=10", "9+1=10"], 1000)


def test_arith_distractors_are_labelled_and_do_not_change_the_answer():
    task = get_task("arith", distractor_prob=1.0, seed=3)
    seen = set()
    for s in task.dataset("train", 100):
        assert len(s.distractors) == 1
        (a, b), = s.distractors
        text = s.prompt[a:b]
        seen.add(text[0])
        assert text.startswith(("x=", "(note "))
        clean = s.prompt[:a] + s.prompt[b:]
        terms = [int(t) for t in "".join(clean.split()[1:]).split("+")]
        assert sum(terms) == int(s.answer) and terms == s.meta["terms"]
    assert seen == {"x", "("}                     # both placements occur
    none = get_task("arith", distractor_prob=0.0, seed=3).dataset("train", 100)
    assert all(s.distractors == [] for s in none)


def test_countdown_solutions_reach_the_target_with_the_numbers():
    task = get_task("countdown", seed=5)
    for s in task.dataset("train", 200):
        nums, target = s.meta["numbers"], s.meta["target"]
        assert s.prompt == "Countdown.\n" + " ".join(map(str, nums)) + f" -> {target}\n"
        expr = s.solution.splitlines()[-1][len("#### "):]
        result = evaluate(expr)
        assert result.value == target and sorted(result.literals) == sorted(nums)
        assert 1 <= target <= 200 and all(1 <= n <= 20 for n in nums)
        for line in s.solution.splitlines()[:-1]:        # every step is true arithmetic
            lhs, rhs = line.split("=")
            assert evaluate(lhs).value == int(rhs) >= 0


def test_chain_evidence_and_distractors():
    task = get_task("chain", n_vars=4, distractor_prob=1.0, n_distractors=2, seed=2)
    for s in task.dataset("train", 100):
        chain = s.meta["variables"]
        evidence = s.segment_text("evidence")
        assert [e.split("=")[0] for e in evidence] == chain        # in order when not shuffled
        assert s.segment_text("query") == [f"{chain[-1]}?"]
        noise = [s.prompt[a:b] for a, b in s.distractors]
        assert len(noise) == 2 and all(n.strip(";").split("=")[0] not in chain for n in noise)
        # a distractor span carries one separator, so deleting the spans leaves a clean chain
        kept, last = "", 0
        for a, b in s.distractors:
            kept, last = kept + s.prompt[last:a], b
        kept += s.prompt[last:]
        assert ";;" not in kept and ";\n" not in kept and "\n;" not in kept
        assert all(n.count(";") == 1 for n in noise)
        # removing the distractors leaves a prompt with the same answer
        env = {}
        for stmt in evidence:
            var, expr = stmt.split("=")
            env[var] = int(evaluate("".join(str(env.get(c, c)) for c in expr)).value)
        assert str(env[chain[-1]]) == s.answer


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_deterministic_given_seed(name, params):
    a = get_task(name, seed=11, **params).dataset("train", 30)
    b = get_task(name, seed=11, **params).dataset("train", 30)
    c = get_task(name, seed=12, **params).dataset("train", 30)
    assert a == b
    assert [s.prompt for s in a] != [s.prompt for s in c]
    assert get_task(name, seed=11, **params).sample("train", 17) == a[17]
    assert len({s.uid for s in a}) == 30 and a[3].uid == f"{name}-train-11-3"


@pytest.mark.parametrize("name,params", [
    ("arith", {"digits": 1}), ("arith", {}), ("countdown", {"max_number": 6}),
    ("chain", {"n_vars": 2}), ("chain", {}),
], ids=["arith-1digit", "arith", "countdown-small", "chain-2", "chain"])
def test_train_and_heldout_are_disjoint(name, params):
    # Small problem spaces make a leak likely to show up: 1-digit addition has 55 problems.
    for seed in (0, 1):
        task = get_task(name, seed=seed, **params)
        train = {s.meta["problem_key"] for s in task.dataset("train", 600)}
        test = {s.meta["problem_key"] for s in task.dataset("test", 100)}
        assert train and test and not train & test
    if name == "arith":   # independently of problem_key: the unordered operands
        train = {tuple(sorted(s.meta["terms"])) for s in task.dataset("train", 600)}
        test = {tuple(sorted(s.meta["terms"])) for s in task.dataset("test", 100)}
        assert not train & test


def test_heldout_set_does_not_depend_on_seed():
    a = {s.meta["problem_key"] for s in get_task("arith", digits=1, seed=0).dataset("test", 200)}
    b = {s.meta["problem_key"] for s in get_task("arith", digits=1, seed=9).dataset("train", 600)}
    assert a and not a & b


def test_registry_and_param_errors():
    assert {"arith", "countdown", "chain", "jsonl", "gsm8k", "math"} <= set(TASKS)
    with pytest.raises(KeyError, match="arithmetic"):
        get_task("arithmetic")
    with pytest.raises(TypeError, match="digitz"):
        get_task("arith", digitz=3)
    with pytest.raises(ValueError, match="n_terms"):
        get_task("arith", n_terms=1)
    with pytest.raises(ValueError, match="distractor_prob"):
        get_task("countdown", distractor_prob=1.5)
    with pytest.raises(ValueError, match="ops"):
        get_task("countdown", ops="+^")
    with pytest.raises(ValueError, match="split"):
        get_task("arith").sample("validation", 0)
    with pytest.raises(ValueError, match="pass n"):
        get_task("arith").dataset("train")
