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
from typing import TYPE_CHECKING

from areal_py.tasks.base import Prompt

if TYPE_CHECKING:
    from areal_py.config import ModelConfig, RolloutConfig, TaskConfig

ANSWER_SEP = ";"


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


def check_lengths(t: TaskConfig, rollout: RolloutConfig, model: ModelConfig) -> None:
    """Config check: a response cut short or a context too small for the longest sum would silently score 0."""
    if t.min_terms > t.max_terms:
        raise ValueError("task.min_terms must be <= task.max_terms")
    if t.sft_max_terms and not t.min_terms <= t.sft_max_terms <= t.max_terms:
        raise ValueError(f"task.sft_max_terms={t.sft_max_terms} must be 0 or within task.min_terms..task.max_terms "
                         f"({t.min_terms}..{t.max_terms}): the cold start must fit the model's context")
    need_new = max_response_chars(t.max_terms) + 1  # + EOS
    if rollout.max_new_tokens < need_new:
        raise ValueError(f"rollout.max_new_tokens={rollout.max_new_tokens} is too small for "
                         f"task.max_terms={t.max_terms}: the longest answer needs {need_new}")
    need_ctx = 1 + 2 * t.max_terms + need_new
    if not model.path and model.embedded.max_position_embeddings < need_ctx:
        raise ValueError(f"model.embedded.max_position_embeddings={model.embedded.max_position_embeddings} "
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
