"""Warn when training has no learning signal: N observations in a row without an informative sample.

A GRPO-style group whose rewards are all equal has zero advantage: it trains nothing. A run whose
every group is uniform (a reward that is always 0, a task far too hard or too easy) goes on to its
last step, reports "done", and has learned nothing. This watch makes that loud: the trainer feeds
it each step's informative sample count, the controller (under dynamic sampling, where uniform
groups are dropped before any step) each scored group.

Rule: ``streak`` = observations in a row with zero informative items, this one included (0 after
one with some). ``observe`` returns True when ``streak`` reaches ``limit`` and at every further
multiple of it (N, 2N, 3N, ...), so a long silent stretch keeps warning without a line per step;
``limit`` 0 never warns.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SignalWatch"]


@dataclass
class SignalWatch:
    """Counts observations in a row without signal; see the module docstring for the rule."""
    limit: int
    streak: int = 0

    def __post_init__(self) -> None:
        if self.limit < 0:
            raise ValueError(f"the uninformative-streak limit must be >= 0 (0 = never warn), got {self.limit}")

    def observe(self, informative: float) -> bool:
        """Record one observation with ``informative`` items of signal; True when it is time to warn."""
        if informative > 0:
            self.streak = 0
            return False
        self.streak += 1
        return self.limit > 0 and self.streak % self.limit == 0
