"""benchmarks/ablation_verdict.py: the target check and the fit against realised staleness, hand-computed."""
import math

import pytest

from benchmarks.ablation_summary import CellSummary, MeanSem, RunResult
from benchmarks.ablation_verdict import (
    diff_sem,
    ols_fit,
    realised_fits,
    realised_table,
    verdict,
    verdict_table,
    verdicts,
)


def cell(obj: str, eta: int, mean: float, sem: float | None = 0.01, n: int = 6, mb: int = 4,
         lr: float | None = 3e-5) -> CellSummary:
    return CellSummary(objective=obj, minibatches=mb, lr=lr, eta=eta, seeds=list(range(n)),
                       heldout_reward=MeanSem(mean, sem, n), reward_final=MeanSem(mean, sem, n), samples_per_s=1.0,
                       staleness_mean=eta / 2, staleness_max=eta, update_kl=None, approx_kl=None)


def grid(obj: str, means: dict[int, float], sem: float | None = 0.01) -> list[CellSummary]:
    return [cell(obj, e, m, sem) for e, m in means.items()]


NAIVE = {0: 0.68, 1: 0.67, 2: 0.69, 4: 0.68, 8: 0.67, 16: 0.68}


def test_diff_sem_is_the_hypotenuse():
    assert diff_sem(MeanSem(0.5, 0.03, 4), MeanSem(0.4, 0.04, 4)) == pytest.approx(0.05)
    assert diff_sem(MeanSem(0.5, None, 1), MeanSem(0.4, 0.04, 4)) is None


def test_verdict_meets_target():
    # drops at eta 4, 8: 0.69 - 0.68 = 0.01, 0.69 - 0.665 = 0.025 (<= 0.03); gaps to naive with
    # se_diff = hypot(0.01, 0.01) = 0.014142: eta 8 (0.665 - 0.67) / 0.014142 = -0.354 is the worst
    own = {0: 0.69, 1: 0.68, 2: 0.69, 4: 0.68, 8: 0.665, 16: 0.68}
    v = verdict(grid("behav_trust", own) + grid("naive", NAIVE), "behav_trust", 4, 3e-5)
    assert v.worst_drop == pytest.approx(0.025) and v.holds is True
    assert v.worst_gap == pytest.approx(-0.005 / math.hypot(0.01, 0.01)) and v.vs_naive is True
    assert v.meets_target and v.min_seeds == 6 and v.etas == [0, 1, 2, 4, 8, 16]
    assert v.mean_over_etas == pytest.approx(sum(own.values()) / 6)


def test_verdict_fails_each_half():
    # the drop at eta 8 is 0.70 - 0.66 = 0.04 > 0.03, though never below naive by a standard error
    drops = {0: 0.70, 1: 0.69, 2: 0.69, 4: 0.69, 8: 0.66, 16: 0.68}
    v = verdict(grid("tis", drops) + grid("naive", NAIVE), "tis", 4, 3e-5)
    assert v.worst_drop == pytest.approx(0.04) and v.holds is False and v.vs_naive is True and not v.meets_target
    # flat, but at eta 2 below naive by 0.03 / 0.014142 = 2.12 standard errors
    low = {0: 0.68, 1: 0.67, 2: 0.66, 4: 0.68, 8: 0.67, 16: 0.68}
    v = verdict(grid("decoupled", low) + grid("naive", NAIVE), "decoupled", 4, 3e-5)
    assert v.holds is True and v.worst_gap == pytest.approx(-0.03 / math.hypot(0.01, 0.01))
    assert v.vs_naive is False and not v.meets_target


def test_verdict_boundaries_and_missing_cells():
    # exactly 0.03 below eta 0 still holds; exactly one standard error below naive still counts
    edge = {0: 0.70, 4: 0.67, 8: 0.67}
    ref = {0: 0.70, 4: 0.67 + math.hypot(0.01, 0.01), 8: 0.67}
    v = verdict(grid("x", edge) + grid("naive", ref), "x", 4, 3e-5)
    assert v.holds is True and v.worst_gap == pytest.approx(-1.0) and v.vs_naive is True
    # no eta 8 cell: the drop cannot be judged; a single-seed cell: no standard error, no comparison
    v = verdict(grid("x", {0: 0.7, 4: 0.7}) + grid("naive", NAIVE), "x", 4, 3e-5)
    assert v.holds is None and v.worst_drop is None and v.vs_naive is True
    v = verdict(grid("x", {0: 0.7, 4: 0.7, 8: 0.7}, sem=None) + grid("naive", NAIVE), "x", 4, 3e-5)
    assert v.vs_naive is None and v.holds is True and not v.meets_target
    # naive itself is its own reference; a cell naive lacks leaves the comparison open
    assert verdict(grid("naive", NAIVE), "naive", 4, 3e-5).vs_naive is True
    assert verdict(grid("x", {32: 0.7}) + grid("naive", NAIVE), "x", 4, 3e-5).vs_naive is None
    with pytest.raises(ValueError, match="no cell of 'y'"):
        verdict(grid("naive", NAIVE), "y", 4, 3e-5)


