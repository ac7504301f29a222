"""Asynchronous vs synchronous RL on the long-tailed `sum_cot` task, same model, machine and steps.

A synchronous step generates a whole batch, waits for its longest response, then trains while
the rollout server idles. The asynchronous modes keep generating within `max_staleness` while
the trainer trains. Each mode runs the same number of training steps from the same cold-started
model with the same seeds; we report trained samples per second of RL wall time, trainer busy
fraction, rollout slot occupancy, the machine's CPU busy fraction during the training steps (how
much of the 2 cores each mode keeps busy), time to a reward threshold and the final reward.

Every mode uses the config's hardware layout (two rollout servers and the trainer, one thread each);
only run.mode, controller.max_staleness and (async_s2_hard) controller.max_token_staleness change.
Each run's final model is also scored on fixed held-out prompts (512; 128 with --quick; `heldout_reward`):
unlike the last training batches, that does not depend on which responses happened to finish first.

    python -m benchmarks.async_vs_sync --seeds 0,1,2   # every mode -> results/async_vs_sync.{json,png}
    python -m benchmarks.async_vs_sync --modes sync,async_s2 --seeds 0,1,2,3,4,5 --name async_vs_sync_headline
    python -m benchmarks.async_vs_sync --quick         # tiny sums, sync and max_staleness 2, one seed, no files
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from areal_py.telemetry.run_summary import RunSummary, summarize_run
from areal_py.telemetry.step_record import read_step_records
from benchmarks.common import (
    RESULTS_DIR,
    ROOT,
    command_line,
    machine_cpu_busy,
    run_areal,
    try_pyplot,
)

CONFIG = "configs/sum_cot.yaml"
# The async modes admit under max_staleness s and keep the config's raised per-token limit
# (controller.max_token_staleness), so a long response that spans many updates is trained, not
# dropped. async_s2_hard makes s a hard per-token bound as well: it shows what that costs here.
MODES: dict[str, list[str]] = {
    "sync": ["run.mode=sync"],
    "async_s1": ["run.mode=async", "controller.max_staleness=1"],
    "async_s2": ["run.mode=async", "controller.max_staleness=2"],
    "async_s4": ["run.mode=async", "controller.max_staleness=4"],
    "async_s8": ["run.mode=async", "controller.max_staleness=8"],
    "async_s2_hard": ["run.mode=async", "controller.max_staleness=2", "controller.max_token_staleness=2"],
}
# Small enough for the test suite: sums of 3..12 digits (responses up to ~40 tokens); 4 steps (from
# step 3 on, async_s2 may train data 2 versions old).
QUICK = ["task.max_terms=12", "rollout.max_new_tokens=48", "model.embedded.max_position_embeddings=96",
         "cold_start.steps=30", "trainer.total_steps=4", "controller.batch_size=4", "controller.group_size=4"]


# Held-out prompts: task seed and count shared by every run, so each final model meets the same prompts.
HELDOUT_SEED, HELDOUT_N = 12345, 512
# --quick: the suite checks the mechanics, and 512 prompts x 5 scorings cost it time; 64 is one
# evaluation batch, and one prompt scored differently moves a reward by 1/64
QUICK_HELDOUT_N = 64


def start_model(run_dir: Path) -> Path:
    """The (cached, cold-started) model directory a run started from."""
    from areal_py.app.model_dir import prepare_model
    from areal_py.config import load_config

    return prepare_model(load_config(str(run_dir / "config.yaml")))


def heldout_reward(run_dir: Path, n: int = HELDOUT_N, model_dir: Path | None = None) -> float:
    """Reward of the run's final model (or of `model_dir`, e.g. its `start_model`) on `n` fixed
    held-out prompts, sampled at the run's temperature.

    The reward of the last training batches depends on which groups finished first (async trains
    short answers early and has more long ones left at the end); this does not. Plain HF generate
    (`trainer.cold_start.evaluate`), prompts sorted by length so each batch stops near its longest.
    """
    from areal_py.config import load_config
    from areal_py.models import load_model_and_tokenizer
    from areal_py.tasks.base import build_task
    from trainer.cold_start import evaluate

    cfg = load_config(str(run_dir / "config.yaml"))
    task = build_task(cfg, seed=HELDOUT_SEED)
    prompts = sorted((task.prompt(i) for i in range(n)), key=lambda p: len(p.text))
    model, tokenizer = load_model_and_tokenizer(model_dir or run_dir / "final")
    return evaluate(model, tokenizer, task, temperature=cfg.rollout.temperature, seed=HELDOUT_SEED,
                    max_new_tokens=cfg.rollout.max_new_tokens, batch_size=64, prompts=prompts)


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def mode_summary(runs: list[RunSummary], cpu_busy: list[float | None], heldout: list[float]) -> dict:
    """Mean and range over seeds of what the issue asks for; per-seed summaries are kept too.
    `cpu_busy`: each run's machine CPU busy fraction during its training steps (benchmarks.common);
    `heldout`: each run's `heldout_reward`."""
    def col(attr: str) -> list[float]:
        return [getattr(r, attr) for r in runs if getattr(r, attr) is not None]

    out = {"runs": [{**r.to_dict(), "machine_cpu_busy": c, "heldout_reward": h}
                    for r, c, h in zip(runs, cpu_busy, heldout)]}
    out["heldout_reward"] = _spread(heldout)
    for attr in ("samples_per_s", "trained_tokens_per_s", "trainer_busy", "slot_occupancy", "reward_final",
                 "time_to_threshold_s", "wall_time_s", "response_len_mean", "dropped_stale", "prompt_len_final"):
        vals = col(attr)
        out[attr] = _spread(vals) if vals else None
    measured = [c for c in cpu_busy if c is not None]
    out["machine_cpu_busy"] = _spread(measured) if measured else None
    out["reached_threshold"] = f"{len(col('time_to_threshold_s'))}/{len(runs)}"
    return out


