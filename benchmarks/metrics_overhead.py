"""Cost of observability: trained tokens/s with Prometheus metrics + live dashboard on vs off.

Runs the embedded default with the same seed, alternating off/on (ABAB...) so drift on this
noisy machine hits both sides alike, and reports the ratio of medians.

    python -m benchmarks.metrics_overhead            # 3 pairs x 150 steps, writes results/metrics_overhead.json
    python -m benchmarks.metrics_overhead --quick    # 1 pair x 4 small steps, no result file
    python -m benchmarks.metrics_overhead --quick model.cache_dir=DIR   # extra overrides for every run
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from areal_py.telemetry.step_record import read_step_records
from benchmarks.common import RESULTS_DIR, free_port, run_areal

RESULTS = RESULTS_DIR / "metrics_overhead.json"


def one_run(out: Path, name: str, steps: int, observe: bool, extra: list[str]) -> float:
    """Trained tokens per second of wall time, skipping the first steps (start-up)."""
    obs = [f"run.metrics_port={free_port()}", f"run.dashboard_port={free_port()}"] if observe else \
        ["run.metrics_port=0", "run.dashboard_port=0"]
    run_dir = run_areal(out, name, [f"trainer.total_steps={steps}", *obs, *extra], timeout_s=1200)
    recs = read_step_records(run_dir / "metrics.jsonl")
    skip = max(1, len(recs) // 10)
    a, b = recs[skip - 1], recs[-1]
    return (b.trained_tokens_total - a.trained_tokens_total) / (b.wall_time_s - a.wall_time_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("overrides", nargs="*", help="extra key.sub=value overrides for every run")
    args = ap.parse_args()
    # --quick checks that both sides run and the ratio is reported; its runs are mostly start-up, so a
    # few steps show as much as many
    pairs, steps = (1, 4) if args.quick else (args.pairs, args.steps)
    extra = (["controller.batch_size=8", "controller.group_size=4"] if args.quick else []) + args.overrides
    off, on = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(pairs):
            off.append(one_run(Path(tmp), f"off{i}", steps, False, extra))
            on.append(one_run(Path(tmp), f"on{i}", steps, True, extra))
            print(f"pair {i}: off {off[-1]:.0f} tok/s, on {on[-1]:.0f} tok/s")
    ratio = statistics.median(on) / statistics.median(off)
    print(f"metrics on / off = {ratio:.3f}")
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python -m benchmarks.metrics_overhead", f"--steps {steps}", *args.overrides])
        RESULTS.write_text(json.dumps({"command": command, "steps": steps,
                                       "trained_tokens_per_s_off": off, "trained_tokens_per_s_on": on,
                                       "ratio_on_over_off": round(ratio, 4)}, indent=1))


if __name__ == "__main__":
    main()
