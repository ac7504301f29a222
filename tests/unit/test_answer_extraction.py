"""Final-answer extraction and strict grading (areal_py.tasks.answer_extraction, math_answer.grade_answer).

Hand-chosen responses, graded by the real math-verify against hand-written gold answers.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from areal_py.config import ConfigError, load_config
from areal_py.tasks.answer_extraction import (
    ANSWER_FORMS,
    AnswerExtraction,
    boxed_contents,
    extract_candidates,
    last_line_numbers,
    strip_think,
)
from areal_py.tasks.math_answer import grade_answer, math_answer_equal

STRICT = AnswerExtraction()
LENIENT = AnswerExtraction("auto", strict=False)


@pytest.mark.parametrize("response, expected", [
    # the cases, under the default (auto, strict)
    ("It is either 41 or 42", 0.0),  # hedge, and no answer in a form
    ("<think>maybe 42</think><answer>43</answer>", 0.0),  # the think text is never graded
    ("<think>maybe 43</think><answer>42</answer>", 1.0),
    ("<answer>42</answer>", 1.0),
    (r"so the answer is \boxed{42}.", 1.0),
    ("6 * 7 = 42\n#### 42", 1.0),
    ("#### 42.", 1.0),  # one trailing period is not part of the answer
    # several candidates: all the same value scores, different values do not
    (r"\boxed{42}, that is \boxed{42.0}", 1.0),
    (r"\boxed{41} or maybe \boxed{42}", 0.0),
    ("<answer>41</answer><answer>42</answer>", 0.0),
    ("#### 41\n#### 42", 0.0),
    # a hedge inside one candidate
    ("<answer>41 or 42</answer>", 0.0),  # math-verify reads the set {41, 42}
    (r"<answer>41 \lor 42</answer>", 0.0),  # math-verify keeps 42: caught because 41 does not matter
    (r"\boxed{41 = 42}", 0.0),
    (r"<answer>41} \boxed{42</answer>", 0.0),  # unbalanced braces cannot close the box early
    ("<answer>x = 42</answer>", 1.0),
    # no final answer
    ("", 0.0),
    ("42", 0.0),  # strict auto needs a form
    ("<answer></answer>", 0.0),
    (r"\boxed{42", 0.0),  # cut inside the box
    ("<think>the answer is \\boxed{42}", 0.0),  # cut inside the think block
    ("<think>a</think> <answer>41</answer> <think>\\boxed{42}", 0.0),  # a second think left open
    # a chat template that opens <think> in the prompt: the response has only </think>
    ("\\boxed{41} hmm</think>\n<answer>42</answer>", 1.0),
    # unicode and whitespace
    ("<answer>\u00a042\u3000</answer>", 1.0),  # no-break and ideographic spaces around
    ("答案是 \\boxed{42}", 1.0),
    ("6 × 7\r\n#### 42\r\n", 1.0),  # CRLF line ends
    ("<answer>４２</answer>", 0.0),  # full-width digits are not digits to math-verify
])
def test_default_grading(response: str, expected: float) -> None:
    assert grade_answer("42", response) == expected


def test_answer_tag_comes_first_in_auto_and_may_hold_a_box() -> None:
    assert extract_candidates(r"\boxed{7} <answer>so \boxed{42}</answer>").texts == ("42",)
    assert extract_candidates(r"\boxed{7} <answer>so \boxed{42}</answer>").form == "answer_tag"
    assert extract_candidates(r"\boxed{42} #### 7").form == "boxed"
    assert grade_answer("42", "<answer>The answer is \\boxed{42}</answer>") == 1.0
    assert grade_answer("42", "<answer>The answer is 42</answer>") == 0.0  # strict: the tag holds the answer alone


def test_nested_braces() -> None:
    assert boxed_contents(r"\boxed{\frac{1}{2}} and \boxed {x^{2}}") == [r"\frac{1}{2}", "x^{2}"]
    assert boxed_contents(r"\boxed{\{1, 2\}}") == [r"\{1, 2\}"]  # escaped braces do not count
    assert boxed_contents(r"\boxed{\boxed{41} \boxed{42}}") == ["41", "42"]  # inner boxes
    assert boxed_contents(r"\boxed{1} \boxed{\frac{2}{3}") == ["1"]  # an unclosed box ends the search
    assert grade_answer("0.5", r"\boxed{\frac{1}{2}}") == 1.0
    assert grade_answer("42", r"\boxed{\boxed{41} \boxed{42}}") == 0.0
    assert grade_answer("42", "\\boxed{" * 500 + "42" + "}" * 500) == 1.0  # past 8 levels taken whole: no recursion error


def test_think_stripping() -> None:
    assert strip_think("<think>a</think>b") == "b"
    assert strip_think("a</think>b</think>c") == "c"
    assert strip_think("no think") == "no think"
    assert strip_think("<think>open") is None
    assert strip_think("<think>a</think>b<think>c") is None
    assert strip_think("<THINK>a</THINK>b") == "<THINK>a</THINK>b"  # tags are case-sensitive


@pytest.mark.parametrize("gold, response, strict, expected", [
    ("42", "It is either 41 or 42", True, 0.0),  # two different numbers on the last line that has numbers
    ("42", "It is either 41 or 42", False, 1.0),  # lenient last number: the hedge wins (why strict is the default)
    ("42", "3 + 4 = 7\n7 * 6 = 42\nThe answer is 42.\nHope this helps!", True, 1.0),
    ("42", "The answer is 42, yes 42", True, 1.0),  # the same value twice is one answer
    ("42", "7 * 6 = 42", True, 0.0),  # strict: working on the final line is several candidates
    ("1000", "The total is 1,000 apples", True, 1.0),
    ("42", "no numbers here", True, 0.0),
])
def test_last_number(gold: str, response: str, strict: bool, expected: float) -> None:
    assert grade_answer(gold, response, AnswerExtraction("last_number", strict)) == expected


def test_last_line_numbers() -> None:
    assert last_line_numbers("a 1\nso 5-3 = 2, x2 2nd\n\n") == ["5", "3", "2"]  # no sign after a digit; glued: no
    assert last_line_numbers("x = -3.5 or 1/2 or 1,000") == ["-3.5", "1/2", "1,000"]
    assert last_line_numbers("none") == []


def test_each_form_alone() -> None:
    r = "<answer>41</answer> \\boxed{42}\n#### 43"
    assert grade_answer("41", r, AnswerExtraction("answer_tag")) == 1.0
    assert grade_answer("42", r, AnswerExtraction("boxed")) == 1.0
    assert grade_answer("43", r, AnswerExtraction("gsm8k")) == 1.0
    assert grade_answer("41", r) == 1.0  # auto: answer_tag first
    assert grade_answer("42", "the answer is 42", AnswerExtraction("boxed")) == 0.0
    assert grade_answer("42", "the answer is 42", LENIENT) == 1.0  # lenient auto falls back to the last number


def test_lenient_takes_the_last_candidate() -> None:
    assert grade_answer("42", r"\boxed{41} no, \boxed{42}", LENIENT) == 1.0
    assert grade_answer("41", r"\boxed{41} no, \boxed{42}", LENIENT) == 0.0
    assert grade_answer("42", "<answer>The answer is 42</answer>", LENIENT) == 1.0  # words allowed


def test_every_number_must_matter() -> None:
    assert math_answer_equal("1024", "2^{10}")
    assert math_answer_equal("0.5", r"\frac{1}{2}")
    assert math_answer_equal("42", "x_1 = 42")  # a subscript is not a number of the answer
    assert math_answer_equal("1000", "1,000")
    assert not math_answer_equal("42", r"41 \to 42")
    assert not math_answer_equal("42", r"\text{x41} \lor 42")
    assert not math_answer_equal("42", "0 \\cdot 5 + 42")  # padding: 5 can change, the verdict cannot
    assert not math_answer_equal("42", " + ".join(["0"] * 20) + " + 42")  # 21 runs > MAX_ANSWER_NUMBERS


def test_unparsable_gold_is_exact_text() -> None:
    assert grade_answer("yes", "<answer> yes </answer>") == 1.0
    assert grade_answer("yes", "<answer>no</answer>") == 0.0


def test_bad_form_is_an_error() -> None:
    with pytest.raises(ValueError, match="not one of auto, boxed"):
        AnswerExtraction("box")  # type: ignore[arg-type]


_PIECES = ["<think>", "</think>", "<answer>", "</answer>", "\\boxed", "{", "}", "\\{", "\\", "####", "42", "-1",
           "1,000", "0.5", "/", " ", "\n", "\r", "$", "x", "=", "or", "é", "４", "\u00a0", ".", "_{"]


def test_never_raises_on_arbitrary_text() -> None:
    """Seeded fuzz over the tokens the rules look at: extraction and grading never raise."""
    rng = random.Random(0)
    for i in range(300):
        text = "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 40)))
        for form in ANSWER_FORMS:
            for strict in (True, False):
                found = extract_candidates(text, AnswerExtraction(form, strict))  # type: ignore[arg-type]
                assert all(isinstance(c, str) for c in found.texts)
        if i % 10 == 0:
            assert grade_answer("42", text) in (0.0, 1.0)


def test_config_defaults(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "q", "answer": "1"}\n')
    jsonl = load_config(None, ["task.name=jsonl", f"task.path={data}", f"model.path={tmp_path}"])
    assert jsonl.reward.functions == {"math_accuracy": 1.0}
    assert jsonl.reward.answer.extraction() == AnswerExtraction("auto", strict=True)
    kept = load_config(None, ["task.name=jsonl", f"task.path={data}", f"model.path={tmp_path}",
                              "reward.functions={accuracy: 1.0}", "reward.answer.form=boxed"])
    assert kept.reward.functions == {"accuracy": 1.0} and kept.reward.answer.form == "boxed"
    assert load_config(None, []).reward.functions == {"accuracy": 1.0}  # arith keeps its exact-match reward
    with pytest.raises(ConfigError, match="reward.answer.form"):
        load_config(None, ["reward.answer.form=box"])
