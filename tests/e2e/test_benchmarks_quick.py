"""Every benchmark has a --quick mode the suite runs, so the full ones stay runnable."""
import subprocess
import sys

import pytest
from conftest import ROOT


def test_metrics_overhead_quick(model_cache):
    """Both sides (metrics off, then on) train and the ratio is printed. On the session's cached model:
    the default's model, so a fresh machine does not cold-start it a second time. (benchmarks.weight_swap's
    quick mode runs in tests/e2e/test_dist_run.py, which checks its report too.)"""
    import re

    res = subprocess.run([sys.executable, "-m", "benchmarks.metrics_overhead", "--quick",
                          f"model.cache_dir={model_cache}"], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    pair = re.search(r"pair 0: off (\d+) tok/s, on (\d+) tok/s", res.stdout)
    assert pair and min(int(pair[1]), int(pair[2])) > 0, res.stdout
    assert "metrics on / off = " in res.stdout


def _quick(module: str, out) -> dict:
    import json

    res = subprocess.run([sys.executable, "-m", module, "--quick", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads((out / f"{module.rsplit('.', 1)[1]}.json").read_text())


def test_async_vs_sync_quick(tmp_path):
    """Every mode runs; the report's speedup is the best async (by tokens/s) over sync; staleness bounds hold."""
    from areal_py.telemetry.metrics import read_jsonl
    from benchmarks.async_vs_sync import QUICK, QUICK_HELDOUT_N

    steps = int(next(o for o in QUICK if o.startswith("trainer.total_steps=")).split("=")[1])
    rep = _quick("benchmarks.async_vs_sync", tmp_path)
    modes = rep["modes"]
    assert set(modes) == {"sync", "async_s2"}
    assert rep["best_async"] == "async_s2"
    assert rep["speedup"] == modes["async_s2"]["samples_per_s"]["mean"] / modes["sync"]["samples_per_s"]["mean"]
    assert rep["speedup_tokens"] == (modes["async_s2"]["trained_tokens_per_s"]["mean"]
                                     / modes["sync"]["trained_tokens_per_s"]["mean"])
    assert rep["reward_gap_vs_sync"]["async_s2"]["mean"] == pytest.approx(
        modes["async_s2"]["reward_final"]["mean"] - modes["sync"]["reward_final"]["mean"])
    assert rep["heldout_n"] == QUICK_HELDOUT_N  # the quick held-out set; add_heldout reads it back
    held = {m: modes[m]["runs"][0]["heldout_reward"] for m in modes}
    assert len(rep["heldout_start"]) == 1 and 0.0 <= next(iter(rep["heldout_start"].values())) <= 1.0
    assert all(0.0 <= h <= 1.0 for h in held.values())
    assert rep["heldout_gap_vs_sync"]["async_s2"]["mean"] == pytest.approx(held["async_s2"] - held["sync"])
    # --add-heldout re-scores the kept runs the same way (same prompts and sampling seed; only float
    # summation order between processes may differ: at most one prompt of 64 scored otherwise)
    from benchmarks.async_vs_sync import add_heldout

    again = add_heldout(tmp_path / "async_vs_sync.json", tmp_path)["modes"]
    assert all(abs(again[m]["runs"][0]["heldout_reward"] - held[m]) <= 0.02 for m in modes)
    for name, bound in (("sync", 0), ("async_s2", 2)):
        recs = read_jsonl(tmp_path / f"{name}-seed0" / "metrics.jsonl")
        assert len(recs) == steps and all(r["max_staleness"] == bound for r in recs)
        # sum_cot.yaml raises the per-token limit for async; sync forces it to 0
        assert all(r["staleness_max"] <= r["max_token_staleness"] == (0 if name == "sync" else 64) for r in recs)
        assert 0.0 <= modes[name]["reward_final"]["mean"] <= 1.0
        assert modes[name]["prompt_len_final"]["mean"] >= 6  # 3 terms at least: "d+d+d=" is 6 characters
        assert 0.0 < modes[name]["trainer_busy"]["mean"] <= 1.0
        cpu = modes[name]["runs"][0]["machine_cpu_busy"]  # None only if every step fell within one 0.5 s sample
        assert cpu is None or 0.0 < cpu <= 1.0


def test_busy_fraction_during_steps():
    """The CPU window runs from the first sample with a step record to the first with the final count."""
    from benchmarks.common import busy_fraction_during_steps, machine_cpu

    samples = [(100, 200, 0), (150, 300, 1), (250, 400, 3), (300, 500, 5), (320, 600, 5)]  # (busy, total, records)
    assert busy_fraction_during_steps(samples) == (300 - 150) / (500 - 300)
    assert busy_fraction_during_steps([(1, 2, 0), (2, 4, 0)]) is None  # no step was written
    assert busy_fraction_during_steps([(1, 2, 4), (1, 2, 4)]) is None  # no CPU time passed
    busy, total = machine_cpu()
    assert 0 <= busy <= total


def test_staleness_ablation_quick(tmp_path):
    """2 bounds x 2 objectives x 1 seed: one record per run, a re-run skips them all, and the summary (also
    after a run file of another seed is added, as from another machine) is what the run files say."""
    import json

    from benchmarks.ablation_summary import read_runs
    from benchmarks.staleness_ablation import QUICK_BOUNDS, QUICK_HELDOUT_N, QUICK_OBJECTIVES, QUICK_STEPS

    cmd = [sys.executable, "-m", "benchmarks.staleness_ablation", "--quick", "--out", str(tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    grid = tmp_path / "grid"
    runs = read_runs(grid)
    assert sorted((r.objective, r.eta) for r in runs) == sorted(
        (o, e) for o in QUICK_OBJECTIVES for e in QUICK_BOUNDS)
    for r in runs:
        assert r.seed == 0 and r.steps == QUICK_STEPS and r.heldout_n == QUICK_HELDOUT_N
        assert 0.0 <= r.heldout_reward <= 1.0 and 0.0 <= r.reward_final <= 1.0 and r.samples_per_s > 0
        assert r.staleness_max <= r.eta and f"controller.max_staleness={r.eta}" in r.overrides
        if r.eta == 0:
            assert r.update_kl is None  # no token is one version stale
        assert (tmp_path / f"{r.objective}-mb1-eta{r.eta}-seed0-{r.cell_key}" / "final").is_dir()
    mtimes = {p.name: p.stat().st_mtime_ns for p in grid.glob("*-seed*.json")}
    assert len(mtimes) == 4 and len({r.cell_key for r in runs}) == 4

    def summary() -> dict:
        return json.loads((grid / "summary.json").read_text())

    by_key = {r.cell_key: r for r in runs}
    for cell in summary()["summary"]:
        r = next(x for x in runs if (x.objective, x.eta) == (cell["objective"], cell["eta"]))
        assert cell["seeds"] == [0] and cell["heldout_reward"] == {"mean": r.heldout_reward, "sem": None, "n": 1}
        assert cell["reward_final"]["mean"] == r.reward_final and cell["staleness_max"] == r.staleness_max
    assert len(summary()["table"].splitlines()) == 2 + 4 + 2  # header, rule, 4 cells, blank, start model
    # the target check: one row per objective against naive (single seeds: the comparison is open)
    assert any(t.startswith("The target") for t in summary()["readings"]) == ("naive" in QUICK_OBJECTIVES)
    (start,) = summary()["heldout_start"].values()  # one start model for every cell
    assert 0.0 <= start <= 1.0 and f"{start:.3f}" in summary()["table"]

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "ran 0, skipped 4" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in grid.glob("*-seed*.json")} == mtimes

    # a seed-1 run of one cell, as another machine would have written it: the summary pools both seeds
    key, r0 = next(iter(by_key.items()))
    other = json.loads(next(grid.glob(f"*-seed0-{key}.json")).read_text()) | {
        "seed": 1, "heldout_reward": r0.heldout_reward + 0.25}
    (grid / f"{r0.objective}-mb1-eta{r0.eta}-seed1-{key}.json").write_text(json.dumps(other))
    only = subprocess.run([*cmd, "--summary-only"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert only.returncode == 0, only.stdout + only.stderr
    cell = next(c for c in summary()["summary"] if (c["objective"], c["eta"]) == (r0.objective, r0.eta))
    assert cell["seeds"] == [0, 1]
    assert cell["heldout_reward"]["mean"] == pytest.approx(r0.heldout_reward + 0.125)
    assert cell["heldout_reward"]["sem"] == pytest.approx(0.125)  # two values: |a - b| / 2


def test_async_vs_sync_best_mode_is_chosen_by_tokens_not_samples():
    """A mode that trains many short samples (the hard bound) must not win on samples/s alone."""
    from benchmarks.async_vs_sync import speedup

    def mode(sps: float, tps: float) -> dict:
        return {"samples_per_s": {"mean": sps}, "trained_tokens_per_s": {"mean": tps}}

    rep = speedup({"sync": mode(10.0, 400.0), "async_s2": mode(20.0, 800.0), "async_s2_hard": mode(30.0, 500.0)})
    assert rep == {"best_async": "async_s2", "speedup": 2.0, "speedup_tokens": 2.0}
    assert speedup({"sync": mode(10.0, 400.0)})["best_async"] is None


def test_async_vs_sync_reward_gap_is_paired_by_seed():
    """Hand-computed: diffs (0.5-0.4, 0.3-0.4, 0.6-0.4) = (0.1, -0.1, 0.2): mean 0.0667, sem stdev/sqrt(3)."""
    from benchmarks.async_vs_sync import reward_gap

    def mode(finals):
        return {"runs": [{"reward_final": f} for f in finals]}

    gap = reward_gap({"sync": mode([0.4, 0.4, 0.4]), "async_s2": mode([0.5, 0.3, 0.6])})
    assert list(gap) == ["async_s2"]
    assert gap["async_s2"]["per_seed"] == pytest.approx([0.1, -0.1, 0.2])
    assert gap["async_s2"]["mean"] == pytest.approx(0.2 / 3)
    assert gap["async_s2"]["sem"] == pytest.approx(0.152753 / 3 ** 0.5, rel=1e-5)
    assert reward_gap({"sync": mode([0.4]), "async_s1": mode([0.45])})["async_s1"]["sem"] is None


def test_trainer_step_quick(tmp_path):
    """Both packers train every round; the report holds the floor, the real-token fractions and the cost model."""
    rep = _quick("benchmarks.trainer_step", tmp_path)
    assert set(rep["summary"]) == {"padded_8192", "cost_8192"} and rep["rounds"] == 2
    cm = rep["cost_model"]
    assert min(cm["c0"], cm["c1"], cm["c2"]) >= 0 and cm["c0"] + cm["c1"] + cm["c2"] > 0
    for row in rep["per_round"]:
        assert row["floor_s"] > 0 and row["sequences"] == 16 and 0 < row["min_len"] <= row["max_len"]
        for v in row["variants"].values():
            assert 0 < v["real_token_fraction"] <= 1 and v["cpu_s"] > 0 and v["micro_batches"] >= 1
    assert rep["summary"]["padded_8192"]["speedup_vs_padded_8192_median"] == 1.0