def speedup(results: dict[str, dict]) -> dict:
    """The best async mode and its samples/s and tokens/s over sync.

    "Best" is by trained tokens/s, not samples/s: a mode that aborts long responses (the hard
    bound) trains more, shorter samples per second, which is a length bias, not speed.
    """
    asyncs = {m: r for m, r in results.items() if m != "sync"}
    if not asyncs:
        return {"best_async": None, "speedup": None, "speedup_tokens": None}
    best = max(asyncs, key=lambda m: asyncs[m]["trained_tokens_per_s"]["mean"])
    sync = results["sync"]
    return {"best_async": best,
            "speedup": asyncs[best]["samples_per_s"]["mean"] / sync["samples_per_s"]["mean"],
            "speedup_tokens": asyncs[best]["trained_tokens_per_s"]["mean"] / sync["trained_tokens_per_s"]["mean"]}


def reward_gap(results: dict[str, dict], key: str = "reward_final") -> dict[str, dict]:
    """Each async mode's reward `key` minus sync's, paired by seed: does async reach the sync reward?

        d_i = key_async(seed i) - key_sync(seed i),   gap = mean(d),   sem = stdev(d) / sqrt(n)

    Pairing removes what a seed shares across modes (its prompt order) from the noise.
    """
    sync = [r[key] for r in results["sync"]["runs"]]
    out = {}
    for mode, res in results.items():
        if mode == "sync":
            continue
        diffs = [r[key] - s for r, s in zip(res["runs"], sync)]
        out[mode] = {"per_seed": diffs, "mean": statistics.fmean(diffs),
                     "sem": statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None}
    return out


