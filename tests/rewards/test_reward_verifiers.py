"""Each verifier on right, wrong and malformed responses, plus the answer-extraction rules."""
from __future__ import annotations

import pytest

from rewards.answers import final_line_answer, is_well_formed, last_boxed, strip_thousands
from rewards.expr import ExprError, evaluate
from rewards.verifiers import REGISTRY, check_spec, resolve

arith = resolve("arith")
countdown = resolve("countdown")
math = resolve("math")
fmt = resolve("format")


# ---- answer extraction ------------------------------------------------------------------
def test_final_line_takes_the_last_marked_line():
    assert final_line_answer("7+5=12\n#### 11\nno wait\n#### 12\n") == "12"
    assert final_line_answer("no marker here") is None
    assert final_line_answer("####   \n") is None


def test_last_boxed_handles_nested_braces_and_truncation():
    assert last_boxed(r"a \boxed{1} then \boxed{\frac{\sqrt{3}}{2}}.") == r"\frac{\sqrt{3}}{2}"
    assert last_boxed(r"ok \boxed{7} cut \boxed{\frac{1}{2") == "7"
    assert last_boxed("nothing") is None


def test_strip_thousands_only_touches_grouped_numbers():
    assert strip_thousands("1,000") == "1000"
    assert strip_thousands("-12,345.5") == "-12345.5"
    assert strip_thousands("(1,2)") == "(1,2)"
    assert strip_thousands("1,23") == "1,23"


# ---- arith / chain (exact match) ---------------------------------------------------------
def test_arith_right_wrong_malformed():
    assert arith("7+5=12\n4+8+1=13\n3+2+1=6\n#### 632", "632", {}) == 1.0
    assert arith("#### 632  \n", "632", {}) == 1.0
    assert arith("#### 633", "632", {}) == 0.0
    assert arith("#### 0632", "632", {}) == 0.0
    assert arith("the answer is 632", "632", {}) == 0.0
    assert arith("", "632", {}) == 0.0
    assert REGISTRY["chain"] is REGISTRY["arith"]


# ---- countdown -----------------------------------------------------------------------------
CD = {"numbers": [12, 3, 5], "target": 51}


@pytest.mark.parametrize("expr", ["(12+5)*3", "3*(5+12)", " ( 12 + 5 ) * 3 "])
def test_countdown_accepts_any_valid_expression(expr):
    assert countdown(f"12+5=17\n17*3=51\n#### {expr}", "51", CD) == 1.0


@pytest.mark.parametrize("response", [
    "#### 12+5*3",            # precedence: 27
    "#### (12+5)*3*1",        # extra number
    "#### 17*3",              # not the given numbers
    "#### (12+12)*3",         # number reused
    "#### 51",                # just the target
    "#### __import__('os')",  # not arithmetic at all
    "#### (12+5*3",           # unbalanced
    "(12+5)*3",               # no final line
])
def test_countdown_rejects_wrong_or_malformed(response):
    assert countdown(response, "51", CD) == 0.0


def test_countdown_exact_division_and_missing_meta():
    assert countdown("#### 12/3+5", "9", {"numbers": [12, 3, 5], "target": 9}) == 1.0
    assert countdown("#### 12/5*3", "7", {"numbers": [12, 3, 5], "target": 7}) == 0.0
    with pytest.raises(ValueError, match="numbers"):
        countdown("#### 1+2", "3", {})


def test_expr_evaluator_is_exact_and_bounded():
    assert evaluate("7/2*2").value == 7
    assert evaluate("(1+2)*(3-4)").literals == (1, 2, 3, 4)
    for bad in ["2**8", "1e5", "-3+4", "1/0", "1+", "a", "1" * 10, "(" * 40 + "1" + ")" * 40,
                "1+" * 150 + "1"]:
        with pytest.raises(ExprError):
            evaluate(bad)


# ---- math ------------------------------------------------------------------------------------
@pytest.mark.parametrize("response,answer", [
    ("so it is one half\n#### 0.5", r"\frac{1}{2}"),
    (r"thus $x = \boxed{\frac12}$", "0.5"),
    (r"#### 3\sqrt{2}", r"\sqrt{18}"),
    ("#### 1,000", "1000"),
    ("She has 72 in total.\n#### 72", "Natalia sold 48/2 = 24 clips.\n#### 72"),
    (r"#### \{2, 1\}", r"\{1,2\}"),
])
def test_math_equivalent_answers(response, answer):
    assert math(response, answer, {}) == 1.0


@pytest.mark.parametrize("response", [
    "#### 0.6", r"\boxed{\frac{1}{3}}", "#### ", "I give up", "", r"\boxed{\frac{1}{2",
])
def test_math_wrong_or_malformed(response):
    assert math(response, r"\frac{1}{2}", {}) == 0.0


def test_math_falls_back_to_the_whole_response():
    assert math("The answer is $\\frac{1}{2}$.", "0.5", {}) == 1.0


def test_math_unparsable_reference_is_an_error_not_a_zero():
    with pytest.raises(ValueError, match="reference"):
        math("#### 1", "", {})


def test_math_runs_off_the_main_thread():
    import threading
    out = []
    t = threading.Thread(target=lambda: out.append(math("#### 0.5", r"\frac{1}{2}", {})))
    t.start(); t.join(30)
    assert out == [1.0]


# ---- format ----------------------------------------------------------------------------------
@pytest.mark.parametrize("response,ok", [
    ("7+5=12\n#### 12", True),
    ("#### 12\n\n", True),
    ("#### 12\nmore text", False),
    ("#### 12\n#### 13", False),
    ("####12", False),
    ("#### ", False),
    ("12", False),
    ("", False),
])
def test_format_reward(response, ok):
    assert fmt(response, "", {}) == (1.0 if ok else 0.0)
    assert is_well_formed(response) is ok


# ---- lookup --------------------------------------------------------------------------------
def test_resolve_user_function_and_errors():
    fn = resolve("tests.rewards.bad_rewards:length_bonus")
    assert fn("x" * 50, "", {}) == 0.5
    with pytest.raises(KeyError, match="unknown verifier 'arithh'"):
        resolve("arithh")
    with pytest.raises(AttributeError, match="nope"):
        resolve("tests.rewards.bad_rewards:nope")
    with pytest.raises(ValueError):
        check_spec("module_without_function:")
    check_spec("anything.at.all:fn")   # user code is not imported by the cheap check
