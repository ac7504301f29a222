"""Cold start of a first `areal-py run`, quiet vs beside one CPU-burning process per core, old vs new thread choice.

Each measurement is a real `areal-py run --quiet` with a fresh model cache, timed from process start to
its "model ready" line (then the run is stopped): imports, model creation, the SFT steps and the save.

- `old`: `run.torch_threads=<os.cpu_count()>`, what torch's default gave the cold start before.
- `new`: `run.torch_threads=0`, the thread policy of areal_py/threads.py deciding at that moment.
- `quiet`: nothing of ours beside it; `loaded`: `--burners` processes (default one per core) running
  `while True: pass`, started before the run and killed after it.

Conditions are interleaved within each round (the order rotates per round) so a change of background
load hits all of them alike; medians over rounds are reported. A run past `--limit` seconds is stopped
and counted at the limit (marked censored). Writes `<out>/cold_start_load.json`. From the repo root:

    python -m benchmarks.cold_start_load                 # 3 rounds of 20 SFT steps
    python -m benchmarks.cold_start_load --steps 120     # the default cold start (slow when oversubscribed)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, ROOT, command_line, free_port

CONDITIONS = [("quiet", "old"), ("quiet", "new"), ("loaded", "old"), ("loaded", "new")]


def start_burners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_burners(burners: list[subprocess.Popen]) -> None:
    for b in burners:
        b.kill()
    for b in burners:
        b.wait()


def one_cold_start(steps: int, threads: int, limit: float) -> dict:
    """Seconds from starting `areal-py run` to its "model ready" line, with a fresh cache; the run is then stopped."""
    with tempfile.TemporaryDirectory(prefix="cold_start_load_") as tmp:
        ports = [f"net.{k}_port={free_port()}" for k in ("rollout", "weights", "trainer", "batch")]
        cmd = [sys.executable, "-m", "areal_py.app.cli", "run", "--quiet", f"run.output_dir={tmp}/runs", "run.name=c",
               f"model.cache_dir={tmp}/cache", "run.dashboard_port=0", f"cold_start.steps={steps}",
               f"run.torch_threads={threads}", *ports]
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        timer = _Timer(proc, limit)
        reported = None
        try:
            for line in proc.stdout:
                m = re.search(r"model ready at .* \(([\d.]+)s\)", line)
                if m:
                    reported = float(m.group(1))
                    break
            wall = time.perf_counter() - t0
        finally:
            timer.cancel()
            _quiet_killpg(proc.pid)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            _quiet_killpg(proc.pid, signal.SIGKILL)  # anything left of the run
            proc.wait()
        used = None
        for meta in Path(tmp, "cache").glob("embedded-*/cold_start.json"):
            used = json.loads(meta.read_text())["cold_start"].get("threads")
        censored = reported is None
        return {"seconds": limit if censored else wall, "launcher_reported_s": reported, "censored": censored,
                "threads": used, "load_before": round(load, 2)}


class _Timer:
    """Stops the run's process group after `limit` seconds (the stdout loop then ends)."""

    def __init__(self, proc: subprocess.Popen, limit: float) -> None:
        self._t = threading.Timer(limit, lambda: _quiet_killpg(proc.pid))
        self._t.daemon = True
        self._t.start()

    def cancel(self) -> None:
        self._t.cancel()


def _quiet_killpg(pgid: int, sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="cold_start.steps of every run")
    ap.add_argument("--burners", type=int, default=os.cpu_count() or 1, help="CPU burners in the loaded condition")
    ap.add_argument("--limit", type=float, default=300.0, help="seconds after which a run is stopped (censored)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    old_threads = os.cpu_count() or 1
    runs: list[dict] = []
    for r in range(args.rounds):
        order = CONDITIONS[r % len(CONDITIONS):] + CONDITIONS[: r % len(CONDITIONS)]
        for load, policy in order:
            burners = start_burners(args.burners) if load == "loaded" else []
            try:
                time.sleep(1.0 if burners else 0.0)  # let them get going
                res = one_cold_start(args.steps, old_threads if policy == "old" else 0, args.limit)
            finally:
                stop_burners(burners)
            res.update({"round": r, "load": load, "policy": policy})
            runs.append(res)
            print(json.dumps(res), flush=True)
    summary = {}
    for load, policy in CONDITIONS:
        secs = [x["seconds"] for x in runs if x["load"] == load and x["policy"] == policy]
        summary[f"{load}/{policy}"] = {"median_s": round(statistics.median(secs), 1), "runs_s": [round(s, 1) for s in secs],
                                       "censored": sum(x["censored"] for x in runs
                                                       if x["load"] == load and x["policy"] == policy)}
    q = summary["quiet/new"]["median_s"]
    summary["loaded_new_over_quiet_new"] = round(summary["loaded/new"]["median_s"] / q, 2) if q else None
    result = {"command": command_line("benchmarks.cold_start_load", argv), "cpu_count": os.cpu_count(),
              "steps": args.steps, "burners": args.burners, "old_threads": old_threads, "summary": summary,
              "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cold_start_load.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    main()
