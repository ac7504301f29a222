"""What `areal-py sweep` shows: the text table, the self-contained HTML page and the optional PNG.

Kept apart from the sweep's control flow so the rendering is testable on synthetic summaries.
"""
from __future__ import annotations

from html import escape
from pathlib import Path

from areal_py.app.sweep_rule import Recommendation, number
from areal_py.telemetry.charts import Series, line_chart
from areal_py.telemetry.run_summary import RunSummary

# After the swept key's column; tokens/s next to samples/s because a run can train more, shorter samples.
COLUMNS = ("samples/s", "tokens/s", "trainer busy", "slot occupancy", "final reward", "to threshold", "max stale",
           "stale drops", "note")


def _note(v: str, rec: Recommendation | None) -> str:
    if rec is None:
        return ""
    tags = [t for t, hit in [("baseline", v == rec.baseline), ("recommended", v == rec.value),
                             ("fastest within tolerance", v == rec.fastest_within)] if hit]
    return ", ".join(tags) if tags else ("" if v in rec.within else "outside tolerance")


def table_rows(values: list[str], summaries: dict[str, RunSummary], failed: dict[str, str],
               rec: Recommendation | None = None) -> list[list[str]]:
    """One row per value as listed; a run without a summary shows why (failed, interrupted, not run)."""
    rows = []
    for v in values:
        s = summaries.get(v)
        if s is None:
            why = failed.get(v, "not run")
            status = why if why in ("interrupted", "not run") else "failed"
            rows.append([v, status, "", "", "", "", "", "", "",
                         "" if status != "failed" else why.splitlines()[0][:60]])
            continue
        rows.append([v, f"{s.samples_per_s:.1f}", f"{s.trained_tokens_per_s:.0f}", f"{s.trainer_busy:.2f}",
                     "-" if s.slot_occupancy is None else f"{s.slot_occupancy:.2f}",
                     f"{s.reward_final:.3f} ±{s.reward_final_sem:.3f}",
                     "-" if s.time_to_threshold_s is None else f"{s.time_to_threshold_s:.1f} s",
                     str(s.staleness_max), str(s.dropped_stale), _note(v, rec)])
    return rows


def render_table(key: str, rows: list[list[str]]) -> str:
    """Fixed-width text under a header naming the swept key: values left-aligned, numbers right-aligned."""
    header = (key, *COLUMNS)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(header)]

    def line(cells: list[str] | tuple[str, ...]) -> str:
        out = [cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:-1], widths[1:-1])), cells[-1]]
        return "  ".join(out).rstrip()
    return "\n".join([line(header), *(line(r) for r in rows)])


def _xs(values: list[str]) -> dict[str, float]:
    """Numeric values on their own axis; anything else at its position in the grid."""
    nums = [number(v) for v in values]
    if all(n is not None for n in nums):
        return dict(zip(values, nums))  # type: ignore[arg-type]
    return {v: float(i) for i, v in enumerate(values)}


def render_html(key: str, values: list[str], summaries: dict[str, RunSummary], table: str, advice: str,
                rec: Recommendation | None = None) -> str:
    """Self-contained page: throughput and final reward against the swept value, the table and the advice."""
    xs, ok = _xs(values), [v for v in values if v in summaries]
    tput = line_chart([Series("samples/s", [(xs[v], summaries[v].samples_per_s) for v in ok])],
                      chart_id="throughput", title="Trained samples per second", x_label=key, y_label="samples/s",
                      y_min=0.0)
    reward_series = [Series("final reward", [(xs[v], summaries[v].reward_final) for v in ok])]
    if rec is not None and ok:  # the bar the recommendation applies, as a flat line across the grid
        bar = rec.baseline_reward - rec.tolerance
        reward_series.append(Series("baseline - tolerance", [(min(xs[v] for v in ok), bar),
                                                             (max(xs[v] for v in ok), bar)], color="#888888"))
    reward = line_chart(reward_series, chart_id="reward", title="Final reward (mean of the last window)",
                        x_label=key, y_label="reward")
    axis = "" if all(number(v) is not None for v in values) else \
        "<p>x axis: " + ", ".join(f"{xs[v]:g} = {escape(v)}" for v in values) + "</p>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>sweep {escape(key)}</title>"
            f"<style>body{{font-family:sans-serif;margin:2em}} pre{{background:#f6f6f6;padding:1em}}</style>"
            f"</head><body><h1>Sweep over {escape(key)}</h1>{tput}{reward}{axis}<pre>{escape(table)}</pre>"
            f"<pre>{escape(advice)}</pre></body></html>")


def write_png(path: Path, key: str, values: list[str], summaries: dict[str, RunSummary],
              rec: Recommendation | None = None) -> Path | None:
    """The same two plots as a PNG, only if matplotlib is installed (it is not a dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    xs, ok = _xs(values), [v for v in values if v in summaries]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([xs[v] for v in ok], [summaries[v].samples_per_s for v in ok], "o-")
    a.set(title="Trained samples per second", xlabel=key, ylabel="samples/s", ylim=(0, None))
    b.errorbar([xs[v] for v in ok], [summaries[v].reward_final for v in ok],
               yerr=[summaries[v].reward_final_sem for v in ok], fmt="o-", capsize=3, label="final reward")
    if rec is not None:
        b.axhline(rec.baseline_reward - rec.tolerance, color="grey", ls="--", label="baseline - tolerance")
        b.legend()
    b.set(title="Final reward (± standard error)", xlabel=key, ylabel="reward")
    for ax in (a, b):
        ax.set_xticks([xs[v] for v in values], values)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
