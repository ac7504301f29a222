"""report.html from a synthetic metrics.jsonl: every chart is there and holds the input's numbers."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import pytest

from areal_py.telemetry import charts
from areal_py.telemetry.report import RATE_WINDOW, ZOOM_STEPS, write_report

N = 30


def synthetic_records(n: int = N) -> list[dict]:
    recs, t, gen, trained = [], 0.0, 0, 0
    for i in range(1, n + 1):
        wait, train, pub = 0.05 + 0.01 * (i % 3), 0.3 + 0.02 * (i % 5), 0.01 + 0.001 * i
        t += wait + train + pub
        gen += 100 + 7 * i
        trained += 400 + 3 * i
        recs.append({
            "step": i, "version": i, "wall_time_s": round(t, 3), "reward_mean": 0.2 + 0.02 * i,
            "staleness_mean": (i % 3) / 2, "staleness_max": i % 3, "sample_staleness_hist": {"0": 20, "1": 10, "2": i % 3},
            "trained_tokens": 400 + 3 * i, "trained_tokens_total": trained, "generated_tokens": gen,
            "server_generated_tokens": {"s0": gen},
            "wait_s": round(wait, 4), "train_s": round(train, 4), "publish_s": round(pub, 4), "prox_time_s": 0.05,
            "loss": -0.01 * i, "clip_fraction": 0.001 * i, "grad_norm": 1.0 + 0.1 * i, "approx_kl": 1e-4 * i,
            "entropy": 2.0 - 0.01 * i, "response_len_mean": 3.0, "ctrl_accepted": 32 * i, "ctrl_dropped_stale": 0,
        })
    return recs


class Points(HTMLParser):
    """Collects, per chart (``<svg data-chart>``), the attributes of its data-point elements."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, list[dict[str, str]]] = {}
        self.current: str | None = None
        self.text: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        if tag == "svg" and "data-chart" in a:
            self.current = a["data-chart"]
            self.charts[self.current] = []
        elif self.current and "data-x" in a and "data-y" in a:
            self.charts[self.current].append(a)

    def handle_endtag(self, tag):
        if tag == "svg":
            self.current = None

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> Points:
    p = Points()
    p.feed(path.read_text())
    return p


def series(p: Points, chart: str, name: str | None = None) -> list[tuple[float, float]]:
    return [(float(a["data-x"]), float(a["data-y"])) for a in p.charts[chart]
            if name is None or a.get("data-series") == name]


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "exp1"
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic_records()))
    (d / "config.yaml").write_text("run:\n  name: exp1\n  mode: async\ncontroller:\n  max_staleness: 2\n")
    return d


def test_report_charts_hold_the_input(run_dir: Path) -> None:
    recs = synthetic_records()
    out = write_report(run_dir)
    assert out == run_dir / "report.html"
    html = out.read_text()
    p = parse(out)
    # self-contained: no scripts, nothing fetched
    assert "script" not in p.tags and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html and "<link" not in html
    text = " ".join(p.text)
    assert "exp1" in text and "no steps yet" not in text
    first = sum(r["reward_mean"] for r in recs[:10]) / 10
    last = sum(r["reward_mean"] for r in recs[-10:]) / 10
    assert f"{first:.3f} → {last:.3f}" in text
    assert "controller.max_staleness" in text  # config table

    for key in ("reward_mean", "loss", "clip_fraction", "grad_norm", "approx_kl", "entropy", "publish_s"):
        chart = {"reward_mean": "reward", "publish_s": "publish"}.get(key, key)
        got = series(p, chart)
        assert len(got) == N, chart
        assert all(close(x, r["step"]) and close(y, r[key]) for (x, y), r in zip(got, recs)), chart
    assert "value_loss" not in p.charts and "slots" not in p.charts  # absent from the input: no empty chart

    # token rates: cumulative counters differenced over RATE_WINDOW intervals
    for name, key in (("generated", "generated_tokens"), ("trained", "trained_tokens_total")):
        got = series(p, "throughput", name)
        assert len(got) == N - 1
        for i, (x, y) in enumerate(got, start=1):
            j = max(0, i - RATE_WINDOW)
            want = (recs[i][key] - recs[j][key]) / (recs[i]["wall_time_s"] - recs[j]["wall_time_s"])
            assert close(x, recs[i]["wall_time_s"]) and close(y, want)

    busy = series(p, "busy")
    assert len(busy) == N and all(0 <= y <= 1 for _, y in busy)
    i = 5
    assert close(busy[i][1], recs[i]["train_s"] / (recs[i]["wall_time_s"] - recs[i - 1]["wall_time_s"]))

    hist = dict(series(p, "staleness_hist"))
    assert hist == {0.0: 20.0 * N, 1.0: 10.0 * N, 2.0: float(sum(i % 3 for i in range(1, N + 1)))}
    assert [y for _, y in series(p, "staleness", "max")] == [float(r["staleness_max"]) for r in recs]

    tl = p.charts["timeline"]
    trainer = [a for a in tl if a["data-lane"] == "trainer"]
    for kind, key in (("wait", "wait_s"), ("publish", "publish_s")):
        segs = [a for a in trainer if a["data-series"] == kind]
        assert len(segs) == N
        assert all(close(float(a["data-y"]), r[key]) for a, r in zip(segs, recs))
    pubs = [a for a in trainer if a["data-series"] == "publish"]
    assert all(close(float(a["data-x2"]), r["wall_time_s"]) for a, r in zip(pubs, recs))
    gen = [a for a in tl if a["data-lane"] == "rollout s0"]
    assert len(gen) == N and sum(float(a["data-y"]) for a in gen) == recs[-1]["generated_tokens"]
    zoom = p.charts["timeline_zoom"]
    assert len([a for a in zoom if a["data-series"] == "publish"]) == ZOOM_STEPS
    assert len([a for a in zoom if a["data-lane"] == "rollout s0"]) == ZOOM_STEPS
    # generation overlaps training on the time axis
    train = [a for a in trainer if a["data-series"] == "train"]
    assert any(float(g["data-x"]) < float(t["data-x"]) < float(g["data-x2"]) for g in gen for t in train)


