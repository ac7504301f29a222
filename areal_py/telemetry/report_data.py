"""The report's data: series, histograms, timeline lanes and headline numbers derived from step records.

Pure functions over `StepRecord`s (no HTML), shared by the end-of-run report and the live dashboard.
A field a record does not hold, or holds as a non-finite number, contributes no point: old metrics
files and steps that logged NaN plot what they have.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from areal_py.telemetry.charts import Segment
from areal_py.telemetry.gen_activity import merge_spans
from areal_py.telemetry.step_record import StepRecord, finite, read_step_records

Value = Callable[[StepRecord], float | None]  # one field of a record, e.g. ``lambda r: r.reward_mean``
RATE_WINDOW = 3  # rates are taken over this many step intervals: light smoothing that keeps units exact


def load_records(path: Path) -> list[StepRecord]:
    """The step records of a metrics file, in file order; anything that is not a step record is skipped."""
    return read_step_records(path)


def step_series(records: Sequence[StepRecord], value: Value) -> list[tuple[float, float]]:
    """(step, value) for every record whose ``value`` is a finite number."""
    out = []
    for r in records:
        v = finite(value(r))
        if v is not None:
            out.append((float(r.step), v))
    return out


def timed(records: Sequence[StepRecord], value: Value) -> list[tuple[float, float]]:
    """(wall_time_s, value) for every record where both are finite numbers."""
    out = []
    for r in records:
        t, c = finite(r.wall_time_s), finite(value(r))
        if t is not None and c is not None:
            out.append((t, c))
    return out


def cumulative_rate(records: Sequence[StepRecord], counter: Value,
                    window: int = RATE_WINDOW) -> list[tuple[float, float]]:
    """Per-second rate of a cumulative counter: at each step i >= 1, (c_i - c_j) / (t_i - t_j) with
    j = max(0, i - window). Points where time does not advance or the counter went back
    (a restart that reset it) are left out."""
    pts = timed(records, counter)
    out = []
    for i in range(1, len(pts)):
        (t0, c0), (t1, c1) = pts[max(0, i - window)], pts[i]
        if t1 > t0 and c1 >= c0:
            out.append((t1, (c1 - c0) / (t1 - t0)))
    return out


def busy_fraction(records: Sequence[StepRecord]) -> list[tuple[float, float]]:
    """Trainer busy fraction per step: train_s / (time since the previous step), clipped to [0, 1].
    The first step's interval is its own wait + train + publish."""
    out, prev = [], None
    for r in records:
        t, train = finite(r.wall_time_s), finite(r.train_s)
        if t is None or train is None:
            continue
        if prev is None:
            interval = sum(finite(v) or 0.0 for v in (r.wait_s, r.train_s, r.publish_s))
        else:
            interval = t - prev
        prev = t
        if interval > 0:
            out.append((t, min(1.0, max(0.0, train / interval))))
    return out


def staleness_histogram(records: Sequence[StepRecord]) -> dict[int, int]:
    """Sample staleness (in policy versions) summed over all steps: {staleness: samples}."""
    total: dict[int, int] = {}
    for r in records:
        for k, v in (r.sample_staleness_hist or {}).items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


def _rollout_counters(records: Sequence[StepRecord]) -> dict[str, list[tuple[float, float]]]:
    """Cumulative generated tokens per server (``server_generated_tokens``), or the run total."""
    servers = sorted({s for r in records for s in (r.server_generated_tokens or {})})
    if not servers:
        return {"rollout": timed(records, lambda r: r.generated_tokens)}
    return {s if s.startswith("rollout") else f"rollout {s}":
            timed(records, lambda r, s=s: (r.server_generated_tokens or {}).get(s)) for s in servers}


def timeline_lanes(records: Sequence[StepRecord], last: int | None = None) -> list[tuple[str, list[Segment]]]:
    """A trainer lane (wait, proximal recompute, rest of training, publish, laid back from each
    step's end time) and the generation: one lane of the servers' measured busy spans (``gen_spans``)
    when the records have them; for older metrics files, one lane per rollout server whose bars span
    each step interval, shaded by the generation rate in it (value = tokens generated in the
    interval). ``last``: only the segments of the last that many steps."""
    trainer: list[Segment] = []
    for r in records:
        end = finite(r.wall_time_s)
        if end is None:
            continue
        ph = r.phases()
        t_pub = end - ph.publish
        t_train = t_pub - ph.proximal - ph.train
        trainer.append(Segment(t_train - ph.wait, t_train, "wait", ph.wait))
        if ph.proximal > 0:
            trainer.append(Segment(t_train, t_train + ph.proximal, "proximal", ph.proximal))
        trainer.append(Segment(t_train + ph.proximal, t_pub, "train", ph.train))
        trainer.append(Segment(t_pub, end, "publish", ph.publish))
    lanes: list[tuple[str, list[Segment]]] = [("trainer", trainer)]
    if any(r.gen_spans is not None for r in records):  # measured by the servers: draw what really happened
        spans = merge_spans(((a, b) for r in records for a, b in (r.gen_spans or [])), max_spans=10**6)
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


def _cut(lanes: list[tuple[str, list[Segment]]], records: Sequence[StepRecord],
         last: int | None) -> list[tuple[str, list[Segment]]]:
    """Only the segments of the last `last` steps (None: all)."""
    if last is not None and len(records) > last:
        cut = finite(records[-last - 1].wall_time_s)
        if cut is not None:
            lanes = [(name, [s for s in segs if s.end > cut]) for name, segs in lanes]
    return lanes


def _mean(vals: Iterable[float]) -> float | None:
    vals = list(vals)
    return sum(vals) / len(vals) if vals else None


def summary(records: Sequence[StepRecord]) -> list[tuple[str, str]]:
    """Headline numbers as (label, text) rows."""
    rewards = [v for _, v in step_series(records, lambda r: r.reward_mean)]
    walls = [v for _, v in timed(records, lambda r: r.wall_time_s)] if records else []
    wall = walls[-1] if walls else None
    train_total = sum(v for _, v in step_series(records, lambda r: r.train_s))
    first, last = _mean(rewards[:10]), _mean(rewards[-10:])
    stale = [v for _, v in step_series(records, lambda r: r.staleness_max)]
    rows = [("steps", f"{len(records)} (last step {records[-1].step})" if records else "0"),
            ("wall time", f"{wall:.1f} s" if wall is not None else "-"),
            ("reward, first 10 → last 10 steps",
             f"{first:.3f} → {last:.3f}" if first is not None and last is not None else "-"),
            ("trainer busy (train_s / wall time)", f"{train_total / wall:.0%}" if wall else "-"),
            ("max token staleness seen", f"{int(max(stale))}" if stale else "-")]
    occ = [v for _, v in step_series(records, lambda r: r.rollout_slot_occupancy)]
    if occ:  # runs recorded before the servers measured it have none
        rows.append(("rollout slot occupancy, mean over steps", f"{sum(occ) / len(occ):.0%}"))
    if records:
        lr = records[-1]
        for key, v in (("generated_tokens", lr.generated_tokens), ("trained_tokens_total", lr.trained_tokens_total)):
            if finite(v) is not None:
                rows.append((key, f"{int(v):,}"))
    generic = max((r.generic_engine_servers for r in records if r.generic_engine_servers is not None), default=None)
    if generic is not None:  # runs recorded before servers said their engine path have none
        rows.append(("rollout engine path", "no server on the generic fallback (fast path, or SGLang)" if generic == 0 else
                     f"generic Hugging Face forward on {generic} server(s) (slower; kernels/<server>.json says why)"))
    return rows
