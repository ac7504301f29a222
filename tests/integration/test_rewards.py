"""Reward functions, their weighted composition, and the RewardPool's timeouts, errors and shutdown."""
from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from areal_py.rewards.functions import (
    REWARD_FUNCTIONS,
    accuracy,
    build_reward_fn,
    math_accuracy,
    task_recipe,
    think_answer_format,
)
from areal_py.tasks.answer_extraction import AnswerExtraction
from areal_py.tasks.arith import ArithConfig, ArithTask
from areal_py.tasks.base import Prompt, TaskRecipe
from areal_py.tasks.sum_cot import SumCotTask
from controller.reward_pool import RewardPool

P = Prompt(index=0, text="7+5=", answer="12")


# Verifiers injected into worker processes by import path ("<this module>:<function>"): the way
# users plug in their own. This module is importable in a spawned worker because pytest puts tests/
# on sys.path, which the spawn start method hands to the child.
def scripted(prompt: Prompt, response_text: str, stopped: bool) -> float:
    if response_text == "SLEEP":
        time.sleep(60)
    if response_text == "RAISE":
        raise ValueError("verifier exploded")
    if response_text == "DIE":
        os._exit(3)
    return 1.0 if response_text == prompt.answer else 0.0


def always_two(prompt: Prompt, response_text: str, stopped: bool) -> float:
    return 2.0


def extreme(prompt: Prompt, response_text: str, stopped: bool) -> float:
    """A verifier that returns what it is told: "1e39", "inf", "nan", "3e38", ..."""
    return float(response_text)


extreme_too = extreme  # a second term by another import path


SCRIPTED = f"{__name__}:scripted"
ALWAYS_TWO = f"{__name__}:always_two"
EXTREME = f"{__name__}:extreme"
EXTREME_TOO = f"{__name__}:extreme_too"


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


# -- reward functions --------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("<think>7 plus 5</think><answer>12</answer>", 1.0),
    ("  \n<think>\nline one\nline two\n</think>\n\n<answer>\n12\n</answer>\n ", 1.0),  # whitespace only around
    ("<think></think><answer></answer>", 1.0),  # empty blocks are still the format
    ("<think>a</think>", 0.0),  # no answer
    ("<answer>12</answer>", 0.0),  # no think
    ("<answer>12</answer><think>a</think>", 0.0),  # wrong order
    ("so <think>a</think><answer>12</answer>", 0.0),  # text before
    ("<think>a</think><answer>12</answer> done", 0.0),  # text after
    ("<think>a</think> hmm <answer>12</answer>", 0.0),  # text between
    ("<think>a</think><answer>12</answer><answer>13</answer>", 0.0),  # two answers
    ("<think>a<think>b</think><answer>12</answer>", 0.0),  # nested tag
    ("<think>a</think><answer>12", 0.0),  # unclosed (e.g. truncated)
    ("<THINK>a</THINK><ANSWER>12</ANSWER>", 0.0),  # tags are case-sensitive
    ("", 0.0),
])
def test_think_answer_format(text: str, expected: float) -> None:
    assert think_answer_format(P, text, True) == expected


@pytest.mark.parametrize("answer, text, expected", [
    ("0.5", r"The answer is \boxed{\frac{1}{2}}", 1.0),
    (r"\frac{1}{2}", "so $0.5$", 0.0),  # strict by default: no answer in a form
    ("12", "<think>7+5 is 13? no</think><answer>12</answer>", 1.0),  # only the answer block is graded
    ("12", "<think>it is 12</think><answer>13</answer>", 0.0),
    ("12", "I get 13", 0.0),
    ("12", "", 0.0),
])
def test_math_accuracy(answer: str, text: str, expected: float) -> None:
    assert math_accuracy(Prompt(0, "q", answer), text, False) == expected


