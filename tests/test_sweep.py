"""`areal-py sweep`: grid parsing and validation, the recommendation rule by hand, one real sweep."""
import json

import pytest

from areal_py.config import ConfigError
from areal_py.run_stats import RunSummary
from areal_py.sweep import parse_grid, recommend, render_table, resolve_key, table_rows, validate_grid
from conftest import run_cli


def summary(reward: float, sps: float) -> RunSummary:
    return RunSummary(steps=10, wall_time_s=10.0, trained_samples=int(sps * 10), samples_per_s=sps,
                      trained_tokens_per_s=0.0, trainer_busy=0.5, slot_occupancy=None, reward_first=0.1,
                      reward_final=reward, window=5, time_to_threshold_s=None, staleness_mean=0.0,
                      staleness_max=0, dropped_stale=0, response_len_mean=3.0)


def test_short_keys_resolve_when_unique():
    assert resolve_key("max_staleness") == "controller.max_staleness"
    assert resolve_key("trainer.lr") == "trainer.lr"
    with pytest.raises(ConfigError, match="ambiguous: cold_start.lr, trainer.lr"):
        resolve_key("lr")
    with pytest.raises(ConfigError, match="unknown sweep key 'nope'; valid keys: run.name"):
        resolve_key("nope")


def test_grid_parsing_and_up_front_validation():
    assert parse_grid("max_staleness=0, 2,8") == ("controller.max_staleness", ["0", "2", "8"])
    for bad, msg in [("max_staleness", "not of the form"), ("max_staleness=1", "at least two"),
                     ("max_staleness=1,1", "repeats")]:
        with pytest.raises(ConfigError, match=msg):
            parse_grid(bad)
    with pytest.raises(ConfigError, match="controller.max_staleness"):  # -1 fails validation before any run
        validate_grid(None, [], "controller.max_staleness", ["0", "-1"])


def test_recommendation_by_hand():
    s = {"0": summary(0.80, 10), "1": summary(0.78, 15), "2": summary(0.76, 18), "4": summary(0.70, 20),
         "8": summary(0.60, 21)}
    rec = recommend("controller.max_staleness", s, tolerance=0.05)
    # within 0.05 of 0.80: 0 (0.80), 1 (0.78), 2 (0.76); 4 (0.70) and 8 (0.60) are not
    assert rec.baseline == "0" and rec.within == ["0", "1", "2"] and rec.value == "2" and rec.fastest_within == "2"
    assert "recommended controller.max_staleness=2" in rec.text("controller.max_staleness", s)
    loose = recommend("controller.max_staleness", s, tolerance=0.25)
    assert loose.value == "8" and loose.fastest_within == "8"
    # another key: the first listed value is the baseline, numeric order decides "largest"
    other = recommend("trainer.lr", {"1e-3": summary(0.5, 5), "1e-4": summary(0.6, 5), "3e-4": summary(0.58, 6)},
                      tolerance=0.05)
    assert other.baseline == "1e-3" and other.within == ["1e-4", "3e-4", "1e-3"] and other.value == "1e-3"
    assert recommend("controller.max_staleness", {}, 0.05) is None


def test_table_marks_failed_runs():
    rows = table_rows("k", ["0", "1"], {"0": summary(0.5, 12.345)}, {"1": "exit code 1"})
    text = render_table(rows)
    assert "k=0" in text and "12.3" in text and "0.500" in text
    assert rows[1][:2] == ["k=1", "failed"] and "exit code 1" in rows[1][-1]


def test_sweep_end_to_end(small_cfg, tmp_path):
    res = run_cli(["sweep", "max_staleness=0,2", "--name", "sw", "--tolerance", "1.0", *small_cfg,
                   "trainer.total_steps=6"], timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    out = tmp_path / "runs" / "sw"
    rep = json.loads((out / "sweep.json").read_text())
    assert rep["key"] == "controller.max_staleness" and set(rep["runs"]) == {"0", "2"} and not rep["failed"]
    assert rep["runs"]["0"]["staleness_max"] == 0 and rep["runs"]["2"]["staleness_max"] <= 2
    assert all(r["steps"] == 6 and r["samples_per_s"] > 0 for r in rep["runs"].values())
    # tolerance 1.0 admits every value, so the largest bound is recommended
    assert rep["recommendation"]["value"] == "2"
    assert "recommended controller.max_staleness=2" in res.stdout
    html = (out / "sweep.html").read_text()
    assert html.count('class="pt"') == 4  # two values on each of the two charts
