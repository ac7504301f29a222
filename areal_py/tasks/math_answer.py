"""Grading a free-form math answer with math-verify (the `jsonl` task's reward and `math_accuracy`'s).

Which text is graded is decided by :mod:`areal_py.tasks.answer_extraction`; this module compares
it with the reference. It registers no task; it is shared by tasks and reward functions.
"""

from __future__ import annotations

import re
import threading

import math_verify

from areal_py.tasks.answer_extraction import DEFAULT_EXTRACTION, AnswerExtraction, balanced_braces, extract_candidates

# math-verify enforces its timeouts with signal.alarm, which only works on the main thread
# (elsewhere it raises). Rewards may be computed in worker threads, so there we pass None,
# which disables the alarm; a pathological expression could then take long, which is the
# price of threading. On the main thread the usual signal timeout is kept.
MATH_VERIFY_TIMEOUT_SECONDS = 5


def _timeout() -> int | None:
    on_main = threading.current_thread() is threading.main_thread()
    return MATH_VERIFY_TIMEOUT_SECONDS if on_main else None


def math_reward(gold: str, response_text: str) -> float:
    """1.0 if math-verify finds the response equivalent to `gold`; any failure gives 0.0."""
    try:
        timeout = _timeout()
        gold_parsed = math_verify.parse(gold, parsing_timeout=timeout)
        if not gold_parsed:
            # Plain-text gold that math-verify cannot parse: fall back to exact match.
            return 1.0 if response_text.strip() == gold.strip() else 0.0
        pred_parsed = math_verify.parse(response_text, parsing_timeout=timeout)
        if not pred_parsed:
            return 0.0
        return 1.0 if math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=timeout) else 0.0
    except Exception:  # noqa: BLE001 - a verifier failure must never crash a rollout
        return 0.0


MAX_ANSWER_NUMBERS = 16
"""A strict candidate with more digit runs than this is not a final answer (it bounds the checks below)."""
_DIGITS_RE = re.compile(r"(?<!_)(?<!_\{)[0-9]+")


def math_answer_equal(gold: str, answer: str) -> bool:
    """Whether ``answer``, taken whole as one final answer, is math-verify-equivalent to ``gold``,
    and every number in it matters.

    The answer is parsed as ``\\boxed{answer}``, so all of it must be the answer: ``41 or 42`` and
    ``41, 42`` parse as the set {41, 42} and never equal 42, and words (``42 apples``) make it
    wrong (put units in ``\\text{}``). math-verify keeps only one side of many connectives
    (``41 \\lor 42``, ``41 \\to 42``, ``41 = 42``: all read as 42), so each digit run (not
    a subscript) is also replaced by its value + 1, and the answer counts only if every such change
    makes it wrong: a number that can change without changing the verdict is a hedge or padding.
    Unbalanced braces are False (``41} \\boxed{42`` would close the box early). A gold
    math-verify cannot parse is compared as exact text. Any verifier failure gives False.
    """
    if not balanced_braces(answer):
        return False
    try:
        timeout = _timeout()
        gold_parsed = math_verify.parse(gold, parsing_timeout=timeout)
        if not gold_parsed:
            return answer.strip() == gold.strip()

        def equal(text: str) -> bool:
            pred = math_verify.parse(f"\\boxed{{{text}}}", parsing_timeout=timeout)
            return bool(pred) and bool(math_verify.verify(gold_parsed, pred, timeout_seconds=timeout))

        runs = list(_DIGITS_RE.finditer(answer))
        if len(runs) > MAX_ANSWER_NUMBERS or not equal(answer):
            return False
        return not any(equal(f"{answer[:m.start()]}{int(m.group()) + 1}{answer[m.end():]}") for m in runs)
    except Exception:  # noqa: BLE001 - a verifier failure must never crash a rollout
        return False


def grade_answer(gold: str, response_text: str, spec: AnswerExtraction = DEFAULT_EXTRACTION) -> float:
    """The response's score against ``gold`` under ``spec`` (default: form auto, strict).

    strict: 1.0 iff there is at least one candidate and every candidate is
    :func:`math_answer_equal` to gold (several *different* answers cannot all be). Lenient:
    :func:`math_reward` of the last candidate (math-verify searches its text, words allowed).
    """
    found = extract_candidates(response_text, spec).texts
    if not found:
        return 0.0
    if spec.strict:
        return 1.0 if all(math_answer_equal(gold, c) for c in found) else 0.0
    return math_reward(gold, found[-1])
