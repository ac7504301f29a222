"""`areal-py sweep KEY=v1,v2,...`: run a grid one run after another, compare, recommend.

Made for the staleness bound (`areal-py sweep max_staleness=0,1,2,4,8`), usable for any config key.
Every run gets the same config and overrides except the swept key; each is summarised by
`areal_py.run_stats`, then a table, `sweep.json` and `sweep.html` (throughput and final reward per
value) are written next to the runs, and a value is recommended:

    the largest value whose final reward is within `tolerance` of the baseline run's,

where the baseline is the value 0 for `controller.max_staleness` (on-policy) and otherwise the
first value listed. For staleness that is the loosest bound that does not cost reward.
"""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from areal_py.charts import Series, line_chart
from areal_py.config import Config, ConfigError, load_config
from areal_py.run_stats import RunSummary, summarize_run

QUICK = ["trainer.total_steps=30", "controller.batch_size=16", "trainer.checkpoint_every=0"]


def leaf_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every settable dotted key of the config tree."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += leaf_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def resolve_key(key: str) -> str:
    """A full dotted key as given, or the unique key whose last part is `key`."""
    keys = leaf_keys()
    if key in keys:
        return key
    matches = [k for k in keys if k.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"sweep key '{key}' is ambiguous: {', '.join(matches)}")
    raise ConfigError(f"unknown sweep key '{key}'; valid keys: {', '.join(keys)}")


def parse_grid(spec: str) -> tuple[str, list[str]]:
    """'max_staleness=0,1,2' -> ('controller.max_staleness', ['0', '1', '2'])."""
    if "=" not in spec:
        raise ConfigError(f"sweep grid '{spec}' is not of the form key=v1,v2,...")
    key, values = spec.split("=", 1)
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if len(vals) < 2:
        raise ConfigError(f"sweep grid '{spec}' needs at least two values")
    if len(set(vals)) != len(vals):
        raise ConfigError(f"sweep grid '{spec}' repeats a value")
    return resolve_key(key.strip()), vals


def validate_grid(config: str | None, overrides: list[str], key: str, values: list[str]) -> list[Config]:
    """Every run's config, checked before the first run starts (a typo must not cost a whole sweep)."""
    return [load_config(config, [*overrides, f"{key}={v}"]) for v in values]


