"""`areal-py sweep KEY=v1,v2,...`: run a grid one run after another, compare, recommend.

Made for the staleness bound (`areal-py sweep max_staleness=0,1,2,4,8`), usable for any config key.
Every run gets the same config and overrides except the swept key; each is summarised by
`areal_py.telemetry.run_summary`, then a table, `sweep.json` and `sweep.html` (+ `sweep.png` if matplotlib is
installed) are written next to the runs, and a value is recommended:

    the largest value whose final reward is within `tolerance` of the baseline run's,

where the baseline is the value 0 for `controller.max_staleness` (on-policy) and otherwise the first
value listed. For staleness that is the loosest bound that does not cost reward. Non-numeric values
have no "largest", so there the fastest value within tolerance is recommended.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from areal_py.app.sweep_report import (
    render_html,
    render_table,
    table_rows,
    write_png,
)
from areal_py.app.sweep_rule import baseline_of, recommend
from areal_py.config import Config, ConfigError, load_config
from areal_py.tasks.base import TaskConfig, task_names, task_spec
from areal_py.telemetry.run_summary import RunSummary, summarize_run

QUICK = ["trainer.total_steps=30", "controller.batch_size=16", "trainer.checkpoint_every=0"]
RESERVED = ("run.name", "run.output_dir")  # the sweep sets these per run


def leaf_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every settable dotted key of the config tree; the task section has every registered task's keys."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if ann is TaskConfig:
            task_keys = (k for t in task_names() for k in leaf_keys(task_spec(t).config, f"{prefix}{name}."))
            keys += dict.fromkeys(task_keys)  # one key per name, in order: tasks share `name`
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
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


def split_values(text: str) -> list[str]:
    """Comma-separated values; commas inside [...] or {...} belong to a YAML list/mapping value."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [v.strip() for v in [*out, cur] if v.strip()]


def parse_grid(spec: str) -> tuple[str, list[str]]:
    """'max_staleness=0,1,2' -> ('controller.max_staleness', ['0', '1', '2'])."""
    if "=" not in spec:
        raise ConfigError(f"sweep grid '{spec}' is not of the form key=v1,v2,...")
    key, values = spec.split("=", 1)
    vals = split_values(values)
    if len(vals) < 2:
        raise ConfigError(f"sweep grid '{spec}' needs at least two values")
    if len(set(vals)) != len(vals):
        raise ConfigError(f"sweep grid '{spec}' repeats a value")
    key = resolve_key(key.strip())
    if key in RESERVED:
        raise ConfigError(f"cannot sweep {key}: the sweep sets it for each run (use --name for the sweep directory)")
    return key, vals


def sweep_overrides(key: str, overrides: list[str], quick: bool) -> list[str]:
    """Overrides every run shares: --quick's first (the user's win), never the swept key (it would be ambiguous)."""
    def k(o: str) -> str:
        return o.split("=", 1)[0].strip()
    clash = [o for o in overrides if k(o) == key]
    if clash:
        raise ConfigError(f"{key} is swept and also set by the override '{clash[0]}'; drop one")
    return [*(o for o in (QUICK if quick else []) if k(o) != key), *overrides]


def validate_grid(config: str | None, overrides: list[str], key: str, values: list[str]) -> list[Config]:
    """Every run's config, checked before the first run starts (a typo must not cost a whole sweep)."""
    cfgs = []
    for v in values:
        try:
            cfgs.append(load_config(config, [*overrides, f"{key}={v}"]))
        except ConfigError as e:
            raise ConfigError(f"sweep value {key}={v} is invalid, nothing was run: {e}") from None
    return cfgs


def run_dir_names(key: str, values: list[str]) -> dict[str, str]:
    """One directory name per value, e.g. max_staleness-2; characters a path or override would trip on become _."""
    leaf, names = key.rsplit(".", 1)[-1], {}
    for i, v in enumerate(values):
        name = f"{leaf}-{re.sub(r'[^A-Za-z0-9._+-]', '_', v)}"
        names[v] = name if name not in names.values() else f"{name}-{i}"
    return names


