"""The report of an offline post-training run (`areal-py sft`, `rm`, `dpo`): ``metrics.jsonl`` -> ``report.html``.

The same kind of page as an RL run's (``areal_py.telemetry.report``: one self-contained file, inline CSS and SVG,
the config table), drawn from the offline records: ``kind: train`` (one per optimiser step) and ``kind: eval``
(held-out, before training and after each epoch). The summary table gives every held-out number before and after;
the charts are the training loss per step and each held-out number per step. Only numeric fields are drawn;
records of other kinds are ignored.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from html import escape
from pathlib import Path

from areal_py.telemetry.charts import Series, fmt, line_chart
from areal_py.telemetry.metrics import read_jsonl
from areal_py.telemetry.report import CSS, load_config_rows

SKIP = {"kind", "step", "epoch", "wall_time_s"}


def _numeric(rec: dict, key: str) -> float | None:
    v = rec.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def eval_keys(evals: Sequence[dict]) -> list[str]:
    """The numeric held-out fields, in first-seen order."""
    keys: list[str] = []
    for r in evals:
        keys += [k for k in r if k not in SKIP and k not in keys and _numeric(r, k) is not None]
    return keys


def summary_rows(train: Sequence[dict], evals: Sequence[dict]) -> list[tuple[str, str]]:
    """(name, value) rows: steps, epochs, wall time, and each held-out number as ``first -> last``."""
    rows = [("optimiser steps", str(train[-1]["step"]) if train else "0"),
            ("epochs evaluated", str(evals[-1]["epoch"]) if evals else "0")]
    last = (train or evals)[-1] if (train or evals) else None
    if last is not None and _numeric(last, "wall_time_s") is not None:
        rows.append(("wall time", f"{last['wall_time_s']:.0f} s"))
    for k in eval_keys(evals):
        first, end = _numeric(evals[0], k), _numeric(evals[-1], k)
        before = f"{'-' if first is None else fmt(first)} (step {evals[0]['step']})"
        after = f"{'-' if end is None else fmt(end)} (step {evals[-1]['step']})"
        rows.append((f"held-out {k}", f"{before} -> {after}"))
    return rows


def render_offline_html(run_name: str, command: str, records: Sequence[dict],
                        config_rows: Sequence[tuple[str, str]] | None) -> str:
    """The page of an offline run named `run_name` trained by `command` (sft, rm, dpo)."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in summary_rows(train, evals))
    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
             f"<title>areal-py {escape(command)} {escape(run_name)}</title><style>{CSS}</style></head><body>",
             f'<h1>{escape(command)} run <span id="run-name">{escape(run_name)}</span></h1>',
             f'<table class="summary">{body}</table>']
    if not train and not evals:
        parts.append('<p class="empty" id="no-steps">no records yet: metrics.jsonl is empty.</p>')
    charts = []
    if train:
        charts.append(("train-loss", "Training loss", "the mean loss of each optimiser step's batch",
                       line_chart([Series("loss", [(r["step"], _numeric(r, "loss") or math.nan) for r in train])],
                                  chart_id="train-loss", title="loss", x_label="step", y_label="loss",
                                  markers=len(train) <= 200)))
    for k in eval_keys(evals):
        pts = [(r["step"], v) for r in evals if (v := _numeric(r, k)) is not None]
        charts.append((f"eval-{k}", f"Held-out {k}", "before training (step 0) and after each epoch",
                       line_chart([Series(k, pts)], chart_id=f"eval-{k}", title=k, x_label="step", y_label=k)))
    if charts:
        parts.append('<div class="grid">')
        parts += [f'<section class="sec" id="sec-{escape(cid)}"><h2>{escape(t)}</h2><p>{escape(cap)}</p>{svg}'
                  f"</section>" for cid, t, cap, svg in charts]
        parts.append("</div>")
    if config_rows is not None:
        table = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in config_rows)
        parts.append(f'<details open><summary>config.yaml</summary><table class="config">{table}</table></details>')
    parts.append("</body></html>")
    return "\n".join(parts)


def write_offline_report(run_dir: Path, command: str) -> Path:
    """Write ``<run_dir>/report.html`` from its metrics.jsonl and config.yaml (atomically: temp file, rename)."""
    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    out = run_dir / "report.html"
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    tmp.write_text(render_offline_html(run_dir.name, command, records, load_config_rows(run_dir / "config.yaml")),
                   encoding="utf-8")
    tmp.replace(out)
    return out
