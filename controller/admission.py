"""Prompt-length admission: a prompt that cannot fit the model's context is skipped, never dispatched.

The rollout engine refuses a prompt of `context` tokens or more (no room for one new token) and
answers it with `abort`; dispatching such prompts only to drop them is a live-lock when the data
holds nothing shorter. So the controller applies the engine's own rule at admission, counts every
skip, and stops the run once it has skipped `limit` prompts in a row: nothing admissible is left.
"""
from __future__ import annotations

import logging

from areal_py.model_dir import fits_context
from areal_py.telemetry.prom import CONTROLLER as M
from areal_py.wire.transport import RateLimitedLog

log = logging.getLogger("controller")


class AdmissionError(RuntimeError):
    """Nothing admissible is left (prompts all too long, groups all refused by the servers): the run
    stops with this instead of spinning until the trainer times out waiting for a batch."""


class LengthGate:
    """Counts prompts too long for the context (`total`, and in a row since the last one that fit).

    The in-a-row count resets at every prompt that fits, so data with some long prompts runs on;
    `limit` in a row raise AdmissionError naming the task, the context and the lengths seen.
    """

    def __init__(self, context: int | None, limit: int, task_name: str) -> None:
        self.context, self.limit, self.task_name = context, limit, task_name
        self.total = 0
        self.in_a_row = 0
        self._first_index = 0
        self._shortest = self._longest = 0
        self.skip_log = RateLimitedLog(log)

    def fits(self, prompt_index: int, n_tokens: int) -> bool:
        """Whether a prompt of `n_tokens` may be admitted; one that may not is counted here."""
        if fits_context(n_tokens, self.context):
            self.in_a_row = 0
            return True
        self.total += 1
        M.skipped_prompts.labels(reason="too_long").inc()
        if self.in_a_row == 0:
            self._first_index, self._shortest, self._longest = prompt_index, n_tokens, n_tokens
        self.in_a_row += 1
        self._shortest, self._longest = min(self._shortest, n_tokens), max(self._longest, n_tokens)
        self.skip_log.warning("too_long", "prompt %d of task %s skipped: %d tokens leave no room in the model's context "
                              "of %d (%d skipped so far)", prompt_index, self.task_name, n_tokens, self.context, self.total)
        if self.in_a_row >= self.limit:
            lengths = f"{self._shortest}" if self._shortest == self._longest else f"{self._shortest}..{self._longest}"
            raise AdmissionError(
                f"controller: the last {self.in_a_row} prompts of task {self.task_name!r} (positions "
                f"{self._first_index}..{prompt_index}) are all too long for the model's context of {self.context} "
                f"tokens: {lengths} tokens each, at most {self.context - 1} fit (controller."
                f"max_consecutive_skipped_prompts={self.limit}); nothing admissible is left: shorten the prompts "
                f"or use a model with a longer context")
        return False
