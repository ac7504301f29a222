"""End-of-run report: ``<run_dir>/metrics.jsonl`` (+ ``config.yaml``) -> ``<run_dir>/report.html``.

One self-contained page (inline CSS and SVG, no scripts, no network). This module renders the page;
the numbers come from ``report_data`` and the charts from ``report_sections``, which the live
dashboard uses as well. Command line: ``python -m areal_py.telemetry.report <run_dir>``.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import yaml

from areal_py.config import TrainerConfig
from areal_py.telemetry.report_data import (
    RATE_WINDOW,
    busy_fraction,
    cumulative_rate,
    load_records,
    staleness_histogram,
    step_series,
    summary,
    timeline_lanes,
)
from areal_py.telemetry.report_sections import ZOOM_STEPS, Section, chart_sections, not_computed
from areal_py.telemetry.skips import signal_summary, skip_counts
from areal_py.telemetry.step_record import StepRecord

__all__ = [
    "RATE_WINDOW",
    "ZOOM_STEPS",
    "Section",
    "busy_fraction",
    "chart_sections",
    "config_mapping",
    "cumulative_rate",
    "load_config_rows",
    "load_records",
    "main",
    "not_computed",
    "render_html",
    "skipped_html",
    "staleness_histogram",
    "step_series",
    "summary",
    "timeline_lanes",
    "write_report",
]


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


def load_config_rows(path: Path) -> list[tuple[str, str]] | None:
    """config.yaml flattened to (dotted key, value) rows for the page's table; None when there is none."""
    if not path.exists():
        return None
    try:
        return _flatten(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, OSError) as e:
        return [("(unreadable)", str(e))]


def config_mapping(path: Path) -> Mapping[str, Any] | None:
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
#skipped p.warn{font-size:13px;color:#fff;background:#b3261e;padding:6px 8px;border-radius:3px}
#skipped p.note{font-size:12px;color:#7a5a00;background:#fff8e1;padding:4px 6px;border-radius:3px}
details{margin-top:12px}
"""


def _warn_limit(config: Mapping[str, Any] | None) -> int:
    """trainer.warn_uninformative_steps of the run's config, or its default."""
    sec = (config or {}).get("trainer")
    v = sec.get("warn_uninformative_steps") if isinstance(sec, Mapping) else None
    return v if isinstance(v, int) and not isinstance(v, bool) else TrainerConfig().warn_uninformative_steps


def skipped_html(records: Sequence[StepRecord], config: Mapping[str, Any] | None = None) -> str:
    """The "Skipped" table (every reason of ``skips.SKIP_REASONS`` with its count, "not recorded" for a run
    whose records lack it), always shown; and a warning when steps trained no informative sample for
    trainer.warn_uninformative_steps in a row."""
    rows = skip_counts(records)
    total = sum(c.count or 0 for c in rows)
    body = "".join(f'<tr data-reason="{escape(c.reason)}"><th>{escape(c.reason)}</th>'
                   f'<td class="count">{"not recorded" if c.count is None else f"{c.count:,}"}</td>'
                   f"<td>{escape(c.unit)}</td><td>{escape(c.what)}</td></tr>" for c in rows)
    head = f"<h2>Skipped: {total:,} item(s)</h2>" if total else "<h2>Skipped: nothing</h2>"
    out = f'<section id="skipped">{head}<table class="skipped">{body}</table>'
    sig, limit = signal_summary(records), _warn_limit(config)
    if sig is not None and sig.without:
        loud = limit > 0 and sig.longest >= limit
        text = (f"{sig.without} of {sig.steps} steps trained no informative sample (every group's rewards equal: "
                f"zero advantage, nothing learned); longest stretch {sig.longest} in a row"
                + (f", at or past trainer.warn_uninformative_steps={limit}: check the reward and the task."
                   if loud else "."))
        out += f'<p class="{"warn" if loud else "note"}" id="uninformative">{escape(text)}</p>'
    return out + "</section>"


def render_html(run_name: str, records: Sequence[StepRecord], config_rows: Sequence[tuple[str, str]] | None,
                config: Mapping[str, Any] | None = None) -> str:
    """The report page. ``config_rows`` fill the config table; ``config`` (the same file as a
    mapping) lets the charts explain series that are 0 by construction."""
    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
             f"<title>areal-py run {escape(run_name)}</title><style>{CSS}</style></head><body>",
             f"<h1>Run <span id=\"run-name\">{escape(run_name)}</span></h1>",
             _table(summary(records), "summary"), skipped_html(records, config)]
    ctrl = [(f"ctrl_{k}", str(v)) for k, v in records[-1].controller.items()] if records else []
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
    tmp.write_text(render_html(run_dir.name, records, load_config_rows(cfg), config_mapping(cfg)), encoding="utf-8")
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