def run_sweep(grid: str, config: str | None, overrides: list[str], *, quick: bool = False, tolerance: float = 0.05,
              threshold: float | None = None, name: str = "", quiet: bool = False) -> int:
    """Run every value of `grid` in turn; 0 if all finished, 1 if some failed, 130 if interrupted."""
    if tolerance < 0:
        raise ConfigError(f"--tolerance must be >= 0 (got {tolerance})")
    key, values = parse_grid(grid)
    overrides = sweep_overrides(key, overrides, quick)
    cfgs = validate_grid(config, overrides, key, values)
    name = name or _dt.datetime.now().strftime("sweep-%Y%m%d-%H%M%S")
    out = Path(cfgs[0].run.output_dir).expanduser() / name
    dirs = run_dir_names(key, values)
    if (out / "sweep.json").exists() or any((out / d / "metrics.jsonl").exists() for d in dirs.values()):
        raise FileExistsError(f"{out} already holds a sweep; pass another --name")
    from areal_py.app.launcher import run  # heavy imports only once the grid is known good

    print(f"areal-py sweep: {key} over {', '.join(values)}, one run after another -> {out}")
    summaries: dict[str, RunSummary] = {}
    failed: dict[str, str] = {}
    interrupted = False
    for i, v in enumerate(values):
        print(f"areal-py sweep: [{i + 1}/{len(values)}] {key}={v}")
        try:
            code = run(config, [*overrides, f"{key}={v}", f"run.output_dir={out}", f"run.name={dirs[v]}"],
                       quiet=quiet)
        except KeyboardInterrupt:
            code = 130
        except Exception as e:  # noqa: BLE001 - one broken run must not end the sweep
            code, failed[v] = 1, f"{type(e).__name__}: {e}"
        if code == 130:
            interrupted, failed[v] = True, "interrupted"
            print("areal-py sweep: interrupted; the remaining values are not run")
            break
        try:
            if code != 0:
                raise RuntimeError(failed.get(v, f"exit code {code}"))
            summaries[v] = summarize_run(out / dirs[v], threshold)
        except (RuntimeError, OSError, ValueError, KeyError) as e:
            failed[v] = str(e)
            print(f"areal-py sweep: {key}={v} failed ({e}); going on with the next value")
    rec = recommend(key, summaries, tolerance, values)
    threshold_note = "given"
    if threshold is None and rec is not None:  # default bar: the reward the recommendation accepts
        threshold, threshold_note = rec.baseline_reward - tolerance, "baseline final reward - tolerance"
        summaries = {v: replace(s, time_to_threshold_s=summarize_run(out / dirs[v], threshold).time_to_threshold_s)
                     for v, s in summaries.items()}
    table = render_table(key, table_rows(values, summaries, failed, rec))
    advice = rec.text(summaries) if rec else f"no recommendation: the baseline run {key}={baseline_of(key, values)} " \
                                             f"did not finish"
    thr = "" if threshold is None else \
        f"(time to threshold: first time the trailing window's mean reward reaches {threshold:.3f}, {threshold_note})\n"
    print(f"\n{table}\n{thr}\n{advice}")
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "key": key, "values": values, "config": config, "overrides": overrides, "quick": quick,
        "tolerance": tolerance, "threshold": threshold, "threshold_source": threshold_note,
        "run_dirs": {v: str(out / d) for v, d in dirs.items()}, "runs": {v: s.to_dict() for v, s in summaries.items()},
        "failed": failed, "interrupted": interrupted, "recommendation": None if rec is None else asdict(rec),
        "advice": advice, "table": table}
    (out / "sweep.json").write_text(json.dumps(report, indent=1))
    html = out / "sweep.html"
    html.write_text(render_html(key, values, summaries, table, advice, rec))
    png = write_png(out / "sweep.png", key, values, summaries, rec)
    print(f"areal-py sweep: wrote {out / 'sweep.json'}, {html}" + (f", {png}" if png else ""))
    return 130 if interrupted else (0 if summaries and not failed else 1)
