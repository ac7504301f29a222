"""`areal-py sweep`: key resolution, grid parsing and validation, the recommendation rule by hand, rendering,
and one real two-value sweep."""
import json
import re
import time
from pathlib import Path

import pytest
from conftest import run_cli

from areal_py.app.sweep import (
    parse_grid,
    resolve_key,
    run_dir_names,
    run_sweep,
    split_values,
    sweep_overrides,
    validate_grid,
)
from areal_py.app.sweep_report import render_html, render_table, table_rows
from areal_py.app.sweep_rule import recommend
from areal_py.config import ConfigError
from areal_py.telemetry.run_summary import RunSummary


def summary(reward: float, sps: float, sem: float = 0.0) -> RunSummary:
    return RunSummary(steps=10, wall_time_s=10.0, trained_samples=int(sps * 10), samples_per_s=sps,
                      trained_tokens_per_s=sps * 4, trainer_busy=0.5, slot_occupancy=None, reward_first=0.1,
                      reward_final=reward, window=5, time_to_threshold_s=None, staleness_mean=0.0,
                      staleness_max=0, dropped_stale=0, response_len_mean=3.0, reward_final_sem=sem)


GRID = {"0": summary(0.80, 10), "1": summary(0.78, 15), "2": summary(0.76, 14), "4": summary(0.70, 20),
        "8": summary(0.60, 21)}


def test_short_keys_resolve_when_unique():
    assert resolve_key("max_staleness") == "controller.max_staleness"
    assert resolve_key("hidden_size") == "model.embedded.hidden_size"  # two levels deep
    assert resolve_key("trainer.lr") == "trainer.lr"
    # the task section holds every registered task's keys, whichever task.name the base config picks
    assert resolve_key("max_terms") == "task.max_terms" and resolve_key("task.max_operand") == "task.max_operand"
    assert resolve_key("prompt_key") == "task.prompt_key"
    with pytest.raises(ConfigError, match="ambiguous: run.name, task.name"):
        resolve_key("name")
    with pytest.raises(ConfigError, match="ambiguous: cold_start.lr, trainer.lr"):
        resolve_key("lr")
    with pytest.raises(ConfigError, match="unknown sweep key 'nope'; valid keys: run.name, .*controller.max_staleness"):
        resolve_key("nope")
    with pytest.raises(ConfigError, match="unknown sweep key 'controller.nope'"):
        resolve_key("controller.nope")


def test_grid_parsing():
    assert parse_grid("max_staleness=0, 2,8") == ("controller.max_staleness", ["0", "2", "8"])
    assert parse_grid("run.mode=sync,async") == ("run.mode", ["sync", "async"])
    assert split_values("[1, 2],[3],{a: 1, b: 2}") == ["[1, 2]", "[3]", "{a: 1, b: 2}"]  # YAML values keep commas
    for bad, msg in [("max_staleness", "not of the form"), ("max_staleness=1", "at least two"),
                     ("max_staleness=1,1", "repeats"), ("lr=1,2", "ambiguous"),
                     ("run.name=a,b", "cannot sweep run.name"), ("output_dir=a,b", "cannot sweep run.output_dir")]:
        with pytest.raises(ConfigError, match=msg):
            parse_grid(bad)


def test_values_are_validated_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match=r"(?s)controller.max_staleness=-1 is invalid, nothing was run.*greater than"):
        validate_grid(None, [], "controller.max_staleness", ["0", "-1"])
    with pytest.raises(ConfigError, match=r"(?s)run.mode=fast is invalid.*'sync'"):
        validate_grid(None, [], "run.mode", ["sync", "fast"])
    assert [c.controller.max_staleness for c in validate_grid(None, [], "controller.max_staleness", ["0", "4"])] \
        == [0, 4]
    # the same through run_sweep: nothing is started and no directory is written
    with pytest.raises(ConfigError, match="max_staleness=x is invalid"):
        run_sweep("max_staleness=0,x", None, [f"run.output_dir={tmp_path}"], name="s")
    with pytest.raises(ConfigError, match="tolerance"):
        run_sweep("max_staleness=0,1", None, [], tolerance=-0.1)
    assert not (tmp_path / "s").exists()


def test_overrides_shared_by_every_run():
    assert sweep_overrides("trainer.lr", ["trainer.lr_x=1"], quick=False) == ["trainer.lr_x=1"]
    q = sweep_overrides("controller.batch_size", ["controller.group_size=4"], quick=True)
    assert "controller.batch_size=16" not in q and "trainer.total_steps=30" in q and q[-1] == "controller.group_size=4"
    with pytest.raises(ConfigError, match="swept and also set by the override 'controller.max_staleness=3'"):
        sweep_overrides("controller.max_staleness", ["controller.max_staleness=3"], quick=False)
    assert run_dir_names("model.path", ["/a/b", "x", "/a_b"]) == {"/a/b": "path-_a_b", "x": "path-x", "/a_b": "path-_a_b-2"}


