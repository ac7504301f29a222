"""Verifiers that misbehave on purpose, loaded by import path into reward worker processes."""
import time

from areal_py.tasks.base import Prompt


def sometimes_slow(prompt: Prompt, response_text: str, stopped: bool) -> float:
    """Hangs on the run's first prompt (index 0) only: each of its samples times out in turn, so a
    replacement worker is itself killed and replaced. One slow prompt shows that; every further one
    would add a timeout and a worker start per sample to the test's time and check nothing new."""
    if prompt.index == 0:
        time.sleep(30)  # far past the test's timeout: the pool must kill this worker and go on
    return 0.0


def sometimes_raises(prompt: Prompt, response_text: str, stopped: bool) -> float:
    if prompt.index % 4 == 1:
        raise RuntimeError(f"verifier bug on {prompt.text!r}")
    return 0.0


def sometimes_huge(prompt: Prompt, response_text: str, stopped: bool) -> float:
    """1e39 (finite as a Python float, inf as the trainer's float32) for the wrong answers to even
    prompts: groups with right and wrong answers mix it with finite rewards (a group of all-equal
    rewards would be left out of the loss)."""
    return 1e39 if prompt.index % 2 == 0 and response_text.strip() != prompt.answer else 0.0
