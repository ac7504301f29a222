"""Grading a free-form math answer with math-verify (the `jsonl` task's reward and `math_accuracy`'s).

This module registers no task; it is shared by tasks and reward functions.
"""

from __future__ import annotations

import threading

import math_verify

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
