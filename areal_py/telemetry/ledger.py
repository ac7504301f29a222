"""The run's ledger: every prompt taken from the task, trained exactly once or dropped with a reason.

Each step record (metrics.jsonl) carries `trained_prompts` (prompt indices of the groups the step
trained) and `dropped_prompts` ({reason: prompt indices} since the previous step: the controller's
drops, prompts skipped at admission, the step's non-finite groups). A checkpoint's `state.json`
carries the controller's buffer: the groups admitted at its last batch and neither trained nor
dropped yet. Resume cuts metrics.jsonl back to the checkpoint and restores that buffer, so for the
checkpoint the run ends on (the final one, or the one a resume starts from) the rule is

    for every prompt index i < data_position:  trained(i) + dropped(i) + buffered(i) == 1

where `data_position` is the controller's position at that checkpoint's batch, and no index at or
past it appears. A prompt trained twice, lost (0) or beyond the position is a ledger error.

`python -m areal_py.telemetry.ledger <run_dir>` checks a run against its latest checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from areal_py.telemetry.step_record import StepRecord, read_step_records

__all__ = ["Ledger", "ledger_from_records", "read_run_ledger"]


@dataclass
class Ledger:
    """Counts per prompt index: how often trained, dropped (with the reasons), and held in the buffer."""
    data_position: int = 0
    trained: Counter[int] = field(default_factory=Counter)
    dropped: dict[int, list[str]] = field(default_factory=dict)
    buffered: Counter[int] = field(default_factory=Counter)
    steps: int = 0

    def problems(self, limit: int = 20) -> list[str]:
        """Every breach of the rule in the module docstring, the first `limit` of each kind, in words."""
        seen = set(self.trained) | set(self.dropped) | set(self.buffered)
        twice, lost, beyond = [], [], sorted(i for i in seen if i >= self.data_position)
        for i in range(self.data_position):
            times = self.trained[i] + len(self.dropped.get(i, ())) + self.buffered[i]
            if times == 0:
                lost.append(i)
            elif times > 1:
                twice.append(i)
        out = []
        if lost:
            out.append(f"{len(lost)} prompt(s) neither trained, dropped nor buffered (lost): {lost[:limit]}")
        if twice:
            out.append(f"{len(twice)} prompt(s) accounted for more than once: " + ", ".join(
                f"{i} (trained {self.trained[i]}, dropped {self.dropped.get(i, [])}, buffered {self.buffered[i]})"
                for i in twice[:limit]))
        if beyond:
            out.append(f"{len(beyond)} prompt(s) at or past the data position {self.data_position}: {beyond[:limit]}")
        return out

    def summary(self) -> str:
        reasons = Counter(r for rs in self.dropped.values() for r in rs)
        drops = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())) or "none"
        return (f"{self.data_position} prompts taken over {self.steps} steps: {sum(self.trained.values())} trained, "
                f"{sum(reasons.values())} dropped ({drops}), {sum(self.buffered.values())} still buffered")


def ledger_from_records(records: Iterable[StepRecord], buffered: Iterable[int] = (),
                        data_position: int | None = None) -> Ledger:
    """The ledger of `records` (in step order) plus the prompt indices `buffered` at the last one;
    `data_position` defaults to the last record's controller position (`ctrl_data_position`)."""
    led = Ledger()
    last = None
    for r in records:
        led.steps += 1
        last = r
        led.trained.update(r.trained_prompts or [])
        for reason, prompts in (r.dropped_prompts or {}).items():
            for i in prompts:
                led.dropped.setdefault(i, []).append(reason)
    led.buffered.update(buffered)
    if data_position is None:
        data_position = (last.controller.data_position or 0) if last is not None else 0
    led.data_position = data_position
    return led


def buffered_prompts(state: dict) -> list[int]:
    """Prompt indices in a checkpoint state's controller buffer (ready and pending groups); none without one."""
    buf = state.get("controller_buffer") or {}
    return [g["prompt_index"] for g in buf.get("ready", [])] + [g["prompt_index"] for g in buf.get("pending", [])]


def read_run_ledger(run_dir: Path) -> Ledger:
    """The ledger of `run_dir`: its metrics.jsonl up to its latest checkpoint's step, and that checkpoint's buffer
    and data position (the whole file, nothing buffered, without a checkpoint)."""
    records = list(read_step_records(run_dir / "metrics.jsonl"))
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return ledger_from_records(records)
    state = json.loads((run_dir / "checkpoints" / latest.read_text().strip() / "state.json").read_text())
    upto = [r for r in records if r.step <= state["version"]]
    position = (state.get("controller_state") or {}).get("data_position", 0)
    return ledger_from_records(upto, buffered_prompts(state), position)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m areal_py.telemetry.ledger",
                                 description="Check that every prompt a run took was trained once or dropped "
                                             "with a reason (exit 1 if not, 2 without a run there).")
    ap.add_argument("run_dir", type=Path)
    run_dir = ap.parse_args(argv).run_dir
    if not (run_dir / "metrics.jsonl").is_file():
        print(f"{run_dir / 'metrics.jsonl'} does not exist: give the run directory, <run.output_dir>/<run.name>")
        return 2
    led = read_run_ledger(run_dir)
    print(led.summary())
    problems = led.problems()
    for p in problems:
        print("ledger error:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