def test_measured_generation_in_sync_mode(tmp_path: Path) -> None:
    """Records with the servers' spans (generation only while the trainer waits, as in sync mode): the
    timeline draws those spans, apart from training, and slot occupancy gets its chart and summary row."""
    recs = synthetic_records()
    for r in recs:  # generate during the middle of each step's wait
        t_train = r["wall_time_s"] - r["publish_s"] - r["train_s"]
        r["gen_spans"] = [[round(t_train - r["wait_s"] + 0.01, 3), round(t_train - 0.01, 3)]]
        r["gen_busy_s"] = round(r["wait_s"] - 0.02, 4)
        r["rollout_slot_occupancy"] = round(0.1 + 0.01 * r["step"], 4)
    d = tmp_path / "sync"
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    p = parse(write_report(d))
    tl = p.charts["timeline"]
    gen = [(float(a["data-x"]), float(a["data-x2"])) for a in tl if a["data-lane"] == "generation"]
    train = [(float(a["data-x"]), float(a["data-x2"])) for a in tl if a["data-series"] in ("train", "proximal")]
    assert gen == [tuple(r["gen_spans"][0]) for r in recs] and len(train) == 2 * N
    assert not any(a < d and c < b for a, b in gen for c, d in train)
    assert not [a for a in tl if a["data-lane"].startswith("rollout")]  # the step-resolution guess is gone
    assert [y for _, y in series(p, "slots")] == [r["rollout_slot_occupancy"] for r in recs]
    mean = sum(r["rollout_slot_occupancy"] for r in recs) / N
    assert f"{mean:.0%}" in " ".join(p.text) and "rollout slot occupancy" in " ".join(p.text)


def test_controller_counters_of_the_last_step_are_tabled(tmp_path: Path) -> None:
    """The `ctrl_*` keys of the last record, counters the record type does not know included, in file order."""
    recs = synthetic_records(3)
    recs[-1]["ctrl_a_newer_counter"] = 5
    d = tmp_path / "ctrl"
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    html = write_report(d).read_text()
    table = html[html.index('<table class="ctrl">'):]
    table = table[:table.index("</table>")]
    assert re.findall(r"<th>(\w+)</th><td>(\w+)</td>", table) == [
        ("ctrl_accepted", "96"), ("ctrl_dropped_stale", "0"), ("ctrl_a_newer_counter", "5")]


def test_empty_and_partial_metrics(tmp_path: Path) -> None:
    d = tmp_path / "fresh"
    d.mkdir()
    p = parse(write_report(d))  # no metrics.jsonl at all
    assert "no steps yet" in " ".join(p.text) and not p.charts
    (d / "metrics.jsonl").write_text("")
    assert "no steps yet" in write_report(d).read_text()
    rec = synthetic_records(2)
    (d / "metrics.jsonl").write_text(json.dumps(rec[0]) + "\n" + json.dumps(rec[1])[:40])  # line being written
    p = parse(write_report(d))
    assert "no steps yet" not in " ".join(p.text)
    assert series(p, "reward") == [(1.0, rec[0]["reward_mean"])]
    rec[0]["scored_reward_mean"] = 0.9  # DAPO-style run: both reward lines, each from its own field
    (d / "metrics.jsonl").write_text(json.dumps(rec[0]) + "\n")
    p = parse(write_report(d))
    assert series(p, "reward", "reward_mean") == [(1.0, rec[0]["reward_mean"])]
    assert series(p, "reward", "scored_reward_mean") == [(1.0, 0.9)]
    assert series(p, "throughput") == []  # one step: no rate yet, chart says "no data"


