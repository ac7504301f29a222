"""What every end-to-end benchmark does: run `areal-py run` in a subprocess on free ports."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_line(module: str, argv: list[str] | None) -> str:
    """How a benchmark was invoked, for its result file: `python -m <module> <args>`."""
    return " ".join(["python -m", module, *(sys.argv[1:] if argv is None else argv)])


def machine_cpu() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine in jiffies, from the first line of /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait; the rest (user nice system irq softirq steal) is busy
    return sum(fields) - idle, sum(fields)


class StepCpuMonitor(threading.Thread):
    """Machine CPU busy fraction while a run trains: from its first step record to its last.

    Samples /proc/stat and the number of lines in the run's metrics.jsonl every `period` s, so
    start-up and the cold start stay out of the window. On a machine that runs nothing else this
    says how much of the hardware the system keeps busy (1.0 = every core, all the time).
    """

    def __init__(self, metrics: Path, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.metrics, self.period = metrics, period
        self.samples: list[tuple[int, int, int]] = []  # (busy, total, step records written)
        self._stop_event = threading.Event()

    def _records(self) -> int:
        try:
            with self.metrics.open("rb") as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0

    def run(self) -> None:
        while not self._stop_event.wait(self.period):
            try:
                self.samples.append((*machine_cpu(), self._records()))
            except OSError:  # no /proc/stat (not Linux): nothing to report
                return

    def stop(self) -> float | None:
        self._stop_event.set()
        self.join()
        return busy_fraction_during_steps(self.samples)


def busy_fraction_during_steps(samples: list[tuple[int, int, int]]) -> float | None:
    """Busy / total CPU time between the first (busy, total, records) sample with a step written and the
    first one with all of them; None if no step was seen or no CPU time passed in between."""
    stepped = [s for s in samples if s[2] > 0]
    if not stepped:
        return None
    first = stepped[0]
    last = next(s for s in stepped if s[2] == stepped[-1][2])
    return (last[0] - first[0]) / (last[1] - first[1]) if last[1] > first[1] else None


def run_areal(out: Path, name: str, overrides: list[str], config: str | None = None, timeout_s: float = 3600) -> Path:
    """Run one training run to completion (quiet, no dashboard, fresh ports); returns its run directory.

    A failed run raises with the end of its stderr, so a benchmark never reports a half run. The
    machine's CPU busy fraction during the training steps is written to `<run>/machine_cpu.json`.
    """
    ports = [f"net.{k}_port={free_port()}" for k in ("rollout", "weights", "trainer", "batch")]
    cmd = [sys.executable, "-m", "areal_py.app.cli", "run", "--quiet", *([config] if config else []),
           f"run.output_dir={out}", f"run.name={name}", "run.dashboard_port=0", *ports, *overrides]
    monitor = StepCpuMonitor(out / name / "metrics.jsonl")
    monitor.start()
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    finally:
        busy = monitor.stop()
    if res.returncode:
        raise RuntimeError(f"run {name} failed ({' '.join(overrides)}):\n{res.stderr[-3000:]}")
    (out / name / "machine_cpu.json").write_text(json.dumps({"busy_fraction": busy, "cores": os.cpu_count()}))
    return out / name


def machine_cpu_busy(run_dir: Path) -> float | None:
    """What `run_areal` measured for this run (None if it was not measured)."""
    try:
        return json.loads((run_dir / "machine_cpu.json").read_text())["busy_fraction"]
    except FileNotFoundError:
        return None


def try_pyplot():
    """matplotlib's pyplot with a file backend, or None: plots are optional (the `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
