"""The staleness ablation of issue 18: which off-policy objective keeps the reward as data grows stale.

The grid: task (`arith`, or `sum_cot`'s long, interrupted, multi-version trajectories via
configs/sum_cot.yaml) x objective (a named recipe of overrides, `RECIPES`) x `trainer.ppo_minibatches`
x eta (`controller.max_staleness`) x seed. The score of a run is the held-out reward of its final
model on fixed prompts (benchmarks.async_vs_sync.heldout_reward), not its training reward; each run
also records its final training reward, samples/s, the staleness it saw and how far one training step
moved the policy (`update_kl`, `approx_kl`: benchmarks/ablation_summary.py), so an lr can be chosen
where one update moves the policy little.

Resumable and mergeable: each run's record is written to its own JSON file in the grid directory as
it finishes; a run whose file exists (same cell overrides, same seed) is skipped; the summary
(`summary.json`, `summary.md`, `summary.png`) pools every file of the grid directory, whichever
machine or session wrote it. Split a grid across machines by seeds or bounds, copy the run files into
one directory, and run again with `--summary-only`.

    python -m benchmarks.staleness_ablation --task sum_cot --seeds 0,1,2,3,4,5      # the issue's grid (hours)
    python -m benchmarks.staleness_ablation --task sum_cot --bounds 0,4 --objectives naive,decoupled \\
        --minibatches 4 --seeds 0 --steps 10                                        # one short cell pair
    python -m benchmarks.staleness_ablation --quick --out DIR   # 2 bounds x 2 objectives, 1 seed, tiny (suite)
    python -m benchmarks.staleness_ablation --summary-only --grid benchmarks/results/staleness_ablation_sum_cot

The start model. The embedded model is cold-started once per machine, and the cold start is not
bit-reproducible across CPUs (the same recipe gave held-out 0.516 on one machine and 0.594 on
another: docs/benchmarks.md), so runs from two machines are comparable only if they started from the
same weights. Every run records the sha256 of its start model's weights, and cells refuse to pool
runs of different start models. `--start-model DIR` pins one: a saved copy of a cold-started model
directory is installed into the model cache before any run (and a different model already cached
there is an error), so every machine trains from the same start.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

from areal_py.telemetry.run_summary import summarize_run
from areal_py.telemetry.step_record import StepRecord, read_step_records
from benchmarks import async_vs_sync
from benchmarks.ablation_summary import (
    RunResult,
    cell_key,
    plot,
    pool,
    read_runs,
    run_stem,
    table,
    weighted_mean,
    write_run,
)
from benchmarks.ablation_verdict import plot_realised, realised_fits, realised_table, verdict_table, verdicts
from benchmarks.common import RESULTS_DIR, ROOT, command_line, run_areal

# Objectives as recipes of overrides, each pinned so that it means the same under any default.
# `decoupled` is min(w, 5) per token (the default before the grid chose behav_trust); `filter_mask5`
# AReaL's example filter (token ratio mask at 5); `tis` token TIS at C = 2; `none` the decoupled loss with
# no behaviour weight (AReaL's default without a filter); `behav_trust` this project's variant, min(w, 5)
# plus the behaviour trust region at 0.2 (algo.offpolicy.behav_clip: naive PPO's sign-aware stop around
# pi_behav, kept on top of the decoupled clip around pi_prox), the default since.
UNPINNED_TRUST = "algo.offpolicy.behav_clip=null"
RECIPES: dict[str, list[str]] = {
    "naive": ["algo.loss=ppo"],
    "decoupled": ["algo.loss=decoupled", UNPINNED_TRUST],
    "filter_mask5": ["algo.loss=decoupled", "algo.offpolicy.action=mask", "algo.offpolicy.upper=5", UNPINNED_TRUST],
    "tis": ["algo.loss=decoupled", "algo.offpolicy.method=tis", "algo.offpolicy.upper=2", UNPINNED_TRUST],
    "none": ["algo.loss=decoupled", "algo.offpolicy.method=none", UNPINNED_TRUST],
    "behav_trust": ["algo.loss=decoupled", "algo.offpolicy.behav_clip=0.2"],
}


def legacy_key(overrides: list[str]) -> str | None:
    """The cell key the same cell had before the default gained the trust region: runs from then spelled it
    without the `behav_clip=null` pin, which was the default. None for a cell that never had the pin."""
    return cell_key([o for o in overrides if o != UNPINNED_TRUST]) if UNPINNED_TRUST in overrides else None


TASKS: dict[str, tuple[str | None, list[str], int]] = {
    # task: (config file, overrides every run of it gets, default steps)
    "arith": (None, [], 150),
    "sum_cot": (async_vs_sync.CONFIG, ["run.mode=async"], 60),
}
# --quick: tiny batches and a few steps on arith (sum_cot: async_vs_sync's tiny sums), 2 x 2 x 1 seed
QUICK_ARITH = ["controller.batch_size=4", "controller.group_size=4"]
QUICK_STEPS = 3
QUICK_HELDOUT_N = 16  # the suite checks the mechanics; each prompt moves a quick held-out reward by 1/16
QUICK_BOUNDS, QUICK_OBJECTIVES = [0, 2], ["naive", "decoupled"]
# keys the grid sets itself: an extra override of one would be recorded under the wrong cell
GRID_KEYS = {"algo.loss": "--objectives", "algo.offpolicy.": "--objectives (a recipe)",
             "controller.max_staleness": "--bounds", "trainer.ppo_minibatches": "--minibatches",
             "trainer.lr": "--lr", "trainer.total_steps": "--steps", "run.seed": "--seeds"}
MOVED = {"--merge": "run files now accumulate in the grid directory (--grid): run the other seeds with the same "
                    "--grid (or copy their files into it) and the summary pools them"}


def update_kl(records: list[StepRecord]) -> float | None:
    """Token-weighted mean over steps of the k3 KL(behaviour || proximal) on tokens exactly one version
    stale: the policy one step before against the policy being trained, i.e. how far one step moved it."""
    pairs = []
    for r in records:
        b = (r.offpolicy_by_staleness or {}).get("1")
        if b is not None:
            pairs.append((b.kl_mean, b.tokens))
    return weighted_mean(pairs)


def mean_approx_kl(records: list[StepRecord]) -> float | None:
    vals = [r.approx_kl for r in records if r.approx_kl is not None]
    return statistics.fmean(vals) if vals else None


def cell_overrides(task: str, objective: str, eta: int, minibatches: int, steps: int, lr: float | None,
                   quick: bool, extra: list[str], heldout_n: int) -> list[str]:
    """Everything that defines a cell, in a fixed order (the cell key hashes it). The config file and the
    held-out count go in as `#` entries: they change the result but are not overrides."""
    config, base, _ = TASKS[task]
    tiny = (async_vs_sync.QUICK if task == "sum_cot" else QUICK_ARITH) if quick else []
    tiny = [o for o in tiny if not o.startswith("trainer.total_steps=")]
    return [f"#config={config or 'default'}", f"#heldout_n={heldout_n}", *base, *tiny, *RECIPES[objective],
            f"controller.max_staleness={eta}", f"trainer.ppo_minibatches={minibatches}",
            f"trainer.total_steps={steps}", *([f"trainer.lr={lr}"] if lr is not None else []), *extra]


def run_one(out: Path, grid: Path, name: str, task: str, objective: str, eta: int, minibatches: int, lr: float | None,
            seed: int, overrides: list[str], heldout_n: int, command: str) -> RunResult:
    """Train one run, score its final model on the held-out prompts, and return its record."""
    config = TASKS[task][0]
    t0 = time.time()
    run_dir = run_areal(out, name, [o for o in overrides if not o.startswith("#")],
                        config=str(ROOT / config) if config else None)
    start_sha = score_start_model(grid, run_dir, heldout_n)
    s = summarize_run(run_dir)
    records = read_step_records(run_dir / "metrics.jsonl")
    return RunResult(
        task=task, objective=objective, eta=eta, minibatches=minibatches, seed=seed,
        cell_key=cell_key([o for o in overrides if not o.startswith("run.seed=")]), overrides=overrides,
        heldout_reward=async_vs_sync.heldout_reward(run_dir, heldout_n), heldout_n=heldout_n,
        reward_final=s.reward_final, reward_first=s.reward_first, samples_per_s=s.samples_per_s,
        staleness_mean=s.staleness_mean, staleness_max=s.staleness_max,
        update_kl=update_kl(records), approx_kl=mean_approx_kl(records), steps=s.steps,
        wall_s=round(time.time() - t0, 1), finished_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=command, lr=lr, start_sha256=start_sha, code_rev=code_revision())


def weights_sha256(model_dir: Path) -> str:
    """sha256 of a model directory's weights file (model.safetensors)."""
    with open(model_dir / "model.safetensors", "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def code_revision() -> str:
    """The commit the runs' code is at, `+dirty` when the tree has uncommitted changes (outside results)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!benchmarks/results"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "unknown") + ("+dirty" if dirty else "")


def pin_start_model(task: str, pinned: Path) -> Path:
    """Install the saved start model `pinned` where the task's runs look for their cold-started model.

    Already there with the same weights: nothing to do. Already there with other weights: SystemExit
    (move the cached directory aside to use the pinned one). Returns the cache directory."""
    from areal_py.config import load_config
    from areal_py.model_dir import embedded_model_request

    config, base, _ = TASKS[task]
    cfg = load_config(str(ROOT / config) if config else None, base)
    target = embedded_model_request(cfg).path
    want = weights_sha256(pinned)
    if target.exists():
        have = weights_sha256(target)
        if have != want:
            raise SystemExit(f"--start-model {pinned} (weights sha256 {want[:12]}) but {target} already holds another "
                             f"start model ({have[:12]}): move {target} aside to train from the pinned one")
        return target
    shutil.copytree(pinned, target)
    print(f"installed the pinned start model {pinned} ({want[:12]}) as {target}", flush=True)
    return target


def score_start_model(grid: Path, run_dir: Path, heldout_n: int) -> str:
    """The held-out reward of the model the run started from (what RL has to improve on), once per start
    model and held-out count: `<grid>/start-<model>-<sha12>-n<N>.json`. Returns the weights' sha256."""
    model = async_vs_sync.start_model(run_dir)
    sha = weights_sha256(model)
    grid.mkdir(parents=True, exist_ok=True)
    path = grid / f"start-{model.name}-{sha[:12]}-n{heldout_n}.json"
    if not path.exists():
        reward = async_vs_sync.heldout_reward(run_dir, heldout_n, model_dir=model)
        path.write_text(json.dumps({"start_model": model.name, "start_sha256": sha, "heldout_n": heldout_n,
                                    "heldout_reward": reward}))
    return sha


def start_rewards(grid: Path, heldout_n: int) -> dict[str, float]:
    """{start model: held-out reward} of every start model scored in the grid with `heldout_n` prompts."""
    out = {}
    for p in sorted(grid.glob(f"start-*-n{heldout_n}.json")):
        d = json.loads(p.read_text())
        sha = d.get("start_sha256")
        out[d["start_model"] + (f" {sha[:12]}" if sha else "")] = d["heldout_reward"]
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), default="arith")
    ap.add_argument("--quick", action="store_true", help=f"bounds {QUICK_BOUNDS}, objectives {QUICK_OBJECTIVES}, "
                    f"seed 0, {QUICK_STEPS} tiny steps (unless given); files only under --out / --grid")
    ap.add_argument("--bounds", default=None, help="eta values (controller.max_staleness), default 0,1,2,4,8,16")
    ap.add_argument("--objectives", default=None, help=f"recipes among {','.join(RECIPES)} (default: all)")
    ap.add_argument("--minibatches", default=None, help="trainer.ppo_minibatches values (default 1,4)")
    ap.add_argument("--seeds", default=None, help="default 0,1,2,3,4,5")
    ap.add_argument("--lr", default=None, help="trainer.lr values, e.g. 1e-4,3e-5,1e-5 for the short sweep that "
                    "picks it by update KL (default: the task config's lr)")
    ap.add_argument("--steps", type=int, default=None, help="trainer.total_steps (default: arith 150, sum_cot 60)")
    ap.add_argument("--heldout-n", type=int, default=None, help="held-out prompts per final model (default "
                    f"{async_vs_sync.HELDOUT_N}; --quick {QUICK_HELDOUT_N})")
    ap.add_argument("--grid", default="", help="directory of the run files and the summary (default "
                    "benchmarks/results/<name>; --quick: <out>/grid)")
    ap.add_argument("--name", default="", help="grid directory name under benchmarks/results/ "
                    "(default staleness_ablation_<task>)")
    ap.add_argument("--out", default="", help="keep the run directories here (default: a temporary directory)")
    ap.add_argument("--summary-only", action="store_true", help="run nothing: summarise the grid's files")
    ap.add_argument("--start-model", default="", help="a saved cold-started model directory to train every run "
                    "from (installed into the model cache first); runs of different start models never pool")
    ap.add_argument("--merge", default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra key.sub=value overrides for every run (part of the cell)")
    args = ap.parse_args(argv)
    if args.merge is not None:
        ap.error(f"--merge was replaced: {MOVED['--merge']}")
    for o in args.overrides:
        key = o.split("=", 1)[0]
        flag = next((f for k, f in GRID_KEYS.items() if key == k or (k.endswith(".") and key.startswith(k))), None)
        if flag:
            ap.error(f"{o}: the grid sets {key} itself; use {flag}")
    unknown = [o for o in (args.objectives or "").split(",") if o and o not in RECIPES]
    if unknown:
        ap.error(f"unknown objectives {unknown}; recipes: {', '.join(RECIPES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    q = args.quick
    bounds = _ints(args.bounds) if args.bounds else (QUICK_BOUNDS if q else [0, 1, 2, 4, 8, 16])
    objectives = args.objectives.split(",") if args.objectives else (QUICK_OBJECTIVES if q else list(RECIPES))
    minibatches = _ints(args.minibatches) if args.minibatches else ([1] if q else [1, 4])
    lrs: list[float | None] = [float(x) for x in args.lr.split(",") if x.strip()] if args.lr else [None]
    seeds = _ints(args.seeds) if args.seeds else ([0] if q else [0, 1, 2, 3, 4, 5])
    steps = args.steps or (QUICK_STEPS if q else TASKS[args.task][2])
    heldout_n = args.heldout_n or (QUICK_HELDOUT_N if q else async_vs_sync.HELDOUT_N)
    if q and not args.grid and not args.out:
        raise SystemExit("--quick writes only under --out or --grid: give one")
    grid = (Path(args.grid) if args.grid else Path(args.out) / "grid" if q
            else RESULTS_DIR / (args.name or f"staleness_ablation_{args.task}"))
    command = command_line("benchmarks.staleness_ablation", argv)

    cells = [(mb, lr, eta, obj) for mb in minibatches for lr in lrs for eta in bounds for obj in objectives]
    overrides = {c: cell_overrides(args.task, c[3], c[2], c[0], steps, c[1], q, args.overrides, heldout_n)
                 for c in cells}
    keys = {c: cell_key(o) for c, o in overrides.items()}
    legacy = {c: legacy_key(o) for c, o in overrides.items()}   # the key before the behav_clip pin, if any
    old_keys = {k: keys[c] for c, k in legacy.items() if k}         # old key -> key
    ran = skipped = 0
    if args.start_model and not args.summary_only:
        pin_start_model(args.task, Path(args.start_model))
    if not args.summary_only:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(args.out) if args.out else Path(tmp)
            for seed in seeds:  # seed-major: drift on a shared machine hits every cell alike
                for c in cells:
                    mb, lr, eta, obj = c
                    stem = run_stem(obj, mb, eta, seed, keys[c], lr)
                    if any((grid / f"{run_stem(obj, mb, eta, seed, k, lr)}.json").exists() for k in (keys[c], legacy[c]) if k):
                        skipped += 1
                        continue
                    r = run_one(out, grid, stem, args.task, obj, eta, mb, lr, seed, [*overrides[c], f"run.seed={seed}"],
                                heldout_n, command)
                    write_run(grid, stem, r)
                    ran += 1
                    print(f"{stem}: held-out {r.heldout_reward:.3f}, final reward {r.reward_final:.3f}, "
                          f"{r.samples_per_s:.1f} samples/s, staleness max {r.staleness_max}, update KL "
                          f"{'-' if r.update_kl is None else format(r.update_kl, '.2e')} ({r.wall_s:.0f} s)", flush=True)
    print(f"ran {ran}, skipped {skipped} already in {grid}")
    found = [replace(r, cell_key=old_keys.get(r.cell_key, r.cell_key)) for r in read_runs(grid)] if grid.is_dir() else []
    summary = pool(found, [keys[c] for c in cells])
    md = table(summary)
    start = start_rewards(grid, heldout_n) if grid.is_dir() else {}
    print("\n" + md)
    if start:
        md += "\n\nHeld-out reward of the start model: " + ", ".join(f"{v:.3f} ({k})" for k, v in start.items())
        print(md.rsplit("\n", 1)[1])
    in_cells = [r for r in found if r.cell_key in set(keys.values())]
    fits = realised_fits(in_cells)
    vs = verdicts(summary)
    readings = ([f"The target (benchmarks/ablation_verdict.py):\n\n{verdict_table(vs)}"] if vs else []) + (
        [f"Held-out reward against realised staleness, least squares over runs:\n\n{realised_table(fits)}"] if fits else [])
    for text in readings:
        print("\n" + text)
    if summary:
        report = {"command": command, "task": args.task, "grid": str(grid), "recipes": RECIPES,
                  "cells": [{"cell_key": keys[c], "overrides": overrides[c]} for c in cells],
                  "summary": [asdict(s) for s in summary], "table": md, "readings": readings, "heldout_start": start,
                  "verdicts": [asdict(v) for v in vs], "realised_fits": [asdict(f) for f in fits],
                  "runs_in_grid_dir": len(found), "written_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (grid / "summary.json").write_text(json.dumps(report, indent=1))
        (grid / "summary.md").write_text(f"`{command}`\n\n" + "\n\n".join([md, *readings]) + "\n")
        if plot(grid / "summary.png", summary):
            print(f"wrote {grid / 'summary.png'}")
        if plot_realised(grid / "summary_realised.png", in_cells, fits):
            print(f"wrote {grid / 'summary_realised.png'}")
        print(f"wrote {grid / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