def test_verdicts_rank_by_mean_and_need_the_reference():
    cells = grid("naive", NAIVE) + grid("a", {e: 0.70 for e in NAIVE}) + grid("b", {e: 0.60 for e in NAIVE})
    assert [v.objective for v in verdicts(cells)] == ["a", "naive", "b"]
    assert verdicts(grid("a", {0: 0.7})) == []   # no naive in the panel: nothing to judge against
    md = verdict_table(verdicts(cells))
    # a's worst gap is at eta 2, where naive is highest: (0.70 - 0.69) / hypot(0.01, 0.01) = +0.71
    assert md.count("\n") == 4 and "| a | 4 | 3e-05 | 6 | 0.700 | +0.000 | yes | +0.71 | yes | **yes** |" in md
    assert "| b |" in md and md.splitlines()[-1].endswith("| no |")


def test_ols_fit_hand_computed():
    # x = 0, 1, 2, 3; y = 1, 3, 2, 5: x_bar 1.5, y_bar 2.75, Sxx 5, Sxy = (-1.5)(-1.75) + (-0.5)(0.25)
    # + (0.5)(-0.75) + (1.5)(2.25) = 2.625 - 0.125 - 0.375 + 3.375 = 5.5; slope 1.1, intercept 1.1;
    # residuals -0.1, 0.8, -1.3, 0.6: SSR 0.01 + 0.64 + 1.69 + 0.36 = 2.7; se = sqrt(2.7 / 2 / 5)
    f = ols_fit([0, 1, 2, 3], [1, 3, 2, 5])
    assert f.slope == pytest.approx(1.1) and f.intercept == pytest.approx(1.1) and f.n == 4
    assert f.slope_se == pytest.approx(math.sqrt(0.27))
    exact = ols_fit([0, 1, 2], [0.7, 0.6, 0.5])    # on a line: no residual
    assert exact.slope == pytest.approx(-0.1) and exact.slope_se == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least 3"):
        ols_fit([0, 1], [0.5, 0.6])
    with pytest.raises(ValueError, match="every x is the same"):
        ols_fit([2, 2, 2], [0.5, 0.6, 0.7])


def run(obj: str, seed: int, stale: float, held: float) -> RunResult:
    return RunResult(task="sum_cot", objective=obj, eta=4, minibatches=4, seed=seed, cell_key=f"k-{obj}",
                     overrides=[], heldout_reward=held, heldout_n=512, reward_final=held, reward_first=0.5,
                     samples_per_s=1.0, staleness_mean=stale, staleness_max=int(stale) + 1, update_kl=None,
                     approx_kl=None, steps=60, wall_s=1.0, finished_utc="2026-12-02T20:00:00+00:00", command="x",
                     lr=3e-5)


def test_realised_fits_group_by_objective_and_skip_degenerate_groups():
    runs = [run("a", s, x, y) for s, (x, y) in enumerate([(0, 1), (1, 3), (2, 2), (3, 5)])]
    runs += [run("b", 0, 1.0, 0.6), run("b", 1, 1.0, 0.7), run("b", 2, 1.0, 0.8)]   # one staleness value
    runs += [run("c", 0, 0.0, 0.6), run("c", 1, 2.0, 0.7)]                           # two runs
    fits = realised_fits(runs)
    assert [f.objective for f in fits] == ["a"]
    assert fits[0].fit.slope == pytest.approx(1.1) and fits[0].staleness_range == (0, 3)
    md = realised_table(fits)
    assert "| a | 4 | 3e-05 | 4 | 0.00–3.00 | 1.100 | +1.1000 ± 0.5196 |" in md
