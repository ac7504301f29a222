"""Reward functions and their weighted composition.

Every reward function has one signature, ``fn(prompt: Prompt, response_text: str, stopped: bool)
-> float`` (``stopped``: the response ended with EOS). Built in, by name:

- ``accuracy``: the task's own reward (exact match for ``arith`` and ``sum_cot``, math-verify for ``jsonl``).
- ``math_accuracy``: 1.0 iff the response's final answer (found as ``reward.answer`` says, think block
  excluded, strict by default) is math-verify-equivalent to ``prompt.answer``.
- ``think_answer_format``: DeepSeek-R1's format reward, see :data:`THINK_ANSWER_RE`.
- ``reward_model``: a sequence-classification model's score of ``prompt.text + response_text``
  (:mod:`areal_py.rewards.reward_model`); needs ``reward_model={"path": ...}``.
- ``"package.module:function"``: your own verifier, imported by path. This is how users plug in
  their own rewards: any top-level function with the signature above, importable in a fresh
  Python process (it is imported again in every pool worker).

A spec is a ``{name: weight}`` dict; :func:`build_reward_fn` turns it into the weighted sum
``sum(weight * fn(...))``, e.g. ``{"accuracy": 1.0, "think_answer_format": 0.5}``. The process
pool that runs them with a timeout is :mod:`controller.reward_pool`.
"""
from __future__ import annotations

import functools
import math
import re
import struct
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from areal_py.import_spec import load_callable
from areal_py.tasks.answer_extraction import DEFAULT_EXTRACTION, AnswerExtraction
from areal_py.tasks.base import Prompt, Task, TaskRecipe, build_task, recipe_of
from areal_py.tasks.math_answer import grade_answer

RewardFn = Callable[[Prompt, str, bool], float]


# ---------------------------------------------------------------------------------------------
# Reward functions


def _task_accuracy(task: Task, prompt: Prompt, response_text: str, stopped: bool) -> float:
    return float(task.reward(prompt, response_text, stopped))


def accuracy(task: Task) -> RewardFn:
    """The task's own reward as a reward function (a partial over ``task``)."""
    return functools.partial(_task_accuracy, task)


def math_accuracy(prompt: Prompt, response_text: str, stopped: bool,
                  answer: AnswerExtraction = DEFAULT_EXTRACTION) -> float:
    """1.0 iff the response's final answer is math-verify-equivalent to ``prompt.answer``.

    The final answer is found by ``answer`` (``reward.answer``; default: ``auto``, strict), see
    :mod:`areal_py.tasks.answer_extraction`: the think block is never graded, and in strict mode
    a response with several different candidate answers, or none in the form, scores 0.
    ``stopped`` is ignored, so a truncated response that already holds its answer still counts.
    """
    return grade_answer(prompt.answer, response_text, answer)


_NO_TAG = r"(?:(?!</?(?:think|answer)>).)*"
THINK_ANSWER_RE = re.compile(rf"\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*", re.DOTALL)
"""The format ``think_answer_format`` checks, applied with ``fullmatch``::

    \\s*<think>X</think>\\s*<answer>X</answer>\\s*      (re.DOTALL)
    X = (?:(?!</?(?:think|answer)>).)*                  any text, newlines included, without a tag

So exactly one think block then exactly one answer block; only whitespace before, between and
after; tags are case-sensitive; either block may be empty (as in DeepSeek-R1 / open-r1, where
``.*?`` also allows it); no ``<think>``, ``</think>``, ``<answer>`` or ``</answer>`` inside a block.
"""


def think_answer_format(prompt: Prompt, response_text: str, stopped: bool) -> float:
    """1.0 iff the response is ``<think>...</think><answer>...</answer>`` (see THINK_ANSWER_RE)."""
    return 1.0 if THINK_ANSWER_RE.fullmatch(response_text) else 0.0


def _constant(fn: RewardFn) -> Callable[[Task | None, AnswerExtraction], RewardFn]:
    return lambda task, answer: fn


# name -> builder(task, answer extraction) -> reward function. `accuracy` needs a task;
# `math_accuracy` uses the answer extraction; the others ignore both.
REWARD_FUNCTIONS: dict[str, Callable[[Task | None, AnswerExtraction], RewardFn]] = {
    "accuracy": lambda task, answer: accuracy(_need_task(task)),
    "math_accuracy": lambda task, answer: functools.partial(math_accuracy, answer=answer),
    "think_answer_format": _constant(think_answer_format),
}
REWARD_MODEL = "reward_model"


def _need_task(task: Task | None) -> Task:
    if task is None:
        raise ValueError("reward function 'accuracy' needs a task")
    return task


def allowed_names() -> list[str]:
    return [*sorted(REWARD_FUNCTIONS), REWARD_MODEL, "module:function"]


def import_reward_fn(path: str) -> RewardFn:
    """Import ``"package.module:function"``; ValueError naming the path when it is not a callable."""
    return load_callable(path, f"custom reward {path!r}")


