"""Which kernels a rollout server's engine runs and why: one typed record, in the run directory and
in Prometheus.

The torch engine chooses its linear kernel per step size and its decode attention by timing at
start-up, reads a cached choice, or falls back (no compiler, a kernel that disagrees); the choice
changes the engine's speed by tens of percent, so a run records it where it can be found later:

- `<run dir>/kernels/<server id>.json`: a `KernelReport` (one per rollout server; `read_reports`);
- `areal_rollout_kernel_info{server, op, kernel, source, reason} 1` (info-style: the labels carry
  the facts, one series per op);
- the server's start-up log line (`KernelReport.describe`).

The `runner` op is the engine path: `fast` (the engine's own packed runner) or `hf_forward` (the generic
Hugging Face forward, `source` "fallback" with `reason` when the fast runner does not support or
reproduce the model, "forced" when the config asked for it). `engine_path` reduces a report to the
word the server sends in its `Hello` (fast | generic | external), which the controller counts into
every step record (`generic_engine_servers`); a generic path is also a WARNING in the server's log.

`op` is one of `OPS`; `source` says how the kernel was decided: "timed" (measured at this start),
"cache" (a timing of an earlier start on this machine), "forced" (the config named it), "fallback"
(the wanted kernel is unusable here: `reason` says why), "only" (nothing else to choose).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from areal_py.telemetry.prom import ROLLOUT
from areal_py.wire.protocol import EnginePath

__all__ = ["OPS", "KernelChoice", "KernelReport", "engine_path", "export_prometheus", "read_reports", "report_path",
           "write_report"]

log = logging.getLogger(__name__)

Op = Literal["runner", "linear_decode", "linear_prefill", "decode_attention", "compiled_decode"]
OPS: tuple[str, ...] = Op.__args__  # type: ignore[attr-defined]
REASON_CHARS = 200  # a Prometheus label stays short; the JSON record keeps the same text


class KernelChoice(BaseModel):
    """One op's kernel. `seconds`: candidate -> median seconds of one timing probe (empty unless timed
    now or read from the timing cache)."""

    op: Op
    kernel: str
    source: str
    reason: str = ""
    seconds: dict[str, float] = Field(default_factory=dict)


class KernelReport(BaseModel):
    server_id: str
    threads: int
    torch: str
    at: str = Field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    choices: list[KernelChoice]

    def describe(self) -> str:
        return ", ".join(f"{c.op}={c.kernel} ({c.source}{', ' + c.reason if c.reason else ''})" for c in self.choices)


def engine_path(choices: list[KernelChoice] | None) -> EnginePath:
    """The engine path of a server's kernel choices: `generic` when its runner is the Hugging Face forward,
    `fast` when it is the engine's own runner, `external` for an engine that reports no choices (SGLang)."""
    runner = next((c for c in choices or [] if c.op == "runner"), None)
    if runner is None:
        return "external"
    return "generic" if runner.kernel == "hf_forward" else "fast"


def report_path(run_dir: Path, server_id: str) -> Path:
    return Path(run_dir) / "kernels" / f"{server_id}.json"


def write_report(run_dir: Path, report: KernelReport) -> Path | None:
    """Write the server's record (replacing one of an earlier start); a failure is a warning, not an error."""
    path = report_path(run_dir, report.server_id)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(report.model_dump_json(indent=1))
        tmp.replace(path)
    except OSError as e:
        log.warning("cannot write the kernel report %s (%s)", path, e)
        return None
    return path


def read_reports(run_dir: Path) -> list[KernelReport]:
    """Every server's record in the run directory, by server id; a malformed file is skipped with a warning."""
    out = []
    for path in sorted((Path(run_dir) / "kernels").glob("*.json")):
        try:
            out.append(KernelReport.model_validate_json(path.read_text()))
        except (OSError, ValueError) as e:
            log.warning("skipping unreadable kernel report %s (%s)", path, e)
    return out


def export_prometheus(report: KernelReport) -> None:
    """One `areal_rollout_kernel_info` series per op, value 1; the server's earlier series are removed first."""
    gauge = ROLLOUT.kernel_info
    for labels in [k for k in list(getattr(gauge, "_metrics", {})) if k and k[0] == report.server_id]:
        gauge.remove(*labels)
    for c in report.choices:
        gauge.labels(server=report.server_id, op=c.op, kernel=c.kernel, source=c.source,
                     reason=c.reason[:REASON_CHARS]).set(1)
