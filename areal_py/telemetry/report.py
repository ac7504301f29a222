"""End-of-run report: ``<run_dir>/metrics.jsonl`` (+ ``config.yaml``) -> ``<run_dir>/report.html``.

One self-contained page (inline CSS and SVG, no scripts, no network). The series derivation
(``chart_sections``) is separate from the page so a live dashboard can redraw the same charts
from the same records. Command line: ``python -m areal_py.telemetry.report <run_dir>``.
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import yaml

from areal_py.config import AlgoConfig, TrainerConfig
from areal_py.telemetry.charts import (
    PALETTE,
    Segment,
    Series,
    bar_chart,
    line_chart,
    timeline_chart,
)
from areal_py.telemetry.gen_activity import merge_spans
from areal_py.telemetry.metrics import read_jsonl

__all__ = [
    "Section",
    "busy_fraction",
    "chart_sections",
    "cumulative_rate",
    "load_records",
    "main",
    "not_computed",
    "render_html",
    "staleness_histogram",
    "step_series",
    "summary",
    "timeline_lanes",
    "write_report",
]

Record = dict[str, Any]
ZOOM_STEPS = 12  # steps in the zoomed-in timeline
RATE_WINDOW = 3  # rates are taken over this many step intervals: light smoothing that keeps units exact
PHASE_COLORS = {"wait": "#cfcfcf", "proximal": "#9467bd", "train": "#1f77b4", "publish": "#d62728",
                "generating": "#2ca02c"}
TRAIN_STATS = [("loss", "loss"), ("clip_fraction", "clip fraction"), ("grad_norm", "grad norm"),
               ("approx_kl", "approx KL"), ("entropy", "entropy"), ("value_loss", "value loss")]


@dataclass(frozen=True)
class Section:
    """One chart of the page. ``note`` is a remark on this run's data (e.g. why a series is all
    zero); a section whose plot would say nothing has a note and ``svg == ""``."""
    chart_id: str
    title: str
    caption: str
    svg: str
    wide: bool = False
    note: str = ""


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def load_records(path: Path) -> list[Record]:
    """The step records of a metrics file, in file order; anything that is not a step object is skipped."""
    return [r for r in read_jsonl(path) if isinstance(r, dict) and _num(r.get("step")) is not None]


def step_series(records: Sequence[Record], key: str) -> list[tuple[float, float]]:
    """(step, value) for every record that has a finite number under ``key``."""
    out = []
    for r in records:
        v = _num(r.get(key))
        if v is not None:
            out.append((float(r["step"]), v))
    return out


def _timed(records: Sequence[Record], key: str) -> list[tuple[float, float]]:
    out = []
    for r in records:
        t, c = _num(r.get("wall_time_s")), _num(r.get(key))
        if t is not None and c is not None:
            out.append((t, c))
    return out


def cumulative_rate(records: Sequence[Record], key: str, window: int = RATE_WINDOW) -> list[tuple[float, float]]:
    """Per-second rate of a cumulative counter: at each step i >= 1, (c_i - c_j) / (t_i - t_j) with
    j = max(0, i - window). Points where time does not advance or the counter went back
    (a restart that reset it) are left out."""
    pts = _timed(records, key)
    out = []
    for i in range(1, len(pts)):
        (t0, c0), (t1, c1) = pts[max(0, i - window)], pts[i]
        if t1 > t0 and c1 >= c0:
            out.append((t1, (c1 - c0) / (t1 - t0)))
    return out


def busy_fraction(records: Sequence[Record]) -> list[tuple[float, float]]:
    """Trainer busy fraction per step: train_s / (time since the previous step), clipped to [0, 1].
    The first step's interval is its own wait + train + publish."""
    out, prev = [], None
    for r in records:
        t, train = _num(r.get("wall_time_s")), _num(r.get("train_s"))
        if t is None or train is None:
            continue
        if prev is None:
            interval = sum(_num(r.get(k)) or 0.0 for k in ("wait_s", "train_s", "publish_s"))
        else:
            interval = t - prev
        prev = t
        if interval > 0:
            out.append((t, min(1.0, max(0.0, train / interval))))
    return out


