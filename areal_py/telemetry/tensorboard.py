"""Optional TensorBoard event files (`run.tensorboard=true`): every numeric field of each `StepRecord`.

`metrics.jsonl` stays the source of truth; this mirrors it for people whose tooling is TensorBoard.
The `tensorboard` package is an optional extra, imported only when the option is on; the launcher
calls `require_tensorboard` before starting any process, so a missing package fails the run at once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from areal_py.telemetry.step_record import StepRecord

INSTALL_HINT = "pip install 'areal-py[tensorboard]' (or: pip install tensorboard)"


def require_tensorboard() -> type:
    """torch's SummaryWriter, or a RuntimeError naming the option and the install command."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch's writer needs the tensorboard package
        raise RuntimeError(f"run.tensorboard=true needs the tensorboard package: {INSTALL_HINT} ({e})") from None
    return SummaryWriter


def scalars(record: StepRecord) -> dict[str, float]:
    """Every numeric field of a record (extras included) under its metrics.jsonl name, nested maps as
    `outer/inner` (e.g. `sample_staleness_hist/2`, `ctrl_accepted`); `step` is the x axis, and bools,
    strings and lists (`gen_spans`) are not scalars."""
    return _numbers(record.to_dict())


def _numbers(d: dict[Any, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_numbers(v, f"{key}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and key != "step":
            out[key] = float(v)
    return out


class TensorBoardLog:
    """`resume_step`: the step a resumed run continues after; TensorBoard then hides the crashed run's
    events past it (`purge_step`), as metrics.jsonl drops its rows, so each step shows once."""

    def __init__(self, log_dir: Path, resume_step: int | None = None) -> None:
        purge = None if resume_step is None else resume_step + 1
        self.writer = require_tensorboard()(log_dir=str(log_dir), purge_step=purge)

    def write(self, record: StepRecord) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record.step)
        self.writer.flush()  # a live TensorBoard sees each step as it lands

    def close(self) -> None:
        self.writer.close()
