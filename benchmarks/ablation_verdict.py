"""Reading the staleness ablation: does an objective meet the target, and how does the held-out reward
move with the staleness a run actually saw?

The target (issue 18) for an objective, in one panel of the grid (minibatches, lr):
- *holds under staleness*: at eta = 4 and eta = 8 its mean held-out reward is within `tol` (0.03) of its
  own mean at eta = 0;
- *no worse than naive PPO*: at every eta, mean - mean_naive >= -se_diff, where
  se_diff = sqrt(se^2 + se_naive^2) is the standard error of the difference of two independent means
  (the runs of two objectives share seeds but not trajectories: the two processes race, so runs are
  not paired).

eta is only a bound: how much of it a run uses depends on how fast generation is against training,
which the machine's load moves. So the grid is also read against the realised staleness (each run's
mean token staleness) with a least-squares line per objective,
    slope = S_xy / S_xx,  se(slope) = sqrt(SSR / (n - 2) / S_xx),
where S_xx = sum (x - x_bar)^2, S_xy = sum (x - x_bar)(y - y_bar), SSR = sum of squared residuals.
Pure except `plot_realised`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from benchmarks.ablation_summary import CellSummary, MeanSem, RunResult

NEAR_ETAS = (4, 8)
TOLERANCE = 0.03


@dataclass(frozen=True)
class Verdict:
    """The target check of one objective in one panel. A check is None when a cell it needs is missing
    or (for the comparison with naive PPO) has a single seed, so no standard error."""
    objective: str
    minibatches: int
    lr: float | None
    etas: list[int]
    min_seeds: int
    worst_drop: float | None      # max over NEAR_ETAS of mean(eta=0) - mean(eta)
    holds: bool | None            # worst_drop <= tol
    worst_gap: float | None       # min over eta of (mean - mean_naive) / se_diff, in standard errors
    vs_naive: bool | None         # worst_gap >= -1
    mean_over_etas: float         # unweighted mean of the cell means: one number to rank objectives

    @property
    def meets_target(self) -> bool:
        return bool(self.holds and self.vs_naive)


def diff_sem(a: MeanSem, b: MeanSem) -> float | None:
    """Standard error of mean_a - mean_b for independent samples: sqrt(se_a^2 + se_b^2); None if either is unknown."""
    if a.sem is None or b.sem is None:
        return None
    return math.hypot(a.sem, b.sem)


def verdict(cells: list[CellSummary], objective: str, minibatches: int, lr: float | None,
            reference: str = "naive", tol: float = TOLERANCE) -> Verdict:
    """The target check of `objective` against `reference` over the cells of one (minibatches, lr) panel."""
    def panel(obj: str) -> dict[int, CellSummary]:
        return {c.eta: c for c in cells if c.objective == obj and c.minibatches == minibatches and c.lr == lr}

    own, ref = panel(objective), panel(reference)
    if not own:
        raise ValueError(f"no cell of {objective!r} at minibatches={minibatches}, lr={lr}")
    worst_drop = holds = None
    if 0 in own and all(e in own for e in NEAR_ETAS):
        worst_drop = max(own[0].heldout_reward.mean - own[e].heldout_reward.mean for e in NEAR_ETAS)
        holds = worst_drop <= tol + 1e-12
    worst_gap = vs_naive = None
    if objective == reference:
        worst_gap, vs_naive = 0.0, True
    elif own.keys() <= ref.keys():
        gaps = []
        for e, c in own.items():
            se = diff_sem(c.heldout_reward, ref[e].heldout_reward)
            if se is None or se == 0:
                gaps = None
                break
            gaps.append((c.heldout_reward.mean - ref[e].heldout_reward.mean) / se)
        if gaps:
            worst_gap = min(gaps)
            vs_naive = worst_gap >= -1.0
    return Verdict(objective=objective, minibatches=minibatches, lr=lr, etas=sorted(own),
                   min_seeds=min(c.heldout_reward.n for c in own.values()), worst_drop=worst_drop, holds=holds,
                   worst_gap=worst_gap, vs_naive=vs_naive,
                   mean_over_etas=sum(c.heldout_reward.mean for c in own.values()) / len(own))


def verdicts(cells: list[CellSummary], reference: str = "naive") -> list[Verdict]:
    """`verdict` of every objective in every panel that has the reference, best mean over etas first."""
    out = []
    for mb, lr in sorted({(c.minibatches, c.lr) for c in cells}, key=lambda p: (p[0], p[1] or 0.0)):
        objs = dict.fromkeys(c.objective for c in cells if (c.minibatches, c.lr) == (mb, lr))
        if reference in objs:
            out += sorted((verdict(cells, o, mb, lr, reference) for o in objs), key=lambda v: -v.mean_over_etas)
    return out


def _flag(ok: bool | None) -> str:
    return "n/a" if ok is None else "yes" if ok else "no"


def verdict_table(vs: list[Verdict]) -> str:
    """Markdown: one row per objective and panel."""
    lines = [("| objective | minibatches | lr | seeds (min) | mean over eta | worst drop at eta 4, 8 vs eta 0 | "
              "holds (<= 0.03) | worst gap to naive (s.e.) | >= naive within 1 s.e. | meets target |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v in vs:
        lr = "config" if v.lr is None else f"{v.lr:g}"
        drop = "—" if v.worst_drop is None else f"{v.worst_drop:+.3f}"
        gap = "—" if v.worst_gap is None else f"{v.worst_gap:+.2f}"
        lines.append(f"| {v.objective} | {v.minibatches} | {lr} | {v.min_seeds} | {v.mean_over_etas:.3f} | {drop} "
                     f"| {_flag(v.holds)} | {gap} | {_flag(v.vs_naive)} | {'**yes**' if v.meets_target else 'no'} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class LineFit:
    """y = intercept + slope * x by least squares over n points; slope_se from the residual variance."""
    slope: float
    slope_se: float
    intercept: float
    n: int


def ols_fit(xs: list[float], ys: list[float]) -> LineFit:
    """Least-squares line (formula in the module docstring). Needs n >= 3 points and x not all equal."""
    n = len(xs)
    if n != len(ys) or n < 3:
        raise ValueError(f"ols_fit needs at least 3 (x, y) pairs, got {n} x and {len(ys)} y")
    xb, yb = sum(xs) / n, sum(ys) / n
    sxx = sum((x - xb) ** 2 for x in xs)
    if sxx <= 0:
        raise ValueError("ols_fit: every x is the same, the slope is undefined")
    slope = sum((x - xb) * (y - yb) for x, y in zip(xs, ys)) / sxx
    intercept = yb - slope * xb
    ssr = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    return LineFit(slope, math.sqrt(ssr / (n - 2) / sxx), intercept, n)


@dataclass(frozen=True)
class RealisedFit:
    """Held-out reward against a run's mean token staleness, over every run of one objective in one panel."""
    objective: str
    minibatches: int
    lr: float | None
    fit: LineFit
    staleness_range: tuple[float, float]