def test_recommendation_by_hand():
    rec = recommend("controller.max_staleness", GRID, tolerance=0.05)
    # within 0.05 of 0.80 (>= 0.75): 0 (0.80), 1 (0.78), 2 (0.76); 4 (0.70) and 8 (0.60) are not
    assert rec.baseline == "0" and rec.within == ["0", "1", "2"] and rec.outside == ["4", "8"]
    assert rec.value == "2" and rec.rule == "largest"
    assert rec.fastest_within == "1"  # 15 samples/s beats 14 and 10
    text = rec.text(GRID)
    assert "recommended: controller.max_staleness=2" in text and "(-0.040 vs baseline)" in text
    assert "1.40x the baseline" in text  # 14 / 10
    assert "highest throughput within tolerance: controller.max_staleness=1 (15.0 samples/s" in text
    assert "outside: 4 (0.700), 8 (0.600)" in text and "caution" not in text
    loose = recommend("controller.max_staleness", GRID, tolerance=0.25)
    assert loose.value == "8" and loose.fastest_within == "8"
    assert recommend("controller.max_staleness", GRID, tolerance=0.0).value == "0"  # only the baseline itself
    bumpy = {**GRID, "1": summary(0.70, 15)}  # 1 falls outside, 2 is back within: recommended, with a note
    assert recommend("controller.max_staleness", bumpy, 0.05).value == "2"
    assert "note: 1 is smaller than 2 yet outside tolerance" in recommend("controller.max_staleness", bumpy, 0.05).text(
        bumpy)
    assert "note:" not in text


def test_recommendation_baselines_and_orders():
    # staleness listed out of order: the baseline is still 0, "largest" is numeric
    s = {"4": summary(0.79, 20), "0": summary(0.80, 10), "2": summary(0.70, 18)}
    rec = recommend("controller.max_staleness", s, 0.05, ["4", "0", "2"])
    assert rec.baseline == "0" and rec.within == ["0", "4"] and rec.value == "4"
    # another key: the first listed value is the baseline, numeric order decides "largest"
    other = recommend("trainer.lr", {"1e-3": summary(0.5, 5), "1e-4": summary(0.6, 5), "3e-4": summary(0.58, 6)},
                      tolerance=0.05)
    assert other.baseline == "1e-3" and other.within == ["1e-4", "3e-4", "1e-3"] and other.value == "1e-3"
    # non-numeric: no "largest", so the fastest within tolerance
    modes = recommend("run.mode", {"sync": summary(0.8, 10), "async": summary(0.78, 16)}, 0.05)
    assert modes.rule == "fastest" and modes.value == "async" and "the fastest value" in modes.text(
        {"sync": summary(0.8, 10), "async": summary(0.78, 16)})
    # a failed baseline (no summary) or nothing at all: no recommendation
    assert recommend("controller.max_staleness", {"2": summary(0.5, 5)}, 0.05, ["0", "2"]) is None
    assert recommend("controller.max_staleness", {}, 0.05) is None
    noisy = {"0": summary(0.8, 10, sem=0.04), "1": summary(0.8, 12, sem=0.01)}
    assert "caution: a final reward's standard error is up to 0.040" in recommend(
        "controller.max_staleness", noisy, 0.05).text(noisy)


def test_table_and_page_rendering():
    values = ["0", "1", "2", "4", "8", "16"]
    sums = {v: s for v, s in GRID.items() if v != "4"}
    rec = recommend("controller.max_staleness", sums, 0.05, values)
    rows = table_rows(values, sums, {"4": "exit code 1\nmore", "16": "interrupted"}, rec)
    text = render_table("k", rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["k", "samples/s", "tokens/s"] and len(lines) == 7
    assert rows[0][:6] == ["0", "10.0", "40", "0.50", "-", "0.800 ±0.000"] and rows[0][-1] == "baseline"
    assert rows[1][-1] == "fastest within tolerance" and rows[2][-1] == "recommended"
    assert rows[3][:2] == ["4", "failed"] and rows[3][-1] == "exit code 1"
    assert rows[4][-1] == "outside tolerance" and rows[5][1] == "interrupted"
    assert [line[:4] for line in lines] == ["k   ", "0   ", "1   ", "2   ", "4   ", "8   ", "16  "]  # left-aligned
    html = render_html("controller.max_staleness", values, sums, text, rec.text(sums), rec)
    pts = re.findall(r'data-series="([^"]+)" data-x="([^"]+)" data-y="([^"]+)"', html)
    assert ("samples/s", "2", "14") in pts and ("final reward", "8", "0.6") in pts
    assert ("baseline - tolerance", "0", "0.75") in pts and len(pts) == 4 + 4 + 2
    assert "x axis:" not in html
    modes = render_html("run.mode", ["sync", "async"], {"sync": summary(0.8, 10)}, "", "")
    assert "x axis: 0 = sync, 1 = async" in modes


def fake_run(outcomes: dict[str, object], calls: list[str]):
    """Stands in for launcher.run: per max_staleness value, write a 10-step run, return a code, or raise."""
    def run(config, overrides, quiet=False):
        o = dict(x.split("=", 1) for x in overrides)
        v = o["controller.max_staleness"]
        calls.append(v)
        what = outcomes[v]
        if isinstance(what, BaseException):
            raise what
        if isinstance(what, int):
            return what
        d = Path(o["run.output_dir"]) / o["run.name"]
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps(
            {"step": i, "wall_time_s": float(i), "reward_mean": what, "samples": 8, "trained_tokens": 40,
             "train_s": 0.5, "staleness_mean": 0.0, "staleness_max": int(v)}) + "\n" for i in range(1, 11)))
        return 0
    return run