class WeightedReward:
    """``sum(weight * fn(prompt, response_text, stopped))`` over named terms.

    Calling it lets exceptions propagate; :meth:`score` (used by :class:`RewardPool`) catches
    them per term instead. A term with a ``batch(prompts, responses, stopped) -> list[float]``
    method (the reward model) is evaluated for a whole list at once by :meth:`score`.
    """

    def __init__(self, terms: list[tuple[str, float, RewardFn]]) -> None:
        self.terms = terms

    def __call__(self, prompt: Prompt, response_text: str, stopped: bool) -> float:
        total = sum(_weighted(w, fn(prompt, response_text, stopped)) for _, w, fn in self.terms)
        return as_float32(total, "the sum of the weighted reward terms")

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str], stopped: Sequence[bool]
              ) -> Iterator[tuple[str, Any]]:
        """Yield ``("batched", None)`` once the batched terms are done, then for each sample
        ``("item", (value, errors))`` with errors a list of ``(term name, message)``."""
        batched: dict[str, list[float] | str] = {}
        for name, _, fn in self.terms:
            if hasattr(fn, "batch"):
                try:
                    values = fn.batch(prompts, responses, stopped)
                    if len(values) != len(prompts):
                        raise ValueError(f"batch returned {len(values)} values for {len(prompts)} samples")
                    batched[name] = [float(v) for v in values]  # checked per sample below
                except Exception:  # noqa: BLE001 - reported per sample below
                    batched[name] = short_traceback()
        yield "batched", None
        for i, (prompt, response, stop) in enumerate(zip(prompts, responses, stopped)):
            total, errors = 0.0, []
            for name, w, fn in self.terms:
                try:
                    if name in batched:
                        value = batched[name]
                        if isinstance(value, str):
                            errors.append((name, value))
                            continue
                        total += _weighted(w, value[i])
                    else:
                        total += _weighted(w, fn(prompt, response, stop))
                except NonFiniteReward as e:  # a plain message: the traceback would say nothing more
                    errors.append((name, str(e)))
                except Exception:  # noqa: BLE001 - a verifier failure scores 0 and is reported
                    errors.append((name, short_traceback()))
            try:
                as_float32(total, "the sum of the weighted reward terms")
            except NonFiniteReward as e:  # every term fits, their sum does not: no term to blame
                total = 0.0
                errors.append(("sum of terms", str(e)))
            yield "item", (total, errors)


class NonFiniteReward(ValueError):
    """A reward (term, weighted term or sum) that is not a finite float32."""


def as_float32(value: Any, what: str = "reward") -> float:
    """``float(value)``, checked to be finite once rounded to float32; NonFiniteReward otherwise.

    The trainer holds rewards in float32 tensors. A Python float is finite up to 1.8e308, a
    float32 only up to 3.4e38, so a reward of 1e39 passes ``math.isfinite`` yet is inf in the
    batch, and one inf reward makes the loss, then every weight, NaN. Rewards are therefore
    checked after the conversion the trainer will make.
    """
    value = float(value)
    try:
        rounded = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # struct refuses a finite double beyond float32's range
        rounded = math.inf
    if not math.isfinite(rounded):
        raise NonFiniteReward(f"{what} is not finite in float32 (the trainer's dtype): {value!r}")
    return value


def _weighted(weight: float, value: Any) -> float:
    """``weight * value``, both the raw value and the weighted term checked by :func:`as_float32`."""
    return as_float32(weight * as_float32(value), f"reward {float(value)!r} x weight {weight!r}")


def short_traceback(limit: int = 2000) -> str:
    """The exception being handled, formatted, cut to its last ``limit`` characters."""
    text = traceback.format_exc()
    return text if len(text) <= limit else "..." + text[-limit:]


def validate_spec(spec: dict[str, float], reward_model: dict[str, Any] | None = None) -> None:
    """Check names and weights without building anything expensive (no model is loaded)."""
    if not spec:
        raise ValueError(f"empty reward spec; name at least one of {allowed_names()}")
    for name, weight in spec.items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
            raise ValueError(f"reward {name!r}: weight must be a finite number, got {weight!r}")
        if name in REWARD_FUNCTIONS:
            continue
        if name == REWARD_MODEL:
            if not reward_model or not reward_model.get("path"):
                raise ValueError("reward 'reward_model' needs reward_model={'path': <model directory>}")
            continue
        if ":" in name:
            import_reward_fn(name)
            continue
        raise ValueError(f"unknown reward function {name!r}; allowed: {allowed_names()}")


def build_reward_fn(spec: dict[str, float], task: Task | None,
                    reward_model: dict[str, Any] | None = None,
                    answer: AnswerExtraction = DEFAULT_EXTRACTION) -> WeightedReward:
    """The weighted sum of the named reward functions, e.g. ``{"accuracy": 1, "think_answer_format": 0.5}``.

    ``reward_model``: keyword arguments of :class:`areal_py.rewards.reward_model.RewardModelScorer`
    (``path`` required), used when the spec names ``reward_model``; the model is loaded here.
    ``answer``: how ``math_accuracy`` finds the final answer (``reward.answer``).
    Unknown names raise ValueError listing the allowed ones.
    """
    validate_spec(spec, reward_model)
    terms: list[tuple[str, float, RewardFn]] = []
    for name, weight in spec.items():
        if name in REWARD_FUNCTIONS:
            fn = REWARD_FUNCTIONS[name](task, answer)
        elif name == REWARD_MODEL:
            # torch + transformers: imported only when a reward model is asked for
            from areal_py.rewards.reward_model import RewardModelReward, RewardModelScorer

            fn = RewardModelReward(RewardModelScorer(**reward_model))
        else:
            fn = import_reward_fn(name)
        terms.append((name, float(weight), fn))
    return WeightedReward(terms)


def task_recipe(task: Task | TaskRecipe | None) -> TaskRecipe | None:
    """What a reward worker rebuilds the task from: the task's registered config model and seed.

    Any registered task (a module of :mod:`areal_py.tasks`) can be described; None stays None."""
    if task is None or isinstance(task, TaskRecipe):
        return task
    return recipe_of(task)


def task_from_recipe(recipe: TaskRecipe | None) -> Task | None:
    """The inverse of :func:`task_recipe`, by the same ``build_task`` the controller's task came from."""
    return None if recipe is None else build_task(recipe.config, recipe.seed)
