"""What a finished run achieved, from its `metrics.jsonl`: the numbers benchmarks and sweeps compare.

Pure functions over the per-step records, so every comparison (async vs sync, a staleness sweep,
the ablation) summarises runs the same way.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from areal_py.telemetry.metrics import read_jsonl


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


def time_to_threshold(records: list[dict], threshold: float, window: int) -> float | None:
    """First wall time at which the mean reward of the trailing `window` steps is >= threshold; None if it never
    is (including runs shorter than `window`): one lucky step must not count as reaching it."""
    for i in range(window - 1, len(records)):
        tail = records[i - window + 1: i + 1]
        if statistics.fmean(r["reward_mean"] for r in tail) >= threshold:
            return float(records[i]["wall_time_s"])
    return None


def _occupancy(records: list[dict]) -> float | None:
    """Occupancy weighted by each step's duration (a long step holds its occupancy longer)."""
    num = den = 0.0
    prev = 0.0
    for r in records:
        occ, t = r.get("rollout_slot_occupancy"), float(r["wall_time_s"])
        if occ is not None and t > prev:
            num += occ * (t - prev)
            den += t - prev
        prev = t
    return num / den if den else None


def summarize_records(records: list[dict], reward_threshold: float | None = None) -> RunSummary:
    """Summary of per-step records in step order (the lines of a metrics.jsonl)."""
    if not records:
        raise ValueError("no training steps recorded: nothing to summarise")
    steps = len(records)
    wall = float(records[-1]["wall_time_s"])
    if wall <= 0:
        raise ValueError(f"the last record's wall_time_s is {wall}: cannot compute rates")
    w = window_for(steps)
    samples = sum(int(r.get("samples", 0)) for r in records)
    rewards = [float(r["reward_mean"]) for r in records]
    resp = [float(r["response_len_mean"]) for r in records if "response_len_mean" in r]
    tail = rewards[-w:]
    return RunSummary(
        steps=steps,
        wall_time_s=wall,
        trained_samples=samples,
        samples_per_s=samples / wall,
        trained_tokens_per_s=sum(int(r.get("trained_tokens", 0)) for r in records) / wall,
        trainer_busy=sum(float(r.get("train_s", 0.0)) for r in records) / wall,
        slot_occupancy=_occupancy(records),
        reward_first=statistics.fmean(rewards[:w]),
        reward_final=statistics.fmean(rewards[-w:]),
        window=w,
        time_to_threshold_s=None if reward_threshold is None else time_to_threshold(records, reward_threshold, w),
        staleness_mean=statistics.fmean(float(r.get("staleness_mean", 0.0)) for r in records),
        staleness_max=max(int(r.get("staleness_max", 0)) for r in records),
        dropped_stale=int(records[-1].get("ctrl_dropped_stale", 0)),
        response_len_mean=statistics.fmean(resp) if resp else 0.0,
        reward_final_sem=statistics.stdev(tail) / len(tail) ** 0.5 if len(tail) > 1 else 0.0,
        prompt_len_final=_prompt_len(records[-w:]),
    )


def _prompt_len(records: list[dict]) -> float | None:
    """Prompt tokens per sample: (trained tokens - response tokens) / samples, pooled over the records."""
    if any(k not in r for r in records for k in ("trained_tokens", "response_tokens", "samples")):
        return None
    samples = sum(int(r["samples"]) for r in records)
    prompt = sum(int(r["trained_tokens"]) - int(r["response_tokens"]) for r in records)
    return prompt / samples if samples else None


def summarize_run(run_dir: Path, reward_threshold: float | None = None) -> RunSummary:
    """Summary of the run in `run_dir` (its metrics.jsonl); see RunSummary for each field."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}: did the run start?")
    records = read_jsonl(path)
    if not records:
        raise ValueError(f"{path} holds no training steps: the run stopped before its first step finished")
    return summarize_records(records, reward_threshold)