def staleness_histogram(records: Sequence[Record]) -> dict[int, int]:
    """Sample staleness (in policy versions) summed over all steps: {staleness: samples}."""
    total: dict[int, int] = {}
    for r in records:
        hist = r.get("sample_staleness_hist")
        if not isinstance(hist, dict):
            continue
        for k, v in hist.items():
            try:
                total[int(k)] = total.get(int(k), 0) + int(v)
            except (TypeError, ValueError):
                continue
    return dict(sorted(total.items()))


def _rollout_counters(records: Sequence[Record]) -> dict[str, list[tuple[float, float]]]:
    """Cumulative generated tokens per server (``server_generated_tokens``), or the run total."""
    servers = sorted({s for r in records if isinstance(r.get("server_generated_tokens"), dict)
                      for s in r["server_generated_tokens"]})
    if not servers:
        return {"rollout": _timed(records, "generated_tokens")}
    out: dict[str, list[tuple[float, float]]] = {}
    for s in servers:
        pts = []
        for r in records:
            t, c = _num(r.get("wall_time_s")), _num((r.get("server_generated_tokens") or {}).get(s))
            if t is not None and c is not None:
                pts.append((t, c))
        out[s if s.startswith("rollout") else f"rollout {s}"] = pts
    return out


def timeline_lanes(records: Sequence[Record], last: int | None = None) -> list[tuple[str, list[Segment]]]:
    """A trainer lane (wait, proximal recompute, rest of training, publish, laid back from each
    step's end time) and the generation: one lane of the servers' measured busy spans (``gen_spans``)
    when the records have them; for older metrics files, one lane per rollout server whose bars span
    each step interval, shaded by the generation rate in it (value = tokens generated in the
    interval). ``last``: only the segments of the last that many steps."""
    trainer: list[Segment] = []
    for r in records:
        end = _num(r.get("wall_time_s"))
        if end is None:
            continue
        wait, train, pub = (_num(r.get(k)) or 0.0 for k in ("wait_s", "train_s", "publish_s"))
        prox = min(train, _num(r.get("prox_time_s")) or 0.0)
        t_pub = end - pub
        t_train = t_pub - train
        trainer.append(Segment(t_train - wait, t_train, "wait", wait))
        if prox > 0:
            trainer.append(Segment(t_train, t_train + prox, "proximal", prox))
        trainer.append(Segment(t_train + prox, t_pub, "train", train - prox))
        trainer.append(Segment(t_pub, end, "publish", pub))
    lanes: list[tuple[str, list[Segment]]] = [("trainer", trainer)]
    if any("gen_spans" in r for r in records):  # measured by the servers: draw what really happened
        spans = merge_spans(((a, b) for r in records for a, b in (r.get("gen_spans") or [])), max_spans=10**6)
        lanes.append(("generation", [Segment(a, b, "generating", b - a) for a, b in spans]))
        return _cut(lanes, records, last)
    start = min((s.start for s in trainer), default=0.0)
    for name, pts in _rollout_counters(records).items():
        raw = []
        for i, (t1, c1) in enumerate(pts):
            t0, c0 = pts[i - 1] if i else (min(start, t1), 0.0)
            if t1 > t0 and c1 > c0:
                raw.append((t0, t1, c1 - c0))
        peak = max(((n / (b - a)) for a, b, n in raw), default=1.0) or 1.0
        lanes.append((name, [Segment(a, b, "generating", n, (n / (b - a)) / peak) for a, b, n in raw]))
    return _cut(lanes, records, last)


def _cut(lanes: list[tuple[str, list[Segment]]], records: Sequence[Record],
         last: int | None) -> list[tuple[str, list[Segment]]]:
    """Only the segments of the last `last` steps (None: all)."""
    if last is not None and len(records) > last:
        cut = _num(records[-last - 1].get("wall_time_s"))
        if cut is not None:
            lanes = [(name, [s for s in segs if s.end > cut]) for name, segs in lanes]
    return lanes


_DEFAULTS = {"algo": AlgoConfig, "trainer": TrainerConfig}


def _setting(config: Mapping[str, Any], section: str, key: str) -> Any:
    """``section.key`` from a run's config.yaml, or the default when the file does not hold it."""
    sec = config.get(section)
    if isinstance(sec, Mapping) and key in sec:
        return sec[key]
    return _DEFAULTS[section].model_fields[key].default


