"""Everything a run left out, by reason: one typed view over the step records for the report and the dashboard.

A run that skips work must say so where its user looks. Each reason below is counted where it happens
and reaches three places: the step record (``metrics.jsonl``), Prometheus and the report's "Skipped"
table (``skip_counts``). The reasons, their units and where they are counted:

=================  ========  =====================================  =======================================
reason             unit      step record (cumulative)               Prometheus
=================  ========  =====================================  =======================================
too_long           prompts   ctrl_skipped_too_long                  areal_controller_skipped_prompts_total
bad_line           lines     ctrl_skipped_bad_lines                 areal_controller_skipped_prompts_total
uniform            groups    ctrl_dropped_uniform                   areal_controller_dropped_groups_total
stale              groups    ctrl_dropped_stale                     areal_controller_dropped_groups_total
aborted            groups    ctrl_dropped_aborted                   areal_controller_dropped_groups_total
reward_error       rewards   ctrl_reward_errors                     areal_reward_errors_total
reward_timeout     samples   ctrl_reward_timeouts                   areal_reward_timeouts_total
nonfinite_reward   groups    rejected_groups_nonfinite_reward       areal_trainer_rejected_groups_total
nonfinite_logprob  groups    rejected_groups_nonfinite_logprob      areal_trainer_rejected_groups_total
=================  ========  =====================================  =======================================

(the Prometheus counters carry the reason as their ``reason`` label; the controller's counts are
cumulative since the run started, resumes included, except the reward pool's two, which count from the
controller's start; the trainer's ``rejected_groups_*`` are per step and summed here.) A reward error or timeout does not drop the sample: that reward term scores 0, which is why
it is counted, not hidden.

``SkipsLines`` is what a task that leaves malformed data lines out at load exposes (``bad_lines``), so
the controller can count them (reason ``bad_line``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from areal_py.telemetry.step_record import StepRecord

__all__ = ["SKIP_REASONS", "SignalSummary", "SkipCount", "SkipReason", "SkipsLines", "signal_summary",
           "skip_counts", "skipped_lines"]


@runtime_checkable
class SkipsLines(Protocol):
    """A task whose loader left data lines out (malformed JSON, a missing key...), one entry per line in
    ``bad_lines`` (the jsonl task built leniently, ``areal_py.tasks.jsonl.BadLine``)."""
    bad_lines: Sequence[object]


def skipped_lines(task: object) -> int:
    """The data lines ``task`` left out at load (0 for a task that skips none)."""
    return len(task.bad_lines) if isinstance(task, SkipsLines) else 0


@dataclass(frozen=True)
class SkipReason:
    reason: str
    unit: str
    what: str
    cumulative: Callable[[StepRecord], int | None] | None = None  # read from the last record
    per_step: Callable[[StepRecord], int | None] | None = None    # summed over the records


SKIP_REASONS: tuple[SkipReason, ...] = (
    SkipReason("too_long", "prompts", "prompts too long for the model's context, never dispatched",
               cumulative=lambda r: r.controller.skipped_too_long),
    SkipReason("bad_line", "lines", "data lines the task could not load (malformed, missing a key)",
               cumulative=lambda r: r.controller.skipped_bad_lines),
    SkipReason("uniform", "groups", "groups dropped by dynamic sampling: every reward equal",
               cumulative=lambda r: r.controller.dropped_uniform),
    SkipReason("stale", "groups", "groups dropped as too stale for any batch to come",
               cumulative=lambda r: r.controller.dropped_stale),
    SkipReason("aborted", "groups", "groups a rollout server refused (finish_reason abort)",
               cumulative=lambda r: r.controller.dropped_aborted),
    SkipReason("reward_error", "rewards", "reward functions that raised or gave a non-finite value (scored 0)",
               cumulative=lambda r: r.controller.reward_errors),
    SkipReason("reward_timeout", "samples", "rewards that ran past reward.timeout_s (scored 0)",
               cumulative=lambda r: r.controller.reward_timeouts),
    SkipReason("nonfinite_reward", "groups", "groups kept out of the loss: a reward not finite in float32",
               per_step=lambda r: r.rejected_groups_nonfinite_reward),
    SkipReason("nonfinite_logprob", "groups", "groups kept out of the loss: a behaviour logprob not finite",
               per_step=lambda r: r.rejected_groups_nonfinite_logprob),
)


@dataclass(frozen=True)
class SkipCount:
    """One reason's count over the run so far; ``count`` None: no record holds it (an older run)."""
    reason: str
    unit: str
    what: str
    count: int | None


def skip_counts(records: Sequence[StepRecord]) -> list[SkipCount]:
    """Every reason of ``SKIP_REASONS`` with its count: cumulative counters as of the last record that
    holds them, per-step counts summed over the records that hold them."""
    out = []
    for s in SKIP_REASONS:
        count: int | None = None
        if s.cumulative is not None:
            count = next((v for r in reversed(records) if (v := s.cumulative(r)) is not None), None)
        elif s.per_step is not None:
            values = [v for r in records if (v := s.per_step(r)) is not None]
            count = sum(values) if values else None
        out.append(SkipCount(s.reason, s.unit, s.what, count))
    return out


@dataclass(frozen=True)
class SignalSummary:
    """Steps that trained no informative sample: how many (``without``) of the ``steps`` that recorded
    ``informative_samples``, and the longest stretch of them in a row (``longest``)."""
    steps: int
    without: int
    longest: int


def signal_summary(records: Sequence[StepRecord]) -> SignalSummary | None:
    """From each record's ``informative_samples`` (None: no record holds it). A step that recorded no count
    interrupts nothing: the stretch is over the steps that did."""
    counts = [r.informative_samples for r in records if r.informative_samples is not None]
    if not counts:
        return None
    longest = run = 0
    for c in counts:
        run = run + 1 if c <= 0 else 0
        longest = max(longest, run)
    return SignalSummary(steps=len(counts), without=sum(1 for c in counts if c <= 0), longest=longest)