def realised_fits(runs: list[RunResult]) -> list[RealisedFit]:
    """One `ols_fit` per (objective, minibatches, lr) with at least 3 runs at two or more staleness values."""
    groups: dict[tuple[str, int, float | None], list[RunResult]] = {}
    for r in runs:
        groups.setdefault((r.objective, r.minibatches, r.lr), []).append(r)
    out = []
    for (obj, mb, lr), rs in groups.items():
        xs, ys = [r.staleness_mean for r in rs], [r.heldout_reward for r in rs]
        if len(rs) >= 3 and max(xs) > min(xs):
            out.append(RealisedFit(obj, mb, lr, ols_fit(xs, ys), (min(xs), max(xs))))
    return sorted(out, key=lambda f: (f.minibatches, f.lr or 0.0, f.objective))


def realised_table(fits: list[RealisedFit]) -> str:
    """Markdown: the slope per unit of realised staleness, ± its standard error, and the reward it predicts at 0."""
    lines = [("| objective | minibatches | lr | runs | staleness mean range | held-out reward at 0 (fit) "
              "| slope per step of staleness |"), "|---|---|---|---|---|---|---|"]
    for f in fits:
        lr = "config" if f.lr is None else f"{f.lr:g}"
        lines.append(f"| {f.objective} | {f.minibatches} | {lr} | {f.fit.n} | {f.staleness_range[0]:.2f}–"
                     f"{f.staleness_range[1]:.2f} | {f.fit.intercept:.3f} | {f.fit.slope:+.4f} ± {f.fit.slope_se:.4f} |")
    return "\n".join(lines)


def plot_realised(path: Path, runs: list[RunResult], fits: list[RealisedFit]) -> bool:
    """Each run's held-out reward against its mean token staleness, with the fitted line, one colour per
    objective, one panel per (minibatches, lr). False (nothing written) without matplotlib."""
    from benchmarks.common import try_pyplot

    plt = try_pyplot()
    if plt is None or not runs:
        return False
    panels = sorted({(r.minibatches, r.lr) for r in runs}, key=lambda p: (p[0], p[1] or 0.0))
    colour = {obj: f"C{i}" for i, obj in enumerate(dict.fromkeys(r.objective for r in runs))}
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False, sharey=True)
    for ax, (mb, lr) in zip(axes[0], panels):
        for obj, col in colour.items():
            rs = [r for r in runs if (r.minibatches, r.lr, r.objective) == (mb, lr, obj)]
            if not rs:
                continue
            ax.scatter([r.staleness_mean for r in rs], [r.heldout_reward for r in rs], color=col, s=14, alpha=0.7,
                       label=obj)
            for f in fits:
                if (f.objective, f.minibatches, f.lr) == (obj, mb, lr):
                    lo, hi = f.staleness_range
                    ax.plot([lo, hi], [f.fit.intercept + f.fit.slope * lo, f.fit.intercept + f.fit.slope * hi],
                            color=col, linewidth=1)
        ax.set_xlabel("realised mean token staleness of the run")
        ax.set_title(f"ppo_minibatches = {mb}" + ("" if lr is None else f", lr = {lr:g}"))
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("final held-out reward")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
