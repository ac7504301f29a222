"""What a finished run achieved, from its `metrics.jsonl`: the numbers benchmarks and sweeps compare.

Pure functions over the per-step records, so every comparison (async vs sync, a staleness sweep,
the ablation) summarises runs the same way.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from areal_py.telemetry.step_record import StepRecord, read_step_records


@dataclass(frozen=True)
class RunSummary:
    """One run in numbers. Rewards are window means (window = max(5, steps // 10)): single steps are too noisy
    to compare runs by, and a tenth of the run still tracks where it ended up."""
    steps: int
    wall_time_s: float            # RL wall time: the last record's wall_time_s (trainer start -> last step)
    trained_samples: int
    samples_per_s: float          # trained samples / wall_time_s
    trained_tokens_per_s: float   # trained tokens (prompt + response) / wall_time_s
    trainer_busy: float           # sum(train_s) / wall_time_s
    slot_occupancy: float | None  # time-weighted mean of rollout_slot_occupancy (None: not recorded)
    reward_first: float           # mean reward over the first `window` steps
    reward_final: float           # mean reward over the last `window` steps
    window: int                   # max(5, steps // 10)
    time_to_threshold_s: float | None  # first wall_time_s where the trailing `window`-step mean reaches it
    staleness_mean: float         # mean over steps of the per-step mean token staleness
    staleness_max: int
    dropped_stale: int            # groups dropped (or aborted) as too stale
    response_len_mean: float      # mean response length of trained samples
    reward_final_sem: float = 0.0  # standard error of reward_final (stdev of the window / sqrt(window)): its noise
    prompt_len_final: float | None = None  # mean prompt tokens per sample over the last `window` steps (None:
    # not recorded): what reward_final was measured on. Async trains short answers first, so its last
    # batches hold longer, harder prompts; compare this before reading a reward_final gap as learning.

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def window_for(steps: int) -> int:
    """Reward window: a tenth of the run, at least 5 steps (single steps are too noisy)."""
    return max(5, steps // 10)


def _required(r: StepRecord, name: str, value: float | None) -> float:
    """A field every summarised record must hold (each trainer version wrote it)."""
    if value is None:
        raise ValueError(f"step {r.step} has no {name}: not a trainer's step record")
    return float(value)


def _reward(r: StepRecord) -> float:
    return _required(r, "reward_mean", r.reward_mean)


def _wall(r: StepRecord) -> float:
    return _required(r, "wall_time_s", r.wall_time_s)


def time_to_threshold(records: list[StepRecord], threshold: float, window: int) -> float | None:
    """First wall time at which the mean reward of the trailing `window` steps is >= threshold; None if it never
    is (including runs shorter than `window`): one lucky step must not count as reaching it."""
    for i in range(window - 1, len(records)):
        tail = records[i - window + 1: i + 1]
        if statistics.fmean(_reward(r) for r in tail) >= threshold:
            return _wall(records[i])
    return None


def _occupancy(records: list[StepRecord]) -> float | None:
    """Occupancy weighted by each step's duration (a long step holds its occupancy longer)."""
    num = den = 0.0
    prev = 0.0
    for r in records:
        occ, t = r.rollout_slot_occupancy, _wall(r)
        if occ is not None and t > prev:
            num += occ * (t - prev)
            den += t - prev
        prev = t
    return num / den if den else None


def summarize_records(records: list[StepRecord], reward_threshold: float | None = None) -> RunSummary:
    """Summary of per-step records in step order (the lines of a metrics.jsonl)."""
    if not records:
        raise ValueError("no training steps recorded: nothing to summarise")
    steps = len(records)
    wall = _wall(records[-1])
    if wall <= 0:
        raise ValueError(f"the last record's wall_time_s is {wall}: cannot compute rates")
    w = window_for(steps)
    samples = sum(r.samples or 0 for r in records)
    rewards = [_reward(r) for r in records]
    resp = [r.response_len_mean for r in records if r.response_len_mean is not None]
    tail = rewards[-w:]
    return RunSummary(
        steps=steps,
        wall_time_s=wall,
        trained_samples=samples,
        samples_per_s=samples / wall,
        trained_tokens_per_s=sum(r.trained_tokens or 0 for r in records) / wall,
        trainer_busy=sum(r.train_s or 0.0 for r in records) / wall,
        slot_occupancy=_occupancy(records),
        reward_first=statistics.fmean(rewards[:w]),
        reward_final=statistics.fmean(rewards[-w:]),
        window=w,
        time_to_threshold_s=None if reward_threshold is None else time_to_threshold(records, reward_threshold, w),
        staleness_mean=statistics.fmean(r.staleness_mean or 0.0 for r in records),
        staleness_max=max(r.staleness_max or 0 for r in records),
        dropped_stale=records[-1].controller.dropped_stale or 0,
        response_len_mean=statistics.fmean(resp) if resp else 0.0,
        reward_final_sem=statistics.stdev(tail) / len(tail) ** 0.5 if len(tail) > 1 else 0.0,
        prompt_len_final=_prompt_len(records[-w:]),
    )


def _prompt_len(records: list[StepRecord]) -> float | None:
    """Prompt tokens per sample: (trained tokens - response tokens) / samples, pooled over the records."""
    samples = prompt = 0
    for r in records:
        if r.trained_tokens is None or r.response_tokens is None or r.samples is None:
            return None
        samples += r.samples
        prompt += r.trained_tokens - r.response_tokens
    return prompt / samples if samples else None


def summarize_run(run_dir: Path, reward_threshold: float | None = None) -> RunSummary:
    """Summary of the run in `run_dir` (its metrics.jsonl); see RunSummary for each field."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}: did the run start?")
    records = read_step_records(path)
    if not records:
        raise ValueError(f"{path} holds no training steps: the run stopped before its first step finished")
    return summarize_records(records, reward_threshold)