def test_failed_runs_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    import areal_py.app.launcher

    calls: list[str] = []
    monkeypatch.setattr(areal_py.app.launcher, "run", fake_run(
        {"0": 0.8, "1": 1, "2": RuntimeError("boom"), "4": 0.78}, calls))
    code = run_sweep("max_staleness=0,1,2,4", None, [f"run.output_dir={tmp_path}"], name="s")
    assert code == 1 and calls == ["0", "1", "2", "4"]
    rep = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert rep["failed"] == {"1": "exit code 1", "2": "RuntimeError: boom"} and set(rep["runs"]) == {"0", "4"}
    assert rep["recommendation"]["value"] == "4" and rep["threshold"] == pytest.approx(0.75)
    assert rep["runs"]["4"]["time_to_threshold_s"] == 5.0  # first full window (steps 1-5) of 0.78 >= 0.75
    out = capsys.readouterr().out
    assert "controller.max_staleness=2 failed (RuntimeError: boom); going on" in out
    assert re.search(r"^2 +failed .*RuntimeError: boom$", out, re.MULTILINE)
    # the same name again: refused before any run starts
    with pytest.raises(FileExistsError, match="already holds a sweep"):
        run_sweep("max_staleness=0,1", None, [f"run.output_dir={tmp_path}"], name="s")
    assert calls == ["0", "1", "2", "4"]


def test_ctrl_c_stops_the_sweep_and_keeps_what_finished(tmp_path, monkeypatch):
    import areal_py.app.launcher

    calls: list[str] = []
    monkeypatch.setattr(areal_py.app.launcher, "run", fake_run({"0": 0.5, "1": KeyboardInterrupt(), "2": 0.5}, calls))
    assert run_sweep("max_staleness=0,1,2", None, [f"run.output_dir={tmp_path}"], name="s") == 130
    rep = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert calls == ["0", "1"] and rep["interrupted"] and rep["failed"] == {"1": "interrupted"}
    assert "not run" in rep["table"] and rep["recommendation"]["value"] == "0"


def test_sweep_end_to_end(small_cfg, tmp_path):
    t0 = time.monotonic()
    # cold_start.steps=0: the sweep's mechanics need no trained model, and a cold start costs minutes on a busy box
    res = run_cli(["sweep", "max_staleness=0,2", "--name", "sw", "--tolerance", "1.0", "--quiet", *small_cfg,
                   "trainer.total_steps=6", "cold_start.steps=0"], timeout=400)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    out = tmp_path / "runs" / "sw"
    rep = json.loads((out / "sweep.json").read_text())
    assert rep["key"] == "controller.max_staleness" and set(rep["runs"]) == {"0", "2"} and not rep["failed"]
    assert rep["runs"]["0"]["staleness_max"] == 0 and rep["runs"]["2"]["staleness_max"] <= 2
    assert all(r["steps"] == 6 and r["samples_per_s"] > 0 for r in rep["runs"].values())
    assert (out / "max_staleness-0" / "metrics.jsonl").is_file() and (out / "max_staleness-2" / "report.html").is_file()
    # tolerance 1.0 admits every value, so the largest bound is recommended, and the printout says so
    rec = rep["recommendation"]
    assert rec["value"] == "2" and rec["baseline"] == "0" and rec["within"] == ["0", "2"]
    assert f"recommended: controller.max_staleness={rec['value']}" in res.stdout
    assert rep["advice"] in res.stdout and rep["table"] in res.stdout
    fastest = max(rep["runs"], key=lambda v: rep["runs"][v]["samples_per_s"])
    assert rec["fastest_within"] == fastest
    # default threshold = baseline final reward - tolerance: every run within tolerance reaches it
    assert rep["threshold"] == pytest.approx(rep["runs"]["0"]["reward_final"] - 1.0)
    assert all(r["time_to_threshold_s"] is not None for r in rep["runs"].values())
    html = (out / "sweep.html").read_text()
    assert html.count('class="pt"') == 2 + 2 + 2  # throughput and reward per value, and the tolerance line
    for v in ("0", "2"):
        assert f'data-series="samples/s" data-x="{v}" data-y="{rep["runs"][v]["samples_per_s"]:.8g}"' in html
    pytest.importorskip("matplotlib")
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    print(f"e2e sweep took {took:.1f} s")
