"""`sum_cot`: a long-tailed chain-of-thought workload for the asynchronous-vs-synchronous benchmarks.

Prompt ``3+5+2+7=``; the response writes every partial sum, then the answer after ``;``:
``3,8,10,17;17``. The number of terms k follows a truncated discrete Pareto law,

    k = min(max_terms, floor(min_terms / U ** (1 / alpha))),   U ~ Uniform(0, 1],

so most responses are short (median ~16 tokens with the defaults) and a few run to ~470 tokens,
the shape of real reasoning-length distributions. A synchronous batch has to wait for its
longest member; an asynchronous system keeps its slots full. Reward: 1 for the right final
answer followed by EOS, else 0 (the partial sums are not graded; they are the model's scratchpad).

The cold start may draw k from a shorter law (``sft_max_terms``, ``sft_alpha``): the tiny embedded
model cannot learn to find the i-th term from the long tail, but learns it on short sums.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from areal_py.tasks.base import ChatTemplateMode, Prompt, RunLimits, TaskConfig, TaskRecipe, register_task

ANSWER_SEP = ";"


class SumCotConfig(TaskConfig):
    name: Literal["sum_cot"] = Field("sum_cot", description="sum_cot: long-tailed chain-of-thought sums "
                                     "(partial sums, then the answer).")
    min_terms: int = Field(3, ge=1, description="sum_cot: fewest numbers to add.")
    chat_template: ChatTemplateMode = Field(
        "false", description="sum_cot: raw-text prompts by default (the embedded model's cold start trains on them); "
        "auto or true renders them with the tokenizer's chat template, in the cold start too.")
    max_terms: int = Field(120, ge=1, description="sum_cot: most numbers to add (the long tail is cut here).")
    tail_alpha: float = Field(1.1, gt=0, description="sum_cot: Pareto exponent of the number of terms "
                              "(smaller = heavier tail of long responses).")
    sft_max_terms: int = Field(0, ge=0, description="sum_cot: most terms in the cold-start data (0 = task.max_terms). "
                               "Short sums teach a tiny model to find the i-th term far faster than the long tail.")
    sft_tail_alpha: float = Field(0.0, ge=0, description="sum_cot: Pareto exponent of the cold-start data's number "
                                  "of terms (0 = task.tail_alpha; smaller puts more mass on sft_max_terms).")

    def check(self, limits: RunLimits) -> None:
        check_lengths(self, limits)


def response_for(terms: list[int]) -> str:
    """The reference response: comma-separated partial sums, then ``;`` and the total."""
    sums, total = [], 0
    for t in terms:
        total += t
        sums.append(str(total))
    return ",".join(sums) + ANSWER_SEP + str(total)


def num_terms(rng: random.Random, min_terms: int, max_terms: int, alpha: float) -> int:
    """k = min(max_terms, floor(min_terms / U ** (1 / alpha))), U ~ Uniform(0, 1].

    So P(k >= x) = (min_terms / x) ** alpha for min_terms <= x <= max_terms: the tail mass is cut at max_terms.
    """
    u = 1.0 - rng.random()  # in (0, 1]
    return min(max_terms, int(min_terms / u ** (1.0 / alpha)))


def max_response_chars(max_terms: int, max_digit: int = 9) -> int:
    """Longest possible reference response for `max_terms` terms (all terms = max_digit)."""
    return len(response_for([max_digit] * max_terms))


def check_lengths(t: SumCotConfig, limits: RunLimits) -> None:
    """Config check: a response cut short or a context too small for the longest sum would silently score 0."""
    if t.min_terms > t.max_terms:
        raise ValueError("task.min_terms must be <= task.max_terms")
    if t.sft_max_terms and not t.min_terms <= t.sft_max_terms <= t.max_terms:
        raise ValueError(f"task.sft_max_terms={t.sft_max_terms} must be 0 or within task.min_terms..task.max_terms "
                         f"({t.min_terms}..{t.max_terms}): the cold start must fit the model's context")
    need_new = max_response_chars(t.max_terms) + 1  # + EOS
    if limits.max_new_tokens < need_new:
        raise ValueError(f"rollout.max_new_tokens={limits.max_new_tokens} is too small for "
                         f"task.max_terms={t.max_terms}: the longest answer needs {need_new}")
    need_ctx = 1 + 2 * t.max_terms + need_new
    if not limits.model_path and limits.embedded_context < need_ctx:
        raise ValueError(f"model.embedded.max_position_embeddings={limits.embedded_context} "
                         f"is too small for task.max_terms={t.max_terms}: need {need_ctx}")


class SumCotTask:
    """Sums of k single digits with k long-tailed; see the module docstring for the format."""

    name = "sum_cot"

    def __init__(self, min_terms: int = 3, max_terms: int = 120, alpha: float = 1.1, seed: int = 0,
                 sft_max_terms: int | None = None, sft_alpha: float | None = None) -> None:
        if not 1 <= min_terms <= max_terms:
            raise ValueError(f"need 1 <= min_terms <= max_terms, got {min_terms}..{max_terms}")
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.min_terms = min_terms
        self.max_terms = max_terms
        self.alpha = alpha
        self.seed = seed
        # The cold-start data may come from a shorter distribution than the RL prompts: a tiny model
        # learns to find the i-th term on short sums, which it does not learn from the long tail.
        self.sft_max_terms = max_terms if sft_max_terms is None else sft_max_terms
        self.sft_alpha = alpha if sft_alpha is None else sft_alpha
        if not min_terms <= self.sft_max_terms:
            raise ValueError(f"need sft_max_terms >= min_terms={min_terms}, got {self.sft_max_terms}")
        if self.sft_alpha <= 0:
            raise ValueError(f"sft_alpha must be > 0, got {self.sft_alpha}")

    def num_terms(self, rng: random.Random) -> int:
        return num_terms(rng, self.min_terms, self.max_terms, self.alpha)

    def terms(self, index: int) -> list[int]:
        rng = random.Random(f"sum_cot:{self.seed}:{index}")
        return [rng.randint(0, 9) for _ in range(self.num_terms(rng))]

    def prompt(self, index: int) -> Prompt:
        terms = self.terms(index)
        return Prompt(index=index, text="+".join(map(str, terms)) + "=", answer=str(sum(terms)))

    def reward(self, prompt: Prompt, response_text: str, stopped: bool) -> float:
        if not stopped or ANSWER_SEP not in response_text:
            return 0.0
        return 1.0 if response_text.rsplit(ANSWER_SEP, 1)[1] == prompt.answer else 0.0

    def reference_response(self, index: int) -> str:
        """The rewarded response to prompt `index`: every partial sum, then the answer."""
        return response_for(self.terms(index))

    def wrong_response(self, index: int, rng: random.Random) -> str:
        """A consistent but wrong worked solution for prompt `index`: one term changed by 1..9 (mod 10), so the
        partial sums from it on and the answer are wrong (the total moves by d or d - 10, never 0)."""
        worked = self.terms(index)
        i = rng.randrange(len(worked))
        worked[i] = (worked[i] + rng.randint(1, 9)) % 10
        return response_for(worked)

    def sft_example(self, rng: random.Random, label_noise: float) -> tuple[str, str]:
        """A (prompt, target) pair for the cold start, k drawn with (sft_max_terms, sft_alpha).

        With probability `label_noise` one term is silently changed in the worked solution, so the
        partial sums from there on and the answer are wrong but consistent: the format is taught
        perfectly while accuracy stays below 100%, leaving room for RL.
        """
        k = num_terms(rng, self.min_terms, self.sft_max_terms, self.sft_alpha)
        terms = [rng.randint(0, 9) for _ in range(k)]
        prompt = "+".join(map(str, terms)) + "="
        worked = list(terms)
        if rng.random() < label_noise:
            i = rng.randrange(len(worked))
            worked[i] = (worked[i] + rng.randint(1, 9)) % 10
        return prompt, response_for(worked)

    def max_response_tokens(self) -> int:
        """Characters (= tokens for the character tokenizer) of the longest possible response."""
        return max_response_chars(self.max_terms)

    def max_prompt_tokens(self) -> int:
        return 2 * self.max_terms


def build(config: SumCotConfig, seed: int) -> SumCotTask:
    """0 in sft_max_terms / sft_tail_alpha means "as the RL prompts" (the task's None)."""
    return SumCotTask(min_terms=config.min_terms, max_terms=config.max_terms, alpha=config.tail_alpha, seed=seed,
                      sft_max_terms=config.sft_max_terms or None, sft_alpha=config.sft_tail_alpha or None)


def recipe(task: SumCotTask) -> TaskRecipe:
    """The inverse of `build`; a cold-start setting equal to the RL one is written as 0 ("the same")."""
    if not isinstance(task, SumCotTask):
        raise TypeError(f"cannot describe task {type(task).__name__} as a sum_cot config")
    config = SumCotConfig(min_terms=task.min_terms, max_terms=task.max_terms, tail_alpha=task.alpha,
                          sft_max_terms=0 if task.sft_max_terms == task.max_terms else task.sft_max_terms,
                          sft_tail_alpha=0.0 if task.sft_alpha == task.alpha else task.sft_alpha)
    return TaskRecipe(config, task.seed)


register_task(SumCotConfig, build, recipe)
