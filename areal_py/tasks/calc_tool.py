"""`calc_tool`: multi-digit products the tiny model cannot compute in its head but can with a calculator.

Prompt ``347*86=``; the rewarded response calls the calculator and copies its result:

    <calc>347*86</calc><result>29842</result>29842

``<calc>...</calc>`` is the model's; ``<result>...</result>`` is the tool's output, appended by the
``tool_loop`` workflow (rollout.workflow=tool_loop, rollout.tool_tags={calc: calculator}); the final
``29842`` and EOS are the model's again. Reward: 1 when the response ended with EOS and its final
answer equals the product, else 0. The final answer is the text after the last ``</result>`` when
the response has one, else the whole response (an answer given without the tool).

Cold start (`sft_segments`): a `direct_share` of the examples answer directly (the right product, as a
dataset of worked answers would), the rest call the tool. The embedded model cannot learn to multiply
multi-digit numbers in its head, so its direct answers are mostly wrong: the start model uses the tool
on about 1 - direct_share of prompts and RL raises that share, and with it the reward. A `label_noise`
share of the tool-using examples copies one digit wrong (into the call or the answer), so copying
is imperfect too. The tool's result tokens are in the SFT context but out of its loss (``trained``
False), exactly as `tool_loop` masks them in RL: the model is never taught to predict a tool output.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from areal_py.tasks.base import ChatTemplateMode, Prompt, RunLimits, TaskConfig, TaskRecipe, register_task

CALL_OPEN, CALL_CLOSE = "<calc>", "</calc>"
RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"


class CalcToolConfig(TaskConfig):
    name: Literal["calc_tool"] = Field("calc_tool", description="calc_tool: multi-digit products solved by calling "
                                       "the calculator (<calc>a*b</calc>) and copying its <result>.")
    min_operand: int = Field(10, ge=0, description="calc_tool: smallest operand.")
    max_operand: int = Field(999, ge=0, description="calc_tool: largest operand.")
    direct_share: float = Field(0.5, ge=0, le=1, description="calc_tool: share of the cold-start examples that "
                                "answer directly, without the tool (the start model then calls it on about the rest; "
                                "RL raises that share).")
    chat_template: ChatTemplateMode = Field(
        "false", description="calc_tool: raw-text prompts by default (the embedded model's cold start trains on them).")

    def check(self, limits: RunLimits) -> None:
        if self.min_operand > self.max_operand:
            raise ValueError("task.min_operand must be <= task.max_operand")
        need = len(tool_call(self.max_operand, self.max_operand)) + 1
        if limits.max_new_tokens < need:
            raise ValueError(f"rollout.max_new_tokens={limits.max_new_tokens} is too small for task.max_operand="
                             f"{self.max_operand}: the tool call {tool_call(self.max_operand, self.max_operand)!r} "
                             f"needs {need} tokens")


def tool_call(a: int, b: int) -> str:
    return f"{CALL_OPEN}{a}*{b}{CALL_CLOSE}"


def final_answer(response_text: str) -> str:
    """The text after the last ``</result>``, or the whole response when it has none."""
    return response_text.rsplit(RESULT_CLOSE, 1)[-1]


def _miscopy(digits: str, rng: random.Random) -> str:
    """`digits` with one digit replaced by another (never the same, never a leading 0): a copying mistake."""
    i = rng.randrange(len(digits))
    choices = [d for d in "0123456789" if d != digits[i] and not (d == "0" and i == 0 and len(digits) > 1)]
    return digits[:i] + rng.choice(choices) + digits[i + 1:]


class CalcToolTask:
    """``a*b=`` with a, b in [min_operand, max_operand]; see the module docstring for the format and reward."""

    name = "calc_tool"

    def __init__(self, min_operand: int = 10, max_operand: int = 999, direct_share: float = 0.5, seed: int = 0) -> None:
        if min_operand < 0 or max_operand < min_operand:
            raise ValueError(f"need 0 <= min_operand <= max_operand, got {min_operand}..{max_operand}")
        if not 0.0 <= direct_share <= 1.0:
            raise ValueError(f"direct_share must be in [0, 1], got {direct_share}")
        self.min_operand = min_operand
        self.max_operand = max_operand
        self.direct_share = direct_share
        self.seed = seed

    def operands(self, index: int) -> tuple[int, int]:
        rng = random.Random(f"calc_tool:{self.seed}:{index}")
        return rng.randint(self.min_operand, self.max_operand), rng.randint(self.min_operand, self.max_operand)

    def prompt(self, index: int) -> Prompt:
        a, b = self.operands(index)
        return Prompt(index=index, text=f"{a}*{b}=", answer=str(a * b))

    def reward(self, prompt: Prompt, response_text: str, stopped: bool) -> float:
        return 1.0 if stopped and final_answer(response_text) == prompt.answer else 0.0

    def reference_response(self, index: int) -> str:
        """The rewarded response to prompt `index` with the tool's output in place (EOS follows it)."""
        a, b = self.operands(index)
        return "".join(text for text, _ in self._tool_segments(a, b, str(a * b), str(a * b)))

    def wrong_response(self, index: int, rng: random.Random) -> str:
        """A near miss: the tool called right, its result copied with one digit wrong."""
        a, b = self.operands(index)
        return "".join(text for text, _ in self._tool_segments(a, b, str(a * b), _miscopy(str(a * b), rng)))

    @staticmethod
    def _tool_segments(a: int, b: int, result: str, answer: str, call: str | None = None) -> list[tuple[str, bool]]:
        return [(call or tool_call(a, b), True), (f"{RESULT_OPEN}{result}{RESULT_CLOSE}", False), (answer, True)]

    def sft_segments(self, rng: random.Random, label_noise: float) -> tuple[str, list[tuple[str, bool]]]:
        """A cold-start (prompt, target segments) pair; each segment is (text, trained). The tool's output is
        one untrained segment; with probability `direct_share` the target is the product alone (no tool), and
        with probability `label_noise` a tool-using target miscopies one digit, into the call or the answer."""
        a, b = rng.randint(self.min_operand, self.max_operand), rng.randint(self.min_operand, self.max_operand)
        product = str(a * b)
        prompt = f"{a}*{b}="
        if rng.random() < self.direct_share:
            return prompt, [(product, True)]
        call, answer = tool_call(a, b), product
        if rng.random() < label_noise:
            if rng.random() < 0.5:
                left, right = str(a), str(b)
                left, right = (_miscopy(left, rng), right) if rng.random() < 0.5 else (left, _miscopy(right, rng))
                call = f"{CALL_OPEN}{left}*{right}{CALL_CLOSE}"
                product = str(int(left) * int(right))  # the tool computes what was written
                answer = product
            else:
                answer = _miscopy(product, rng)
        return prompt, self._tool_segments(a, b, product, answer, call)

    def sft_example(self, rng: random.Random, label_noise: float) -> tuple[str, str]:
        """`sft_segments` joined into one target text (tool output included): for consumers of plain pairs."""
        prompt, segments = self.sft_segments(rng, label_noise)
        return prompt, "".join(text for text, _ in segments)


def build(config: CalcToolConfig, seed: int) -> CalcToolTask:
    return CalcToolTask(min_operand=config.min_operand, max_operand=config.max_operand,
                        direct_share=config.direct_share, seed=seed)


def recipe(task: CalcToolTask) -> TaskRecipe:
    if not isinstance(task, CalcToolTask):
        raise TypeError(f"cannot describe task {type(task).__name__} as a calc_tool config")
    return TaskRecipe(CalcToolConfig(min_operand=task.min_operand, max_operand=task.max_operand,
                                     direct_share=task.direct_share), task.seed)


register_task(CalcToolConfig, build, recipe)