def plot(path: Path, curves: dict[str, list[list[tuple[float, float]]]], threshold: float) -> bool:
    """Reward (trailing mean over 5 steps) against RL wall time, one colour per mode, one line per seed."""
    plt = try_pyplot()
    if plt is None:
        print("matplotlib is not installed (pip install -e '.[bench]'): plot skipped")
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (mode, seeds) in enumerate(curves.items()):
        for j, pts in enumerate(seeds):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i}", alpha=1.0 if j == 0 else 0.45,
                    label=mode if j == 0 else None)
    ax.axhline(threshold, color="grey", linestyle="--", linewidth=0.8, label=f"threshold {threshold:.2f}")
    ax.set_xlabel("RL wall time (s)")
    ax.set_ylabel("reward (trailing mean, 5 steps)")
    ax.set_title("sum_cot: reward against wall time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def reward_curve(run_dir: Path, window: int = 5) -> list[tuple[float, float]]:
    recs = read_step_records(run_dir / "metrics.jsonl")
    out = []
    for i, r in enumerate(recs):
        tail = recs[max(0, i - window + 1): i + 1]
        out.append((r.wall_time_s, statistics.fmean(x.reward_mean for x in tail)))
    return out


def add_heldout(result_file: Path, runs_dir: Path) -> dict:
    """Held-out rewards for a result file whose runs were kept with --out (or copied out of the
    temporary directory): every `<mode>-seed<seed>` under `runs_dir` is evaluated, the file updated."""
    report = json.loads(result_file.read_text())
    n = report.get("heldout_n", HELDOUT_N)  # files from before the field existed used 512
    for mode, res in report["modes"].items():
        for seed, run in zip(report["seeds"], res["runs"]):
            run["heldout_reward"] = heldout_reward(runs_dir / f"{mode}-seed{seed}", n)
        res["heldout_reward"] = _spread([r["heldout_reward"] for r in res["runs"]])
    report["heldout_gap_vs_sync"] = reward_gap(report["modes"], "heldout_reward")
    result_file.write_text(json.dumps(report, indent=1))
    return report


def _prompt_note(results: dict[str, dict], mode: str) -> str:
    """For the training-reward gap: how long the final window's prompts were, the bias to read it with."""
    a, b = results[mode].get("prompt_len_final"), results["sync"].get("prompt_len_final")
    if not a or not b:
        return ""
    return f" (final-window prompts {a['mean']:.1f} tokens, sync {b['mean']:.1f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny settings for the test suite; no result files")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1; --quick uses 0)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    ap.add_argument("--threshold", type=float, default=None,
                    help="reward threshold for time-to-threshold; default 0.9 x the sync runs' final reward")
    ap.add_argument("--out", default="", help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--name", default="async_vs_sync",
                    help="result file stem under benchmarks/results/ (a subset of modes or seeds gets its own)")
    ap.add_argument("--add-heldout", default="", metavar="RUNS_DIR",
                    help="run nothing: evaluate the final models kept in RUNS_DIR and add their held-out rewards "
                         "to results/<name>.json")
    ap.add_argument("overrides", nargs="*", help="extra key.sub=value overrides for every run")
    args = ap.parse_args(argv)
    if args.add_heldout:
        report = add_heldout(RESULTS_DIR / f"{args.name}.json", Path(args.add_heldout))
        for m, r in report["modes"].items():
            gap = report["heldout_gap_vs_sync"].get(m)
            print(f"{m:14} held-out reward {r['heldout_reward']['mean']:.3f} "
                  f"[{r['heldout_reward']['min']:.3f}, {r['heldout_reward']['max']:.3f}]"
                  + (f", minus sync {gap['mean']:+.3f} +- {gap['sem'] or 0:.3f}" if gap else ""))
        return 0
    seeds = [0] if args.quick and args.seeds == "0,1" else [int(s) for s in args.seeds.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    if args.quick and args.modes == ",".join(MODES):
        modes = ["sync", "async_s2"]  # the suite checks the mechanics, not the full grid
    unknown = [m for m in modes if m not in MODES]
    if unknown or "sync" not in modes:
        ap.error(f"--modes must include sync and only use {sorted(MODES)}; got {modes}")
    extra = (QUICK if args.quick else []) + args.overrides
    heldout_n = QUICK_HELDOUT_N if args.quick else HELDOUT_N

    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        run_dirs: dict[str, list[Path]] = {m: [] for m in modes}
        for seed in seeds:  # seed-major order: drift on this noisy machine hits every mode alike
            for mode in modes:
                name = f"{mode}-seed{seed}"
                t0 = time.time()
                run_dirs[mode].append(run_areal(out, name, [*MODES[mode], f"run.seed={seed}", *extra],
                                                config=str(ROOT / CONFIG)))
                s = summarize_run(run_dirs[mode][-1])
                print(f"{name}: {s.samples_per_s:.1f} samples/s, busy {s.trainer_busy:.2f}, "
                      f"final reward {s.reward_final:.3f} ({time.time() - t0:.0f} s)", flush=True)
        sync_final = statistics.fmean(summarize_run(d).reward_final for d in run_dirs["sync"])
        threshold = args.threshold if args.threshold is not None else round(0.9 * sync_final, 3)
        print(f"held-out reward of each final model ({heldout_n} prompts)...", flush=True)
        results = {m: mode_summary([summarize_run(d, reward_threshold=threshold) for d in dirs],
                                   [machine_cpu_busy(d) for d in dirs], [heldout_reward(d, heldout_n) for d in dirs])
                   for m, dirs in run_dirs.items()}
        curves = {m: [reward_curve(d) for d in dirs] for m, dirs in run_dirs.items()}
        # What RL started from: each distinct cold-started model (sum_cot.yaml shares one across seeds).
        start_heldout: dict[str, float] = {}
        for d in run_dirs["sync"]:
            path = start_model(d)
            if path.name not in start_heldout:
                start_heldout[path.name] = heldout_reward(d, heldout_n, model_dir=path)

    report = {
        "command": command_line("benchmarks.async_vs_sync", argv),
        "config": CONFIG, "extra_overrides": extra, "seeds": seeds, "threshold": threshold,
        "heldout_n": heldout_n,
        "heldout_start": start_heldout,
        "modes": results,
        **speedup(results),
        "final_reward": {m: r["reward_final"]["mean"] for m, r in results.items()},
        "reward_gap_vs_sync": reward_gap(results),
        "heldout_gap_vs_sync": reward_gap(results, "heldout_reward"),
        "benchmark_wall_s": round(time.time() - start, 1),
    }
    print(f"\n{'mode':10} {'samples/s':>10} {'tokens/s':>9} {'busy':>6} {'slots':>6} {'cpu':>5} {'resp len':>8} "
          f"{'dropped':>7} {'final reward':>20} {'held-out':>8} {'to threshold':>14}")
    for m, r in results.items():
        occ = r["slot_occupancy"]["mean"] if r["slot_occupancy"] else float("nan")
        ttt = r["time_to_threshold_s"]["mean"] if r["time_to_threshold_s"] else float("nan")
        cpu = r["machine_cpu_busy"]["mean"] if r["machine_cpu_busy"] else float("nan")
        rf = r["reward_final"]
        print(f"{m:10} {r['samples_per_s']['mean']:10.1f} {r['trained_tokens_per_s']['mean']:9.0f} "
              f"{r['trainer_busy']['mean']:6.2f} {occ:6.2f} {cpu:5.2f} {r['response_len_mean']['mean']:8.1f} "
              f"{r['dropped_stale']['mean']:7.1f} {rf['mean']:6.3f} [{rf['min']:.3f},{rf['max']:.3f}] "
              f"{r['heldout_reward']['mean']:8.3f} {ttt:10.0f} s ({r['reached_threshold']})")
    print("held-out reward of the start model: " + ", ".join(f"{r:.3f} ({m})" for m, r in start_heldout.items()))
    if report["best_async"]:
        print(f"speedup (best async by tokens/s = {report['best_async']}, over sync): "
              f"{report['speedup']:.2f}x samples/s, {report['speedup_tokens']:.2f}x tokens/s")
    for label, key in (("final training reward", "reward_gap_vs_sync"), ("held-out reward", "heldout_gap_vs_sync")):
        for m, g in report[key].items():
            sem = f" +- {g['sem']:.3f}" if g["sem"] is not None else ""
            note = _prompt_note(results, m) if key == "reward_gap_vs_sync" else ""
            print(f"{label}, {m} minus sync (paired by seed): {g['mean']:+.3f}{sem}{note}")
    # Full runs are the committed results; a quick run writes only into --out, if given.
    dest = RESULTS_DIR if not args.quick else Path(args.out) if args.out else None
    if dest is not None:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / f"{args.name}.json").write_text(json.dumps(report, indent=1))
        plot(dest / f"{args.name}.png", curves, threshold)
        print(f"wrote {dest / f'{args.name}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