def test_math_accuracy_takes_its_answer_extraction_from_the_builder() -> None:
    """reward.answer reaches math_accuracy through build_reward_fn (and so the pool's workers)."""
    p = Prompt(0, "q", "0.5")
    assert build_reward_fn({"math_accuracy": 1.0}, None)(p, "so $0.5$", True) == 0.0
    lenient = build_reward_fn({"math_accuracy": 1.0}, None, answer=AnswerExtraction("auto", strict=False))
    assert lenient(p, "so $0.5$", True) == 1.0
    boxed_only = build_reward_fn({"math_accuracy": 1.0}, None, answer=AnswerExtraction("boxed"))
    assert boxed_only(p, "<answer>0.5</answer>", True) == 0.0
    assert boxed_only(p, r"\boxed{0.5}", True) == 1.0


def test_accuracy_delegates_to_the_task() -> None:
    fn = accuracy(ArithTask())
    assert fn(P, "12", True) == 1.0
    assert fn(P, "12", False) == 0.0  # arith also needs EOS
    assert fn(P, "13", True) == 0.0


def test_weighted_composition_by_hand() -> None:
    fn = build_reward_fn({"accuracy": 1.0, "think_answer_format": 0.5, "math_accuracy": 2.0, ALWAYS_TWO: -0.25},
                         ArithTask())
    text = "<think>7+5</think><answer>12</answer>"
    # accuracy: exact match fails (0); format 1; math 1; custom 2  ->  0 + 0.5 + 2.0 - 0.5
    assert fn(P, text, True) == pytest.approx(2.0)
    # "12" alone: accuracy 1, format 0, math 0 (strict: no answer form), custom 2  ->  1 + 0 + 0 - 0.5
    assert fn(P, "12", True) == pytest.approx(0.5)
    assert fn(P, "12", False) == pytest.approx(-0.5)  # not stopped: accuracy 0
    # "\boxed{12}": accuracy 0 (not the exact text), format 0, math 1, custom 2  ->  0 + 0 + 2 - 0.5
    assert fn(P, r"\boxed{12}", True) == pytest.approx(1.5)


def test_unknown_or_bad_names_are_refused() -> None:
    with pytest.raises(ValueError) as e:
        build_reward_fn({"acuracy": 1.0}, ArithTask())
    for name in [*REWARD_FUNCTIONS, "reward_model", "module:function"]:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="cannot be imported"):
        build_reward_fn({"no_such_module_xyz:fn": 1.0}, None)
    with pytest.raises(ValueError, match="needs a task"):
        build_reward_fn({"accuracy": 1.0}, None)
    with pytest.raises(ValueError, match="reward_model"):
        build_reward_fn({"reward_model": 1.0}, None)
    with pytest.raises(ValueError, match="finite"):
        build_reward_fn({"math_accuracy": float("nan")}, None)


def test_task_recipe_round_trip() -> None:
    assert task_recipe(ArithTask(1, 5, seed=3)) == TaskRecipe(ArithConfig(min_operand=1, max_operand=5), 3)
    with pytest.raises(TypeError, match="cannot describe"):
        task_recipe(type("Unregistered", (), {"name": "nope"})())


def test_worker_process_scores_with_the_task_rebuilt_from_its_recipe() -> None:
    task = SumCotTask(max_terms=20, sft_max_terms=12, sft_alpha=0.5, seed=5)
    p = task.prompt(3)
    with RewardPool({"accuracy": 1.0}, task, workers=1, timeout_s=60) as pool:
        assert pool.submit([(p, f"0;{p.answer}", True), (p, p.answer, True)]).result() == [1.0, 0.0]


# -- in-thread mode ----------------------------------------------------------------------------