def not_computed(key: str, config: Mapping[str, Any] | None) -> str | None:
    """Why the trainer stat ``key`` is 0 on every step under ``config`` (None: it is computed, or
    there is no config to tell).

    The learner (trainer/learner.py) reports every stat on every step, as 0.0 when nothing computes
    it, so without this a flat zero line reads as a broken chart. The rules mirror the learner:
    entropy is computed only for the entropy bonus; value loss only with the critic that GAE
    trains; and with one update per batch the decoupled and GSPO losses take the proximal policy
    from the training forward itself, so the ratio to it is exactly 1 (no clipping, zero KL) except
    on steps whose every token comes from the trained version, where the behaviour logprobs stand
    in for the proximal ones and trainer/rollout numerics make the ratio differ slightly from 1."""
    if config is None:
        return None
    if key == "value_loss" and (est := _setting(config, "algo", "adv_estimator")) != "gae":
        return (f"Not computed in this run: a value loss needs a critic, which only algo.adv_estimator=gae "
                f"trains (this run: {est}).")
    if key == "entropy" and not _setting(config, "algo", "entropy_coef"):
        return ("Not computed in this run: the policy entropy is computed only for the entropy bonus, "
                "and algo.entropy_coef is 0.")
    if (key in ("clip_fraction", "approx_kl") and _setting(config, "algo", "loss") in ("decoupled", "gspo")
            and _setting(config, "algo", "prox_method") == "recompute"
            and _setting(config, "trainer", "ppo_minibatches") == 1):
        return ("With one update per batch (trainer.ppo_minibatches=1) the proximal policy is the policy being "
                "updated: on steps with stale tokens the ratio to it is exactly 1, so this is 0. Steps trained "
                "only on tokens of the current version (staleness 0; every step in sync mode) use the behaviour "
                "logprobs instead, and their values measure only the trainer's numerical difference from the "
                "rollout engine. A trust-region signal needs trainer.ppo_minibatches > 1.")
    return None


