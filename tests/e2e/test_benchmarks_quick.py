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


@pytest.mark.slow  # four runs (2 bounds x 2 objectives), ~4 min of the default suite; the bound itself is
# checked by tests/e2e/test_e2e.py::test_staleness_bound_holds and the pooling by the test below
def test_staleness_ablation_quick(tmp_path):
    rep = _quick("benchmarks.staleness_ablation", tmp_path)
    assert [r["max_staleness"] for r in rep["rows"]] == [0, 4]
    for row in rep["rows"]:
        for loss in ("decoupled", "ppo"):
            assert row[loss]["staleness_max"] <= row["max_staleness"]
            assert row[loss]["samples_per_s"] > 0
    assert "| 4 |" in rep["table"]


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


def test_staleness_ablation_merge_pools_seeds_exactly():
    """Two seeds earlier + two now: final rewards pooled per seed, other columns seed-weighted."""
    from benchmarks.staleness_ablation import check_mergeable, merge, objective_summary

    def row(bound: int, finals: list[float], sps: float, smax: int) -> dict:
        cols = {"reward_first": 0.4, "samples_per_s": sps, "staleness_max": smax, "staleness_mean": smax / 2}
        return {"max_staleness": bound, "decoupled": objective_summary(finals, cols),
                "ppo": objective_summary(finals, cols)}

    earlier = {"command": "old", "seeds": [0, 1], "extra_overrides": ["x=1"], "rows": [row(2, [0.8, 0.6], 100.0, 2)]}
    check_mergeable(earlier, [2], [2, 3], ["x=1"])
    rows, seeds = merge(earlier, [row(2, [0.5, 0.7], 200.0, 1)], [2, 3])
    d = rows[0]["decoupled"]
    assert seeds == [0, 1, 2, 3]
    assert d["reward_final_per_seed"] == [0.8, 0.6, 0.5, 0.7]
    assert d["reward_final"] == pytest.approx(0.65)
    # sample sd of (0.8, 0.6, 0.5, 0.7) = sqrt(0.05 / 3); standard error = that / 2
    assert d["reward_final_sem"] == pytest.approx((0.05 / 3) ** 0.5 / 2)
    assert d["samples_per_s"] == pytest.approx(150.0) and d["staleness_max"] == 2
    assert d["staleness_mean"] == pytest.approx(0.75)
    for bad, match in (((["x=2"], [2, 3], [2]), "overrides"), ((["x=1"], [1, 2], [2]), "seeds \\[1\\]"),
                       ((["x=1"], [2, 3], [2, 4]), "bounds")):
        extra, new_seeds, bounds = bad
        with pytest.raises(SystemExit, match=match):
            check_mergeable(earlier, bounds, new_seeds, extra)


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