def test_in_thread_pool_scores_and_reports_errors(caplog: pytest.LogCaptureFixture) -> None:
    errors_before = metric("areal_reward_errors_total")
    pool = RewardPool({"accuracy": 1.0, SCRIPTED: 0.5}, ArithTask(), workers=0)
    with caplog.at_level(logging.WARNING, logger="controller.reward_pool"):
        h = pool.submit([(P, "12", True), (P, "RAISE", True), (P, "3", False)])
    assert h.done() and pool.poll() == [h]
    assert h.result() == [1.5, 0.0, 0.0]  # "RAISE": accuracy 0 + the raising term 0
    assert h.status == ["ok", "error", "ok"]
    assert pool.errors == 1 and metric("areal_reward_errors_total") == errors_before + 1
    assert "verifier exploded" in caplog.text and "'RAISE'" in caplog.text and "'7+5='" in caplog.text
    pool.close()


@pytest.mark.parametrize("spec, text, why", [
    ({EXTREME: 1.0}, "1e39", "finite as a Python float, inf in float32"),
    ({EXTREME: 1.0}, "-1e39", "the same, negative"),
    ({EXTREME: 1.0}, "inf", "not finite at all"),
    ({EXTREME: 1.0}, "nan", "not a number"),
    ({EXTREME: 2.0}, "3e38", "finite in float32, but not once weighted"),
    ({EXTREME: 1.0, EXTREME_TOO: 1.0}, "3e38", "each term fits float32, their sum does not"),
])
def test_reward_not_finite_in_float32_scores_zero_and_is_counted(spec: dict, text: str, why: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The trainer holds rewards in float32: a reward that is finite only as a Python float would
    turn into inf there and NaN every weight, so it is treated like a verifier error."""
    errors_before = metric("areal_reward_errors_total")
    pool = RewardPool({"accuracy": 1.0, **spec}, ArithTask(), workers=0)
    with caplog.at_level(logging.WARNING, logger="controller.reward_pool"):
        h = pool.submit([(P, text, True), (P, "1", True)])
    # accuracy is 0 for both ("12" is the answer); "1" scores the sum of the weights
    assert h.result() == [0.0, sum(spec.values())], why
    assert h.status == ["error", "ok"]
    assert pool.errors >= 1 and metric("areal_reward_errors_total") == errors_before + pool.errors
    assert "float32" in caplog.text and len(caplog.text) < 5000  # the reason, in a bounded message
    pool.close()


# -- worker processes --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool():
    p = RewardPool({SCRIPTED: 1.0}, None, workers=2, timeout_s=1.0, chunk_size=4)
    yield p
    p.close()


def test_pool_scores_in_workers(pool: RewardPool) -> None:
    prompts = [Prompt(i, f"{i}+1=", str(i + 1)) for i in range(10)]
    h = pool.submit([(p, p.answer if p.index % 2 else "x", True) for p in prompts])
    assert h.result(timeout=30) == [float(i % 2) for i in range(10)]
    assert h.status == ["ok"] * 10


def test_timeout_scores_zero_and_later_work_is_prompt(pool: RewardPool, caplog: pytest.LogCaptureFixture) -> None:
    pool.submit([(P, "12", True)]).result(timeout=30)  # both workers up
    timeouts, counter = pool.timeouts, metric("areal_reward_timeouts_total")
    old_pids = set(pool.worker_pids())
    items = [(P, "SLEEP", True)] + [(P, "12", True)] * 5
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="controller.reward_pool"):
        h = pool.submit(items)
        rewards = h.result(timeout=30)
    elapsed = time.monotonic() - start
    assert rewards == [0.0] + [1.0] * 5
    assert h.status[0] == "timeout" and h.status[1:] == ["ok"] * 5
    assert pool.timeouts == timeouts + 1 and metric("areal_reward_timeouts_total") == counter + 1
    assert "timed out" in caplog.text and "'SLEEP'" in caplog.text
    assert elapsed < 1.0 + 5.0, elapsed  # the timeout (1 s) plus slack: nothing waited for the 60 s sleep
    assert len(set(pool.worker_pids()) - old_pids) == 1  # the hung worker was replaced
    # The next submission is scored at once by the healthy worker, without waiting for the new one.
    start = time.monotonic()
    assert pool.submit([(P, "12", True), (P, "1", True)]).result(timeout=30) == [1.0, 0.0]
    assert time.monotonic() - start < 1.0


def test_raising_verifier_is_logged_with_the_sample(pool: RewardPool, caplog: pytest.LogCaptureFixture) -> None:
    errors, counter = pool.errors, metric("areal_reward_errors_total")
    with caplog.at_level(logging.WARNING, logger="controller.reward_pool"):
        h = pool.submit([(P, "RAISE", True), (P, "12", True)])
        assert h.result(timeout=30) == [0.0, 1.0]
    assert h.status == ["error", "ok"]
    assert pool.errors == errors + 1 and metric("areal_reward_errors_total") == counter + 1
    record = next(r for r in caplog.records if "failed" in r.getMessage())
    assert "verifier exploded" in record.getMessage()  # the traceback from the worker
    assert "'RAISE'" in record.getMessage() and "'7+5='" in record.getMessage()  # the sample


def test_dead_worker_is_counted_and_replaced(pool: RewardPool) -> None:
    errors = pool.errors
    h = pool.submit([(P, "DIE", True), (P, "12", True), (P, "12", True), (P, "12", True)])
    assert h.result(timeout=30) == [0.0, 1.0, 1.0, 1.0]
    assert h.status[0] == "error" and pool.errors == errors + 1
    assert pool.submit([(P, "12", True)] * 4).result(timeout=30) == [1.0] * 4


def test_poll_loop_and_clean_close() -> None:
    # lenient extraction, so "it is 12" scores 1 only if reward.answer reaches the worker (strict: 0)
    pool = RewardPool({"math_accuracy": 1.0, SCRIPTED: 0.0}, None, workers=1, timeout_s=5.0,
                      answer=AnswerExtraction("auto", strict=False))
    h = pool.submit([(P, r"\boxed{12}", False), (P, "11", True), (P, "it is 12", True)])
    completed: list = []
    deadline = time.monotonic() + 30
    while not completed and time.monotonic() < deadline:  # a single-threaded poll loop
        completed += pool.poll()
        time.sleep(0.01)
    assert completed == [h] and h.result() == [1.0, 0.0, 1.0]
    pending = pool.submit([(P, "SLEEP", True)] * 3)
    pids = pool.worker_pids()
    pool.close()
    assert pending.done()
    with pytest.raises(RuntimeError, match="closed"):
        pending.result()
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit([(P, "12", True)])
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone and reaped
    assert not [p for p in multiprocessing.active_children() if p.pid in pids]


def test_workers_die_with_their_process(tmp_path) -> None:
    """A process killed while its worker is stuck in a verifier leaves no orphan behind (Linux)."""
    tests_dir = Path(__file__).resolve().parent
    script = (
        "import os, sys, time\n"
        f"sys.path[:0] = [{str(tests_dir.parents[1])!r}, {str(tests_dir)!r}]\n"
        "from controller.reward_pool import RewardPool\n"
        "from test_rewards import P, SCRIPTED\n"
        "pool = RewardPool({SCRIPTED: 1.0}, None, workers=1, timeout_s=60)\n"
        "h = pool.submit([(P, 'SLEEP', True)])\n"
        "while not pool._workers[0].ready: pool.poll(); time.sleep(0.05)\n"
        "pool.poll(); time.sleep(0.5)\n"
        "print(pool.worker_pids()[0], flush=True)\n"
        "os._exit(0)\n"  # no close(), no atexit: as if killed
    )
    log_file = tmp_path / "out.txt"  # not a pipe: an orphan holding it open must not block us
    with log_file.open("w") as f:
        code = subprocess.run([sys.executable, "-c", script], stdout=f, stderr=subprocess.STDOUT, timeout=60,
                              check=False).returncode
    assert code == 0, log_file.read_text()
    pid = int(log_file.read_text().split()[-1])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    pytest.fail(f"reward worker {pid} outlived its parent")