def chart_sections(records: Sequence[Record], config: Mapping[str, Any] | None = None) -> list[Section]:
    """Every chart of the report, drawn from step records (also usable by a live dashboard).

    ``config``: the run's config.yaml as a mapping, used only to explain series that are 0 by
    construction (``not_computed``); such a series gets that note instead of a flat plot."""
    secs: list[Section] = []
    gen, trained = cumulative_rate(records, "generated_tokens"), cumulative_rate(records, "trained_tokens_total")
    secs.append(Section("throughput", "Generated vs trained tokens/s", (
        f"Rates from the cumulative counters over {RATE_WINDOW} step intervals. Generated counts response "
        "tokens; trained counts every token of a trained batch (prompt + response)."),
        line_chart([Series("generated", gen, PALETTE[2]), Series("trained", trained, PALETTE[0])],
                   chart_id="throughput", title="tokens / s", x_label="wall time (s)", y_label="tokens/s", y_min=0.0)))
    busy = busy_fraction(records)
    secs.append(Section("busy", "Trainer busy fraction", "train_s / time since the previous step.",
                        line_chart([Series("busy", busy)], chart_id="busy", title="trainer busy fraction",
                                   x_label="wall time (s)", y_label="fraction", y_min=0.0, y_max=1.0)))
    secs.append(Section("timeline", "Timeline: trainer phases and generation", (
        "Trainer lane: each step's wait for data, proximal recompute, training and weight publish, laid back "
        "from its end time. Generation lane: the periods in which any rollout server had requests running, "
        "as the servers measured them (runs recorded before gen_spans existed show tokens generated between "
        "steps instead, at step resolution)."),
        timeline_chart(timeline_lanes(records), PHASE_COLORS, chart_id="timeline", title="whole run"), wide=True))
    if len(records) > 2 * ZOOM_STEPS:
        secs.append(Section("timeline_zoom", f"Timeline: last {ZOOM_STEPS} steps", "The same, zoomed in.",
                            timeline_chart(timeline_lanes(records, last=ZOOM_STEPS), PHASE_COLORS,
                                           chart_id="timeline_zoom", title=f"last {ZOOM_STEPS} steps"), wide=True))
    occ = step_series(records, "rollout_slot_occupancy")
    if occ:
        secs.append(Section("slots", "Rollout slot occupancy", (
            "Fraction of each live server's slots (rollout.max_running) holding a request since the previous "
            "step, averaged over servers; a step with no server heartbeat since the previous one has no point."),
            line_chart([Series("occupancy", occ, PALETTE[2])], chart_id="slots", title="slot occupancy",
                       x_label="step", y_label="fraction", y_min=0.0, y_max=1.0)))
    hist = staleness_histogram(records)
    secs.append(Section("staleness_hist", "Sample staleness distribution",
                        "Samples by staleness (policy versions between a sample's oldest token and the trained "
                        "policy), summed over all steps.",
                        bar_chart(list(hist.items()), chart_id="staleness_hist", title="sample staleness",
                                  x_label="staleness (versions)", y_label="samples", series="samples")))
    secs.append(Section("staleness", "Token staleness over steps", "Mean and max over each batch's trained tokens.",
                        line_chart([Series("mean", step_series(records, "staleness_mean")),
                                    Series("max", step_series(records, "staleness_max"))],
                                   chart_id="staleness", title="token staleness", x_label="step",
                                   y_label="versions", y_min=0.0)))
    rewards = [Series("reward_mean", step_series(records, "reward_mean"), PALETTE[0])]
    scored = step_series(records, "scored_reward_mean")
    if scored:  # differs from the batch's reward when dynamic sampling drops all-equal groups
        # often equal to reward_mean: drawn on top, dashed and hollow, so both lines stay visible
        rewards.append(Series("scored_reward_mean", scored, PALETTE[3], dash="5 3"))
    secs.append(Section("reward", "Reward", "Mean reward of each step's batch (`reward_mean`) and of everything "
                        "scored since the previous step, dropped groups included (`scored_reward_mean`, dashed; "
                        "equal to reward_mean when no group is dropped).",
                        line_chart(rewards, chart_id="reward", title="reward mean", x_label="step",
                                   y_label="reward")))
    for key, label in TRAIN_STATS:
        pts = step_series(records, key)
        why = not_computed(key, config)
        if why and all(v == 0 for _, v in pts):  # a flat zero (or no) line says nothing: say why instead
            secs.append(Section(key, label.capitalize(), f"`{key}` per step.", "", note=why))
        elif pts or key in ("loss", "clip_fraction", "grad_norm"):
            partial = why if why and key in ("clip_fraction", "approx_kl") else ""  # see not_computed
            secs.append(Section(key, label.capitalize(), f"`{key}` per step.",
                                line_chart([Series(key, pts)], chart_id=key, title=label, x_label="step",
                                           y_label=label), note=partial))
    secs.append(Section("publish", "Weight publish latency", "publish_s: time for the trainer to publish new weights.",
                        line_chart([Series("publish_s", step_series(records, "publish_s"), PALETTE[1])],
                                   chart_id="publish", title="weight publish latency", x_label="step",
                                   y_label="seconds", y_min=0.0)))
    return secs


def _mean(vals: Iterable[float]) -> float | None:
    vals = list(vals)
    return sum(vals) / len(vals) if vals else None


def summary(records: Sequence[Record]) -> list[tuple[str, str]]:
    """Headline numbers as (label, text) rows."""
    rewards = [v for _, v in step_series(records, "reward_mean")]
    walls = [v for _, v in _timed(records, "wall_time_s")] if records else []
    wall = walls[-1] if walls else None
    train_total = sum(v for _, v in step_series(records, "train_s"))
    first, last = _mean(rewards[:10]), _mean(rewards[-10:])
    stale = [v for _, v in step_series(records, "staleness_max")]
    rows = [("steps", f"{len(records)} (last step {int(records[-1]['step'])})" if records else "0"),
            ("wall time", f"{wall:.1f} s" if wall is not None else "-"),
            ("reward, first 10 → last 10 steps",
             f"{first:.3f} → {last:.3f}" if first is not None and last is not None else "-"),
            ("trainer busy (train_s / wall time)", f"{train_total / wall:.0%}" if wall else "-"),
            ("max token staleness seen", f"{int(max(stale))}" if stale else "-")]
    occ = [v for _, v in step_series(records, "rollout_slot_occupancy")]
    if occ:  # runs recorded before the servers measured it have none
        rows.append(("rollout slot occupancy, mean over steps", f"{sum(occ) / len(occ):.0%}"))
    if records:
        lr = records[-1]
        for key in ("generated_tokens", "trained_tokens_total"):
            if _num(lr.get(key)) is not None:
                rows.append((key, f"{int(lr[key]):,}"))
    return rows


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(d, dict) and d:
        out = []
        for k, v in d.items():
            out.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return [(prefix or "(config)", "null" if d is None else str(d))]


