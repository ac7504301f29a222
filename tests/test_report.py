"""report.html from a synthetic metrics.jsonl: every chart is there and holds the input's numbers."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from areal_py import charts
from areal_py.report import RATE_WINDOW, ZOOM_STEPS, write_report

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
    r = subprocess.run([sys.executable, "-m", "areal_py.report", str(run_dir)], capture_output=True, text=True,
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
