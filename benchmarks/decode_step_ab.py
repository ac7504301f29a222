"""Decode step before/after a change: the fast runner's decode step of two checkouts, timed in
alternating subprocesses (interleaved rounds), next to the step's roofline.

The step is the one `benchmarks.engine_throughput` reports against its floor: `runner.forward` for
`rows` one-token rows at `context` positions each (the K/V cache as allocated: a step's work does
not depend on the values), on the random-init models of `engine_throughput`, one torch thread,
process CPU time. Each checkout runs in its own subprocess (its own code, the same Python
environment, `PYTHONPATH` pointing at it), so the two are timed under the same load minutes apart,
round after round, the order alternating per round. Per round a subprocess reports the median of
`--blocks` blocks of steps; the result is the median over rounds per checkout, the ratio of the two
medians, the ratio per round, and each median over the floor (`benchmarks.roofline.decode_floor_s`
with the machine's limits measured once at the start at one thread). Run from the repository root:

    git archive <ref> | tar -x -C /tmp/before        # the checkout to compare against
    python -m benchmarks.decode_step_ab --before /tmp/before --models 2M,20M --rounds 5
    python -m benchmarks.decode_step_ab --quick     # seconds: this checkout against itself, tiny model
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import command_line
from benchmarks.engine_throughput import MODELS, QUICK_MODELS, _loadavg
from benchmarks.roofline import ModelShape, decode_floor_s, measure_machine

# Runs inside the checkout under test: only APIs both sides have (Engine, runner.forward, make_model).
CHILD = r"""
import json, statistics, sys, time, torch
torch.set_num_threads(1)
import rollout_server.torch_engine.model_runner as mr
from benchmarks.engine_throughput import EOS, MODELS, QUICK_MODELS, make_model
from rollout_server.torch_engine.engine import Engine
name, rows, context, blocks, steps = sys.argv[1], *map(int, sys.argv[2:6])
model = make_model({**MODELS, **QUICK_MODELS}[name], context + 8, seed=0)
engine = Engine(model, EOS, max_running=rows, max_seq_len=context + 1, seed=0)
runner, slots = engine.runner, list(range(rows))
out = []
with torch.inference_mode():
    for _ in range(2):
        runner.forward(slots, [context - 1] * rows, [[5]] * rows)
    for _ in range(blocks):
        t = time.process_time()
        for _ in range(steps):
            runner.forward(slots, [context - 1] * rows, [[5]] * rows)
        out.append((time.process_time() - t) / steps)
print(json.dumps({"median_s": statistics.median(out), "blocks_s": out, "runner": runner.describe(),
                  "code": mr.__file__}))
"""


def run_child(checkout: Path, name: str, rows: int, context: int, blocks: int, steps: int, timeout_s: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, name, str(rows), str(context), str(blocks), str(steps)],
                          cwd=checkout, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"decode step in {checkout} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not Path(result["code"]).resolve().is_relative_to(checkout.resolve()):
        raise RuntimeError(f"the child imported {result['code']}, not the checkout {checkout}")
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="this checkout against itself, tiny model, one short "
                    "round (for the tests)")
    ap.add_argument("--before", type=Path, default=None, help="checkout of the code to compare against")
    ap.add_argument("--after", type=Path, default=Path("."), help="checkout of the new code (default: here)")
    ap.add_argument("--models", default="2M,20M", help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--shape", default="64x400", help="rows x context")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=3, help="timed blocks per subprocess (their median counts)")
    ap.add_argument("--steps", type=int, default=None, help="steps per block (default: about 0.5 s of steps)")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="limit on one subprocess")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_step_ab.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.before, args.models, args.shape, args.rounds, args.blocks, args.steps = (
            args.after, "tiny", "4x16", 1, 1, 2)
    if args.before is None:
        ap.error("--before is required (a checkout of the code to compare against)")
    rows, context = (int(x) for x in args.shape.split("x"))
    sides = {"before": args.before, "after": args.after}
    limits = measure_machine(1, gemm_n=256, dram_bytes=64 << 20, repeats=2) if args.quick else measure_machine(1)
    results: dict = {"command": command_line("benchmarks.decode_step_ab", argv), "rows": rows, "context": context,
                     "limits": limits.to_dict(), "load_average_before": _loadavg(), "models": {}}
    print(f"limits (1 thread): GEMM {limits.gemm_gflops:.1f} GFLOP/s, DRAM read {limits.dram_gbps:.1f} GB/s; "
          f"load {results['load_average_before']}", flush=True)
    for name in args.models.split(","):
        s = {**MODELS, **QUICK_MODELS}[name]
        shape = ModelShape(hidden=s["hidden_size"], layers=s["num_hidden_layers"], heads=s["num_attention_heads"],
                           kv_heads=s["num_key_value_heads"], head_dim=s["hidden_size"] // s["num_attention_heads"],
                           intermediate=s["intermediate_size"], vocab=s["vocab_size"])
        floor = decode_floor_s(shape, [context] * rows, limits)
        steps = args.steps or max(2, round(0.5 / (3 * floor)))
        per: dict = {side: [] for side in sides}
        for rnd in range(args.rounds):
            order = list(sides) if rnd % 2 == 0 else list(sides)[::-1]
            for side in order:
                r = run_child(sides[side], name, rows, context, args.blocks, steps, args.timeout_s)
                r["load_average"] = _loadavg()
                per[side].append(r)
            print(f"  {name} round {rnd}: " + "  ".join(f"{side} {per[side][-1]['median_s'] * 1e3:7.2f} ms"
                                                      for side in sides), flush=True)
        med = {side: statistics.median(r["median_s"] for r in per[side]) for side in sides}
        entry = {"floor_s": floor, "steps_per_block": steps,
                 "speedup": med["before"] / med["after"],
                 "speedup_per_round": [b["median_s"] / a["median_s"] for b, a in zip(per["before"], per["after"])]}
        for side in sides:
            entry[side] = {"median_s": med[side], "x_above_roofline": med[side] / floor,
                           "rounds_s": [r["median_s"] for r in per[side]], "runner": per[side][0]["runner"],
                           "load_average": [r["load_average"] for r in per[side]]}
        results["models"][name] = entry
        print(f"  {name}: before {med['before'] * 1e3:.2f} ms ({entry['before']['x_above_roofline']:.2f}x floor), "
              f"after {med['after'] * 1e3:.2f} ms ({entry['after']['x_above_roofline']:.2f}x), floor "
              f"{floor * 1e3:.2f} ms, speedup {entry['speedup']:.3f} (per round "
              f"{', '.join(f'{x:.3f}' for x in entry['speedup_per_round'])})", flush=True)
    results["load_average_after"] = _loadavg()
    results["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
