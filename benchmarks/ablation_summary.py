"""The staleness ablation's records and its summary: one JSON file per run, a table per cell.

A *run* is one training run of the grid (objective, minibatches, eta, seed); a *cell* is the same
without the seed. A run is identified by the full list of overrides it ran with (the cell's
overrides plus `run.seed`), so a file written by any machine or session names exactly what was run;
the summary pools every file of the grid directory whose cell overrides match, whatever process
wrote it. Pure except `write_run`/`read_runs` (the files) and `plot`.

Invariants: a run file is written whole (temporary name, then rename), so a killed grid leaves no
half record for the next invocation to trust; the cell key is a hash of the override list in order,
so two invocations that would run the same command share their files.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class RunResult:
    """One finished run of the grid, as written to `<grid>/<stem>.json`.

    `heldout_reward`: the final model's mean reward on `heldout_n` fixed held-out prompts (the score);
    `reward_final`: the mean training reward of the last window of steps; `update_kl`: mean over steps
    (token-weighted) of the k3 KL(pi_v-1 || pi_v) on tokens exactly one version stale, i.e. how far one
    training step moves the policy (None when no token was one version stale, e.g. eta = 0);
    `approx_kl`: mean over steps of the learner's approx_kl, KL(old || current) during the step's updates,
    where old is the proximal policy for the decoupled objectives (0 with one update per batch, the drift
    within a step with several) but the behaviour policy for naive PPO (so there it includes the drift
    since sampling: compare `update_kl` across objectives, not `approx_kl`)."""
    task: str
    objective: str
    eta: int
    minibatches: int
    seed: int
    cell_key: str
    overrides: list[str]
    heldout_reward: float
    heldout_n: int
    reward_final: float
    reward_first: float
    samples_per_s: float
    staleness_mean: float
    staleness_max: int
    update_kl: float | None
    approx_kl: float | None
    steps: int
    wall_s: float
    finished_utc: str
    command: str
    lr: float | None = None  # trainer.lr if the grid set it (None: the task config's)
    # sha256 of the start model's weights file: the embedded model is cold-started per machine and the
    # cold start is not bit-reproducible across CPUs, so runs are pooled only when they share it
    start_sha256: str | None = None
    code_rev: str | None = None  # the commit of the code that ran it (`+dirty`: with uncommitted changes)

    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        required = {f.name for f in fields(cls) if f.default is MISSING}
        missing = required - d.keys()
        if missing:
            raise ValueError(f"not a staleness-ablation run record: missing {sorted(missing)}")
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True)
class MeanSem:
    """Mean over seeds and its standard error stdev / sqrt(n) (None with a single seed: no spread known)."""
    mean: float
    sem: float | None
    n: int


@dataclass(frozen=True)
class CellSummary:
    """One cell of the grid over every seed found for it."""
    objective: str
    minibatches: int
    lr: float | None
    eta: int
    seeds: list[int]
    heldout_reward: MeanSem
    reward_final: MeanSem
    samples_per_s: float
    staleness_mean: float
    staleness_max: int
    update_kl: float | None   # mean over the runs that measured it (None: none did)
    approx_kl: float | None


def cell_key(cell_overrides: list[str]) -> str:
    """A short stable name for a cell: the first 10 hex digits of sha256 over its overrides in order."""
    return hashlib.sha256("\n".join(cell_overrides).encode()).hexdigest()[:10]


def run_stem(objective: str, minibatches: int, eta: int, seed: int, key: str, lr: float | None = None) -> str:
    """File stem of one run: readable, and unique per (cell overrides, seed) through the key."""
    return f"{objective}-mb{minibatches}{'' if lr is None else f'-lr{lr:g}'}-eta{eta}-seed{seed}-{key}"


def mean_sem(values: list[float]) -> MeanSem:
    """Mean and standard error of the mean, stdev (n - 1 in the denominator) / sqrt(n)."""
    if not values:
        raise ValueError("mean_sem of no values")
    n = len(values)
    return MeanSem(statistics.fmean(values), statistics.stdev(values) / math.sqrt(n) if n > 1 else None, n)


def weighted_mean(pairs: list[tuple[float, int]]) -> float | None:
    """sum(v * w) / sum(w) over (value, weight) pairs with weight > 0; None if the weights sum to 0."""
    total = sum(w for _, w in pairs if w > 0)
    return sum(v * w for v, w in pairs if w > 0) / total if total else None


def summarize_cell(runs: list[RunResult]) -> CellSummary:
    """Pool the runs of one cell (each seed once: the caller groups by cell key and seed)."""
    if not runs:
        raise ValueError("a cell needs at least one run")
    first = runs[0]
    if len({r.cell_key for r in runs}) != 1 or len({r.seed for r in runs}) != len(runs):
        raise ValueError("summarize_cell: runs of different cells or a seed twice")
    kls = [r.update_kl for r in runs if r.update_kl is not None]
    akls = [r.approx_kl for r in runs if r.approx_kl is not None]
    return CellSummary(
        objective=first.objective, minibatches=first.minibatches, lr=first.lr, eta=first.eta,
        seeds=sorted(r.seed for r in runs),
        heldout_reward=mean_sem([r.heldout_reward for r in runs]),
        reward_final=mean_sem([r.reward_final for r in runs]),
        samples_per_s=statistics.fmean(r.samples_per_s for r in runs),
        staleness_mean=statistics.fmean(r.staleness_mean for r in runs),
        staleness_max=max(r.staleness_max for r in runs),
        update_kl=statistics.fmean(kls) if kls else None,
        approx_kl=statistics.fmean(akls) if akls else None,
    )


def _pm(m: MeanSem) -> str:
    return f"{m.mean:.3f} ± {m.sem:.3f}" if m.sem is not None else f"{m.mean:.3f} (1 seed)"


def _opt(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def table(cells: list[CellSummary]) -> str:
    """Markdown table, one row per cell in the given order: held-out and final training reward as
    mean ± standard error over seeds, samples/s, staleness seen and the per-update KL."""
    lines = [("| objective | minibatches | lr | eta | seeds | held-out reward | final training reward | samples/s "
              "| staleness mean / max | update KL | approx_kl |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        lr = "config" if c.lr is None else f"{c.lr:g}"
        lines.append(f"| {c.objective} | {c.minibatches} | {lr} | {c.eta} | {len(c.seeds)} | {_pm(c.heldout_reward)} "
                     f"| {_pm(c.reward_final)} | {c.samples_per_s:.1f} | {c.staleness_mean:.2f} / {c.staleness_max} "
                     f"| {_opt(c.update_kl, '.2e')} | {_opt(c.approx_kl, '.2e')} |")
    return "\n".join(lines)


def write_run(grid: Path, stem: str, run: RunResult) -> Path:
    """Write one run's record whole: to a temporary name, then renamed into place."""
    grid.mkdir(parents=True, exist_ok=True)
    path, tmp = grid / f"{stem}.json", grid / f".{stem}.json.tmp"
    tmp.write_text(json.dumps(asdict(run), indent=1))
    os.replace(tmp, path)
    return path


