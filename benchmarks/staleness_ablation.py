"""AReaL's staleness ablation at our scale: decoupled PPO vs naive PPO as data grows stale.

For each `controller.max_staleness` in {0, 1, 2, 4, 8} and each objective, one run on the
embedded `arith` task with the same seeds:

- decoupled (`algo.loss=decoupled`): the trust region is centred on the recomputed proximal
  policy, and the behaviour policy only enters through the (capped) importance weight;
- naive PPO (`algo.loss=ppo`): the behaviour policy's logprobs are used as the old policy, so
  the clip is centred on a policy up to `max_staleness` versions old.

On arith the trainer is the bottleneck, so generation runs ahead and the data really is as stale
as the bound allows (the table reports the staleness seen). The paper's finding: the decoupled
objective keeps the final reward as staleness grows; naive PPO loses it.

    python -m benchmarks.staleness_ablation           # 150 steps, seeds 0,1 -> results/staleness_ablation.json
    python -m benchmarks.staleness_ablation --quick   # 2 bounds x 2 objectives, a few steps, no result file
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from areal_py.telemetry.run_summary import summarize_run
from benchmarks.common import RESULTS_DIR, command_line, run_areal

LOSSES = ("decoupled", "ppo")
QUICK = ["trainer.total_steps=6", "controller.batch_size=4", "controller.group_size=4"]


def table(rows: list[dict]) -> str:
    """Markdown table: one row per bound, final reward (mean ± standard error over seeds) and samples/s."""
    head = ("| max_staleness | staleness seen (max) | decoupled: final reward | naive PPO: final reward "
            "| decoupled: samples/s | naive PPO: samples/s |\n|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        d, p = r["decoupled"], r["ppo"]
        lines.append(f"| {r['max_staleness']} | {max(d['staleness_max'], p['staleness_max'])} "
                     f"| {d['reward_final']:.3f} ± {d['reward_final_sem']:.3f} "
                     f"| {p['reward_final']:.3f} ± {p['reward_final_sem']:.3f} "
                     f"| {d['samples_per_s']:.0f} | {p['samples_per_s']:.0f} |")
    return "\n".join(lines)


def objective_summary(finals: list[float], means: dict) -> dict:
    """Final reward over seeds as mean and standard error of the mean (two seeds: half their difference)."""
    return {"reward_final": statistics.fmean(finals),
            "reward_final_sem": statistics.stdev(finals) / len(finals) ** 0.5 if len(finals) > 1 else 0.0,
            "reward_final_per_seed": finals, **means}


def check_mergeable(earlier: dict, bounds: list[int], seeds: list[int], extra: list[str]) -> None:
    """Refuse, before any run starts, to pool results of a different grid or of the same seeds."""
    if earlier["extra_overrides"] != extra:
        raise SystemExit(f"--merge: the earlier runs used overrides {earlier['extra_overrides']}, these {extra}")
    if set(earlier["seeds"]) & set(seeds):
        raise SystemExit(f"--merge: seeds {sorted(set(earlier['seeds']) & set(seeds))} were run in both")
    if sorted(r["max_staleness"] for r in earlier["rows"]) != sorted(bounds):
        raise SystemExit(f"--merge: the earlier bounds {[r['max_staleness'] for r in earlier['rows']]} "
                         f"differ from these {bounds}")


def merge(earlier: dict, rows: list[dict], seeds: list[int]) -> tuple[list[dict], list[int]]:
    """Pool these runs with an earlier result file of the same grid run on other seeds.

    Per-seed final rewards are concatenated (mean and standard error recomputed); the other
    columns are seed-weighted means (maximum for `staleness_max`), exact because every run of a
    file shares its seed list.
    """
    old_rows = {r["max_staleness"]: r for r in earlier["rows"]}
    n_old, n_new = len(earlier["seeds"]), len(seeds)
    merged = []
    for row in rows:
        out: dict = {"max_staleness": row["max_staleness"]}
        for loss in LOSSES:
            a, b = old_rows[row["max_staleness"]][loss], row[loss]
            wmean = {k: (n_old * a[k] + n_new * b[k]) / (n_old + n_new)
                     for k in ("reward_first", "samples_per_s", "staleness_mean")}
            out[loss] = objective_summary(a["reward_final_per_seed"] + b["reward_final_per_seed"],
                                          {**wmean, "staleness_max": max(a["staleness_max"], b["staleness_max"])})
        merged.append(out)
    return merged, earlier["seeds"] + seeds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="bounds 0,4, a few small steps, one seed; no result file")
    ap.add_argument("--bounds", default="0,1,2,4,8")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out", default="", help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--name", default="staleness_ablation",
                    help="result file stem under benchmarks/results/ (a variant with overrides gets its own)")
    ap.add_argument("--merge", default="", help="an earlier result file of the same grid on other seeds: "
                    "the written table pools both (e.g. run --seeds 2,3 --merge results/staleness_ablation.json)")
    ap.add_argument("overrides", nargs="*", help="extra key.sub=value overrides for every run")
    args = ap.parse_args(argv)
    bounds = [0, 4] if args.quick else [int(b) for b in args.bounds.split(",")]
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    extra = (QUICK if args.quick else [f"trainer.total_steps={args.steps}"]) + args.overrides

    earlier = json.loads(Path(args.merge).read_text()) if args.merge else None
    if earlier is not None:
        check_mergeable(earlier, bounds, seeds, extra)
    start = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        for bound in bounds:
            row: dict = {"max_staleness": bound}
            for loss in LOSSES:
                sums = []
                for seed in seeds:
                    name = f"{loss}-s{bound}-seed{seed}"
                    d = run_areal(out, name, [f"algo.loss={loss}", f"controller.max_staleness={bound}",
                                              f"run.seed={seed}", *extra])
                    sums.append(summarize_run(d))
                    print(f"{name}: final reward {sums[-1].reward_final:.3f}, "
                          f"{sums[-1].samples_per_s:.0f} samples/s, staleness max {sums[-1].staleness_max}",
                          flush=True)
                row[loss] = objective_summary([s.reward_final for s in sums], {
                    "reward_first": statistics.fmean(s.reward_first for s in sums),
                    "samples_per_s": statistics.fmean(s.samples_per_s for s in sums),
                    "staleness_max": max(s.staleness_max for s in sums),
                    "staleness_mean": statistics.fmean(s.staleness_mean for s in sums),
                })
            rows.append(row)
    new_seeds = seeds
    if earlier is not None:
        rows, seeds = merge(earlier, rows, seeds)
    md = table(rows)
    print("\n" + md)
    # Full runs are the committed results; a quick run writes only into --out, if given.
    dest = RESULTS_DIR if not args.quick else Path(args.out) if args.out else None
    if dest is not None:
        dest.mkdir(parents=True, exist_ok=True)
        cmd = command_line("benchmarks.staleness_ablation", argv)
        report = {"command": cmd, "task": "arith (embedded default)", "seeds": seeds, "extra_overrides": extra,
                  "rows": rows, "table": md, "benchmark_wall_s": round(time.time() - start, 1)}
        if earlier is not None:
            report |= {"merged_from": earlier["command"], "seeds_run_by_this_command": new_seeds}
        (dest / f"{args.name}.json").write_text(json.dumps(report, indent=1))
        print(f"wrote {dest / f'{args.name}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