def _table(rows: Sequence[tuple[str, str]], cls: str) -> str:
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="{cls}">{body}</table>'


def _load_config(path: Path) -> list[tuple[str, str]] | None:
    if not path.exists():
        return None
    try:
        return _flatten(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, OSError) as e:
        return [("(unreadable)", str(e))]


def _config_mapping(path: Path) -> Mapping[str, Any] | None:
    """config.yaml as a mapping, or None when it is missing, unreadable or not a mapping."""
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError):
        return None
    return data if isinstance(data, Mapping) else None


CSS = """
body{font-family:sans-serif;margin:20px;color:#222;max-width:1180px}
h1{font-size:20px;margin:0 0 8px} h2{font-size:15px;margin:0 0 2px}
table{border-collapse:collapse;font-size:12px;margin:6px 0 14px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4;font-weight:normal}
.grid{display:flex;flex-wrap:wrap;gap:16px}
.sec{border:1px solid #e4e4e4;padding:8px;border-radius:4px}
.sec p{font-size:11px;color:#666;margin:0 0 4px;max-width:560px}
.sec.wide p{max-width:none}
.sec p.note{font-size:12px;color:#7a5a00;background:#fff8e1;padding:4px 6px;border-radius:3px;max-width:548px}
.empty{font-size:16px;color:#a33;padding:20px 0}
details{margin-top:12px}
"""


def render_html(run_name: str, records: Sequence[Record], config_rows: Sequence[tuple[str, str]] | None,
                config: Mapping[str, Any] | None = None) -> str:
    """The report page. ``config_rows`` fill the config table; ``config`` (the same file as a
    mapping) lets the charts explain series that are 0 by construction."""
    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
             f"<title>areal-py run {escape(run_name)}</title><style>{CSS}</style></head><body>",
             f"<h1>Run <span id=\"run-name\">{escape(run_name)}</span></h1>",
             _table(summary(records), "summary")]
    ctrl = [(k, str(v)) for k, v in (records[-1] if records else {}).items() if k.startswith("ctrl_")]
    if ctrl:
        parts.append("<details><summary>controller counters at the last step</summary>" + _table(ctrl, "ctrl")
                     + "</details>")
    if not records:
        parts.append('<p class="empty" id="no-steps">no steps yet: metrics.jsonl has no complete step record.</p>')
    else:
        parts.append('<div class="grid">')
        for s in chart_sections(records, config):
            note = f'<p class="note" data-note="{escape(s.chart_id)}">{escape(s.note)}</p>' if s.note else ""
            parts.append(f'<section class="sec{" wide" if s.wide else ""}" id="sec-{escape(s.chart_id)}">'
                         f"<h2>{escape(s.title)}</h2><p>{escape(s.caption)}</p>{note}{s.svg}</section>")
        parts.append("</div>")
    if config_rows is not None:
        parts.append("<details open><summary>config.yaml</summary>" + _table(config_rows, "config") + "</details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: Path) -> Path:
    """Write ``<run_dir>/report.html`` from the run's metrics.jsonl and config.yaml; return its path.

    Safe to call again and from several processes (the controller at the end of its serve, then the
    launcher): each writes its own temp file and renames it over the report, so a reader or a
    second writer never sees a half-written page."""
    run_dir = Path(run_dir)
    records = load_records(run_dir / "metrics.jsonl")
    out = run_dir / "report.html"
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    cfg = run_dir / "config.yaml"
    tmp.write_text(render_html(run_dir.name, records, _load_config(cfg), _config_mapping(cfg)), encoding="utf-8")
    tmp.replace(out)  # never leave a half-written report for a browser to open
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m areal_py.telemetry.report", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a run directory holding metrics.jsonl")
    args = ap.parse_args(argv)
    if not args.run_dir.is_dir():
        ap.error(f"{args.run_dir} is not a directory")
    print(write_report(args.run_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
