"""`arith`: "a+b=" with operands in [min_operand, max_operand]; reward is exact match plus EOS."""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from areal_py.tasks.base import ChatTemplateMode, Prompt, RunLimits, TaskConfig, TaskRecipe, register_task


class ArithConfig(TaskConfig):
    name: Literal["arith"] = Field("arith", description="arith: synthetic a+b sums.")
    min_operand: int = Field(0, ge=0, description="arith: smallest operand.")
    max_operand: int = Field(9, ge=0, description="arith: largest operand.")
    chat_template: ChatTemplateMode = Field(
        "false", description="arith: raw-text prompts by default (the embedded model's cold start trains on them); "
        "auto or true renders them with the tokenizer's chat template, in the cold start too.")

    def check(self, limits: RunLimits) -> None:
        if self.min_operand > self.max_operand:
            raise ValueError("task.min_operand must be <= task.max_operand")


class ArithTask:
    """"a+b=" with operands in [min_operand, max_operand]; reward is exact match plus EOS."""

    name = "arith"

    def __init__(self, min_operand: int = 0, max_operand: int = 9, seed: int = 0) -> None:
        if min_operand < 0 or max_operand < min_operand:
            raise ValueError(
                f"need 0 <= min_operand <= max_operand, got {min_operand}..{max_operand}"
            )
        self.min_operand = min_operand
        self.max_operand = max_operand
        self.seed = seed

    def operands(self, index: int) -> tuple[int, int]:
        # A string seed is hashed deterministically (unlike tuple hash, stable across runs).
        rng = random.Random(f"arith:{self.seed}:{index}")
        return (
            rng.randint(self.min_operand, self.max_operand),
            rng.randint(self.min_operand, self.max_operand),
        )

    def prompt(self, index: int) -> Prompt:
        a, b = self.operands(index)
        return Prompt(index=index, text=f"{a}+{b}=", answer=str(a + b))

    def reward(self, prompt: Prompt, response_text: str, stopped: bool) -> float:
        return 1.0 if stopped and response_text == prompt.answer else 0.0

    def reference_response(self, index: int) -> str:
        """The rewarded response to prompt `index` (EOS follows it): the sum."""
        return self.prompt(index).answer

    def wrong_response(self, index: int, rng: random.Random) -> str:
        """A near miss for prompt `index`: the sum off by 1..9, down when that stays >= 0 and a coin says so,
        else up; never the right sum (a preference pair's rejected response)."""
        answer = int(self.prompt(index).answer)
        delta = rng.randint(1, 9)
        return str(answer - delta if rng.random() < 0.5 and answer - delta >= 0 else answer + delta)

    def sft_example(self, rng: random.Random, label_noise: float) -> tuple[str, str]:
        """Any index works: the task is synthetic, so SFT and RL prompts share a distribution.

        With prob. `label_noise` the answer is wrong: half the time off by 1..9 (kept >= 0),
        otherwise uniform over the possible sums.
        """
        p = self.prompt(rng.randrange(1 << 31))
        answer = int(p.answer)
        if rng.random() < label_noise:
            if rng.random() < 0.5:
                delta = rng.randint(1, 9)
                down = answer - delta
                answer = down if rng.random() < 0.5 and down >= 0 else answer + delta
            else:
                answer = rng.randint(2 * self.min_operand, 2 * self.max_operand)
        return p.text, str(answer)


def build(config: ArithConfig, seed: int) -> ArithTask:
    return ArithTask(min_operand=config.min_operand, max_operand=config.max_operand, seed=seed)


def recipe(task: ArithTask) -> TaskRecipe:
    if not isinstance(task, ArithTask):
        raise TypeError(f"cannot describe task {type(task).__name__} as an arith config")
    return TaskRecipe(ArithConfig(min_operand=task.min_operand, max_operand=task.max_operand), task.seed)


register_task(ArithConfig, build, recipe)