def test_cli(run_dir: Path) -> None:
    (run_dir / "report.html").unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-m", "areal_py.telemetry.report", str(run_dir)], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == run_dir / "report.html" and (run_dir / "report.html").exists()


def test_chart_functions_are_pure_svg() -> None:
    svg = charts.line_chart([charts.Series("a", [(0, 1), (1, float("nan")), (2, 3)])], chart_id="c", title="t<",
                            x_label="x", y_label="y")
    assert svg.startswith("<svg") and svg.endswith("</svg>") and "t&lt;" in svg
    assert svg.count('class="pt"') == 2
    assert "no data" in charts.bar_chart([], chart_id="b", title="t", x_label="x", y_label="y")
    assert [round(t, 9) for t in charts.nice_ticks(0, 1)] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed here (shutil.which('chromium') is None); "
                           "the headless screenshot check needs it")
def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    report = write_report(run_dir)
    png = tmp_path / "report.png"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={png}", "--window-size=1200,2000", report.resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    assert png.exists() and png.stat().st_size > 20_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("lo,hi,n,want", [
    (101.6, 102.4, 5, ["101.6", "101.8", "102.0", "102.2", "102.4"]),  # fmt's 3 digits read 102, 102, 102
    (1000, 1003, 5, ["1000", "1001", "1002", "1003"]),  # fmt reads 1k, 1k, 1k, 1k
    (1000, 1003, 12, ["1000.00", "1000.25", "1000.50", "1000.75", "1001.00", "1001.25", "1001.50", "1001.75",
                      "1002.00", "1002.25", "1002.50", "1002.75", "1003.00"]),
    (0, 5000, 5, ["0", "1k", "2k", "3k", "4k", "5k"]),  # k only where it drops no digit
    (0, 5000, 12, ["0", "500", "1000", "1500", "2000", "2500", "3000", "3500", "4000", "4500", "5000"]),
    (0, 1, 5, ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]),
    (-0.3, 0.3, 12, ["-0.30", "-0.25", "-0.20", "-0.15", "-0.10", "-0.05", "0.00", "0.05", "0.10", "0.15", "0.20",
                     "0.25", "0.30"]),
    (0, 7.5e6, 5, ["0", "2M", "4M", "6M"]),
    (0, 2.5e-5, 5, ["0", "1e-05", "2e-05"]),
    (3e9, 3.5e9, 5, ["3.0e+09", "3.1e+09", "3.2e+09", "3.3e+09", "3.4e+09", "3.5e+09"]),
])
def test_tick_labels_are_distinct_and_as_precise_as_the_step(lo: float, hi: float, n: int, want: list[str]) -> None:
    labels = charts.tick_labels(charts.nice_ticks(lo, hi, n=n))
    assert labels == want
    assert len(set(labels)) == len(labels)


def test_zoomed_timeline_late_in_a_run_has_distinct_tick_labels(tmp_path: Path) -> None:
    """The last-12-steps timeline of a run past 1000 s: its ticks are ~1 s apart and must not all read "1k"."""
    recs = synthetic_records(40)
    for r in recs:
        r["wall_time_s"] += 1000.0
    d = tmp_path / "late"
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    html = write_report(d).read_text()
    svg = html[html.index('data-chart="timeline_zoom"'):]
    svg = svg[:svg.index("</svg>")]
    labels = re.findall(r'stroke="#eee"/><text[^>]*>([^<]*)</text>', svg)  # each grid line's label
    assert len(labels) >= 5 and len(set(labels)) == len(labels), labels
    assert all(float(x) > 1000 for x in labels), labels


def sections(html: str) -> dict[str, str]:
    """chart id -> that section's note ("" when it has none), for every section of the page."""
    out = {}
    for m in re.finditer(r'<section class="[^"]*" id="sec-([^"]+)">(.*?)</section>', html, re.DOTALL):
        note = re.search(r'<p class="note" data-note="[^"]+">([^<]*)</p>', m.group(2))
        out[m.group(1)] = unescape(note.group(1)) if note else ""
    return out