def read_runs(grid: Path) -> list[RunResult]:
    """Every run record in the grid directory (other JSON files, e.g. the summary, are skipped)."""
    out = []
    for p in sorted(grid.glob("*.json")):
        d = json.loads(p.read_text())
        if isinstance(d, dict) and "cell_key" in d:
            out.append(RunResult.from_dict(d))
    return out


def pool(runs: list[RunResult], keys: list[str]) -> list[CellSummary]:
    """Summaries of the cells named by `keys` (in that order) from every run found; a cell with no
    run yet is left out. A seed found twice for one cell (the same run copied from two machines)
    counts once: the first file in name order.
    Runs of one cell that started from different models (`start_sha256`) are not pooled: ValueError
    naming them (a run recorded before the field existed, None, is taken as it is).
    """
    out = []
    for key in keys:
        by_seed: dict[int, RunResult] = {}
        for r in runs:
            if r.cell_key == key:
                by_seed.setdefault(r.seed, r)
        starts = {r.start_sha256 for r in by_seed.values()} - {None}
        if len(starts) > 1:
            raise ValueError(f"cell {key}: its runs started from different models ({', '.join(sorted(starts))}): "
                             "pool only runs of one start model (staleness_ablation --start-model pins it)")
        if by_seed:
            out.append(summarize_cell(list(by_seed.values())))
    return out


def plot(path: Path, cells: list[CellSummary]) -> bool:
    """Final held-out reward against eta, one line per objective (error bars: standard error), one
    panel per minibatch setting (and learning rate, if the grid has several). False (nothing written)
    without matplotlib."""
    from benchmarks.common import try_pyplot

    plt = try_pyplot()
    if plt is None or not cells:
        return False
    panels = sorted({(c.minibatches, c.lr) for c in cells}, key=lambda p: (p[0], p[1] or 0.0))
    colour = {obj: f"C{i}" for i, obj in enumerate(dict.fromkeys(c.objective for c in cells))}  # same in every panel
    etas = sorted({c.eta for c in cells})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, sharey=True)
    for ax, (mb, lr) in zip(axes[0], panels):
        for obj, col in colour.items():
            pts = sorted(((c.eta, c.heldout_reward) for c in cells if (c.minibatches, c.lr) == (mb, lr) and c.objective == obj),
                         key=lambda p: p[0])
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts], yerr=[p[1].sem or 0.0 for p in pts],
                            color=col, marker="o", capsize=3, label=obj)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(etas, [str(e) for e in etas])
        ax.set_xlabel("max_staleness (eta)")
        ax.set_title(f"ppo_minibatches = {mb}" + ("" if lr is None else f", lr = {lr:g}"))
        ax.legend()
    axes[0][0].set_ylabel("final held-out reward")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
