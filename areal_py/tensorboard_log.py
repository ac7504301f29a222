"""Optional TensorBoard event files (`run.tensorboard=true`): every numeric field of each step record.

`metrics.jsonl` stays the source of truth; this mirrors it for people whose tooling is TensorBoard.
The `tensorboard` package is an optional extra, imported only when the option is on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'areal-py[tensorboard]' (or: pip install tensorboard)"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """Numeric top-level fields (bools, lists and dicts are not scalars), plus the counts of
    `sample_staleness_hist` as `sample_staleness/<k>`."""
    out = {k: float(v) for k, v in record.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    for k, v in (record.get("sample_staleness_hist") or {}).items():
        out[f"sample_staleness/{k}"] = float(v)
    return out


class TensorBoardLog:
    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer needs the tensorboard package
            raise RuntimeError(f"run.tensorboard=true needs the tensorboard package: {INSTALL_HINT} ({e})") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a live TensorBoard sees each step as it lands

    def close(self) -> None:
        self.writer.close()
