"""What every end-to-end benchmark does: run `areal-py run` in a subprocess on free ports."""
from __future__ import annotations

import socket
import subprocess
import sys
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


def run_areal(out: Path, name: str, overrides: list[str], config: str | None = None, timeout_s: float = 3600) -> Path:
    """Run one training run to completion (quiet, no dashboard, fresh ports); returns its run directory.

    A failed run raises with the end of its stderr, so a benchmark never reports a half run.
    """
    ports = [f"net.{k}_port={free_port()}" for k in ("rollout", "weights", "trainer", "batch")]
    cmd = [sys.executable, "-m", "areal_py.cli", "run", "--quiet", *([config] if config else []),
           f"run.output_dir={out}", f"run.name={name}", "run.dashboard_port=0", *ports, *overrides]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    if res.returncode:
        raise RuntimeError(f"run {name} failed ({' '.join(overrides)}):\n{res.stderr[-3000:]}")
    return out / name


def try_pyplot():
    """matplotlib's pyplot with a file backend, or None: plots are optional (the `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
