"""The engine benchmark's summary: per-round ratios and distances from the floor, on hand-made runs."""
from __future__ import annotations

import pytest

from benchmarks.engine_throughput import round_speedup, summarize


def test_round_speedup_is_ours_over_the_better_baseline_of_the_round() -> None:
    assert round_speedup({"ours": 300.0, "hf_static": 100.0, "hf_cb": 150.0}) == 2.0
    assert round_speedup({"ours": 300.0, "hf_cb": 200.0}) == 1.5
    assert round_speedup({"ours": 300.0}) is None
    assert round_speedup({"hf_static": 1.0, "hf_cb": 2.0}) is None


def test_summarize_medians_per_round_ratios_and_floor_distances() -> None:
    rounds = [{"tokens_per_s": t, "speedup_vs_best_baseline": round_speedup(t)}
              for t in ({"ours": 400.0, "hf_static": 80.0, "hf_cb": 200.0},
                        {"ours": 300.0, "hf_static": 70.0, "hf_cb": 250.0},
                        {"ours": 500.0, "hf_static": 90.0, "hf_cb": 200.0})]
    model = {"rounds": rounds, "engines": {
        "ours": {"runs_tokens_per_s": [400.0, 300.0, 500.0], "runs_x_above_roofline": [2.5, 3.3, 2.0]},
        "hf_static": {"runs_tokens_per_s": [80.0, 70.0, 90.0], "runs_x_above_roofline": [12.5, 14.3, 11.1]},
        "hf_cb": {"runs_tokens_per_s": [200.0, 250.0, 200.0], "runs_x_above_roofline": [5.0, 4.0, 5.0]}}}
    results = {"models": {"20M": model}}
    summarize(results)
    assert model["speedup_per_round"] == [2.0, 1.2, 2.5]
    assert model["speedup_median_per_round"] == 2.0  # median of 2.0, 1.2, 2.5
    assert model["engines"]["ours"]["median_tokens_per_s"] == 400.0
    assert model["engines"]["ours"]["median_x_above_roofline"] == 2.5
    assert model["engines"]["hf_cb"]["median_x_above_roofline"] == 5.0
    # medians of medians: 400 / max(80, 200)
    assert model["speedup_median_vs_best_baseline_median"] == pytest.approx(2.0)
    # the better baseline's distance bounds any engine's ratio over it
    assert model["best_baseline_median_x_above_roofline"] == 5.0