def write_run(d: Path, recs: list[dict], config: str | None) -> Path:
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if config is not None:
        (d / "config.yaml").write_text(config)
    return write_report(d)


def test_stats_that_are_zero_by_construction_get_a_note_instead_of_a_flat_plot(tmp_path: Path) -> None:
    """The learner reports clip fraction, approx KL, entropy and value loss as 0.0 when nothing computes
    them; under the default config (grpo, entropy_coef 0, one update per batch) the page says why."""
    recs = synthetic_records()
    for r in recs:
        r.update(clip_fraction=0.0, approx_kl=0.0, entropy=0.0, value_loss=0.0)
    out = write_run(tmp_path / "default", recs, "run:\n  mode: async\n")  # the rest: the defaults
    html = out.read_text()
    p = parse(out)
    notes = sections(html)
    for key in ("clip_fraction", "approx_kl", "entropy", "value_loss"):
        assert key not in p.charts, key  # no empty plot
        assert notes[key], key
    assert "algo.entropy_coef is 0" in notes["entropy"]
    assert "algo.adv_estimator=gae" in notes["value_loss"] and "grpo" in notes["value_loss"]
    assert "trainer.ppo_minibatches=1" in notes["clip_fraction"]
    assert len(series(p, "loss")) == N and not notes["loss"] and not notes["grad_norm"]

    # a config under which they are computed: the same zeros are plotted, with no excuse made for them
    cfg = ("algo:\n  adv_estimator: gae\n  entropy_coef: 0.01\ntrainer:\n  ppo_minibatches: 2\n")
    p2 = parse(write_run(tmp_path / "computed", recs, cfg))
    for key in ("clip_fraction", "approx_kl", "entropy", "value_loss"):
        assert len(series(p2, key)) == N, key
    assert not any(sections((tmp_path / "computed" / "report.html").read_text()).values())

    # no config.yaml: nothing to explain with, the zeros are plotted as they are
    p3 = parse(write_run(tmp_path / "noconfig", recs, None))
    assert all(len(series(p3, k)) == N for k in ("clip_fraction", "approx_kl", "entropy", "value_loss"))


def test_clip_fraction_on_on_policy_steps_is_plotted_with_the_note(tmp_path: Path) -> None:
    """Steps trained only on current-version tokens give a small nonzero clip fraction even with one update
    per batch: the plot stays (it has data), with the note that says what the numbers mean."""
    recs = synthetic_records()
    for r in recs:
        r.update(clip_fraction=0.002 if r["step"] == 1 else 0.0, approx_kl=0.0, entropy=0.0)
    out = write_run(tmp_path / "r", recs, "run:\n  mode: async\n")
    p = parse(out)
    notes = sections(out.read_text())
    assert len(series(p, "clip_fraction")) == N and "staleness 0" in notes["clip_fraction"]
    assert "approx_kl" not in p.charts and notes["approx_kl"]
    assert "value_loss" not in p.charts and notes["value_loss"]  # absent from the records: the note alone


def test_equal_reward_lines_both_stay_visible(tmp_path: Path) -> None:
    """scored_reward_mean equals reward_mean when nothing is dropped: the top line is dashed with hollow
    markers in another color, so the one beneath still shows; the legend tells them apart the same way."""
    recs = synthetic_records()
    for r in recs:
        r["scored_reward_mean"] = r["reward_mean"]
    html = write_run(tmp_path / "r", recs, None).read_text()
    svg = html[html.index('data-chart="reward"'):]
    svg = svg[:svg.index("</svg>")]
    lines = {m.group(1): m.group(0) for m in re.finditer(r'<polyline class="line" data-series="([^"]+)"[^>]*/>', svg)}
    assert set(lines) == {"reward_mean", "scored_reward_mean"}
    assert svg.index('data-series="reward_mean"') < svg.index('data-series="scored_reward_mean"')  # drawn first
    color = {k: re.search(r'stroke="([^"]+)"', v).group(1) for k, v in lines.items()}
    assert color["reward_mean"] != color["scored_reward_mean"]
    assert "stroke-dasharray" in lines["scored_reward_mean"] and "stroke-dasharray" not in lines["reward_mean"]
    scored_pts = re.findall(r'<circle class="pt" data-series="scored_reward_mean"[^>]*>', svg)
    assert len(scored_pts) == N and all('fill="none"' in c for c in scored_pts)
    assert re.search(r'<line [^>]*stroke-dasharray[^>]*/><text [^>]*>scored_reward_mean</text>', svg)  # legend