def _number(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None


@dataclass(frozen=True)
class Recommendation:
    value: str
    baseline: str
    baseline_reward: float
    tolerance: float
    within: list[str]
    fastest_within: str

    def text(self, key: str, summaries: dict[str, RunSummary]) -> str:
        r, f = summaries[self.value], summaries[self.fastest_within]
        return (f"recommended {key}={self.value}: final reward {r.reward_final:.3f} is within {self.tolerance} of "
                f"the baseline {key}={self.baseline} ({self.baseline_reward:.3f}); {r.samples_per_s:.1f} samples/s. "
                f"Values within tolerance: {', '.join(self.within)}; the fastest of them is "
                f"{key}={self.fastest_within} ({f.samples_per_s:.1f} samples/s).")


def recommend(key: str, summaries: dict[str, RunSummary], tolerance: float) -> Recommendation | None:
    """The largest value (numeric order if all values are numbers, else as listed) whose final reward is
    at least the baseline's minus `tolerance`. None if the baseline run failed."""
    values = list(summaries)
    if not values:
        return None
    baseline = "0" if key == "controller.max_staleness" and "0" in summaries else values[0]
    if baseline not in summaries:
        return None
    base = summaries[baseline].reward_final
    within = [v for v in values if summaries[v].reward_final >= base - tolerance]
    nums = [_number(v) for v in within]
    if all(n is not None for n in nums):
        within = [v for _, v in sorted(zip(nums, within))]
    fastest = max(within, key=lambda v: summaries[v].samples_per_s)
    return Recommendation(within[-1], baseline, base, tolerance, within, fastest)


COLUMNS = ("value", "samples/s", "busy", "slots", "final reward", "to threshold", "max stale", "dropped")


def table_rows(key: str, values: list[str], summaries: dict[str, RunSummary], failed: dict[str, str]) -> list[list[str]]:
    rows = []
    for v in values:
        s = summaries.get(v)
        if s is None:
            rows.append([f"{key}={v}", "failed", "", "", "", "", "", failed.get(v, "")[:40]])
            continue
        rows.append([f"{key}={v}", f"{s.samples_per_s:.1f}", f"{s.trainer_busy:.2f}",
                     "-" if s.slot_occupancy is None else f"{s.slot_occupancy:.2f}", f"{s.reward_final:.3f}",
                     "-" if s.time_to_threshold_s is None else f"{s.time_to_threshold_s:.0f} s",
                     str(s.staleness_max), str(s.dropped_stale)])
    return rows


def render_table(rows: list[list[str]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    line = "  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths))
    return "\n".join([line, *("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)])


def render_html(key: str, values: list[str], summaries: dict[str, RunSummary], table: str, advice: str) -> str:
    """Self-contained page: throughput and final reward against the swept value (x = position if not numeric)."""
    xs = {v: (_number(v) if all(_number(u) is not None for u in values) else float(i)) for i, v in enumerate(values)}
    ok = [v for v in values if v in summaries]
    tput = line_chart([Series("samples/s", [(xs[v], summaries[v].samples_per_s) for v in ok])],
                      chart_id="throughput", title="Trained samples per second", x_label=key, y_label="samples/s",
                      y_min=0.0)
    reward = line_chart([Series("final reward", [(xs[v], summaries[v].reward_final) for v in ok])],
                        chart_id="reward", title="Final reward", x_label=key, y_label="reward")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>sweep {escape(key)}</title>"
            f"<style>body{{font-family:sans-serif;margin:2em}} pre{{background:#f6f6f6;padding:1em}}</style>"
            f"</head><body><h1>Sweep over {escape(key)}</h1>{tput}{reward}<pre>{escape(table)}</pre>"
            f"<p>{escape(advice)}</p></body></html>")


def run_sweep(grid: str, config: str | None, overrides: list[str], *, quick: bool = False, tolerance: float = 0.05,
              threshold: float | None = None, name: str = "", quiet: bool = True) -> int:
    from areal_py.launcher import run  # heavy imports only once the grid is known good

    key, values = parse_grid(grid)
    overrides = [*(QUICK if quick else []), *overrides]
    cfgs = validate_grid(config, overrides, key, values)
    name = name or _dt.datetime.now().strftime("sweep-%Y%m%d-%H%M%S")
    out = Path(cfgs[0].run.output_dir).expanduser() / name
    leaf = key.rsplit(".", 1)[-1]
    print(f"areal-py sweep: {key} over {values} -> {out}")
    summaries: dict[str, RunSummary] = {}
    failed: dict[str, str] = {}
    for v in values:
        code = run(config, [*overrides, f"{key}={v}", f"run.output_dir={out}", f"run.name={leaf}-{v}"],
                   quiet=quiet)
        if code == 130:
            print("areal-py sweep: interrupted; later values not run")
            failed[v] = "interrupted"
            break
        try:
            if code != 0:
                raise RuntimeError(f"exit code {code}")
            summaries[v] = summarize_run(out / f"{leaf}-{v}", threshold)
        except (RuntimeError, FileNotFoundError, ValueError) as e:
            failed[v] = str(e)
            print(f"areal-py sweep: {key}={v} failed ({e}); going on with the next value")
    rows = table_rows(key, values, summaries, failed)
    table = render_table(rows)
    rec = recommend(key, summaries, tolerance)
    advice = rec.text(key, summaries) if rec else "no recommendation: the baseline run did not finish"
    print("\n" + table + "\n\n" + advice)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"key": key, "values": values, "overrides": overrides, "tolerance": tolerance,
                              "threshold": threshold, "runs": {v: s.to_dict() for v, s in summaries.items()},
                              "failed": failed, "recommendation": None if rec is None else rec.__dict__,
                              "advice": advice}
    (out / "sweep.json").write_text(json.dumps(report, indent=1))
    (out / "sweep.html").write_text(render_html(key, values, summaries, table, advice))
    print(f"areal-py sweep: wrote {out / 'sweep.json'} and {out / 'sweep.html'}")
    return 0 if summaries and not failed else 1
