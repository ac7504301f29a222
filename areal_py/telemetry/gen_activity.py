"""When rollout servers were generating, and how full their slots were.

A server's `BusyMeter` is ticked at every loop iteration. It integrates busy time and slot-seconds
(running requests x seconds) and records busy spans in wall-clock time (`time.time()`, comparable
across processes on one machine or NTP-synced machines). Heartbeats carry the cumulative numbers,
the instant they were taken and the spans since the previous heartbeat; the controller
(`controller/activity.py`) turns them into each batch's mean slot occupancy and generation spans.

Time base: spans travel as absolute epoch seconds, so no process needs another's clock origin. The
trainer, which owns `wall_time_s` (seconds since the run started, continued across resumes),
converts them once with `to_run_time` when it writes `metrics.jsonl`, so `gen_spans` and
`wall_time_s` share one axis.
"""
from __future__ import annotations

from collections.abc import Iterable

MERGE_GAP_S = 0.005  # busy periods this close are one span: a few ms between two requests is not idleness
MAX_SPANS = 64       # per message and per step record: past this the smallest gaps are closed


def merge_spans(spans: Iterable[tuple[float, float]], gap: float = MERGE_GAP_S,
                max_spans: int = MAX_SPANS) -> list[tuple[float, float]]:
    """Union of [start, end] intervals, joining those separated by less than `gap`; at most `max_spans`
    (the smallest gaps are closed first, so the picture keeps its largest idle periods)."""
    out: list[list[float]] = []
    for a, b in sorted((float(a), float(b)) for a, b in spans if b >= a):
        if out and a - out[-1][1] < gap:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    while len(out) > max(1, max_spans):
        i = min(range(len(out) - 1), key=lambda j: out[j + 1][0] - out[j][1])
        out[i][1] = max(out[i][1], out[i + 1][1])
        del out[i + 1]
    return [(a, b) for a, b in out]


def to_run_time(spans: Iterable[tuple[float, float]], epoch0: float, ndigits: int = 3) -> list[list[float]]:
    """Epoch-second spans as seconds since `epoch0` (the wall-clock instant of `wall_time_s == 0`),
    rounded to keep step records small."""
    return [[round(a - epoch0, ndigits), round(b - epoch0, ndigits)] for a, b in spans]


class BusyMeter:
    """Integrates one server's activity; `tick` at every loop iteration with the time and running count."""

    def __init__(self, now: float) -> None:
        self.started = now  # identifies this meter: counters restart from 0 with a new one
        self.last = now
        self.busy_s = 0.0
        self.slot_seconds = 0.0
        self._running = 0  # running requests since the last tick
        self._open: float | None = None  # start of the current busy span
        self._closed: list[tuple[float, float]] = []

    def tick(self, now: float, running: int, busy: bool | None = None) -> bool:
        """Account the interval since the last tick to the state it had then; `running` requests hold
        slots from now on, and the server is `busy` (default: running > 0) until the next tick.
        Returns True when a busy span just closed (worth reporting at once)."""
        closed = False
        busy = running > 0 if busy is None else busy
        dt = max(0.0, now - self.last)
        if self._open is not None:
            self.busy_s += dt
            self.slot_seconds += self._running * dt
            if not busy:
                self._closed.append((self._open, now))
                self._open = None
                closed = True
        elif busy:
            self._open = now
        self._running = running
        self.last = max(self.last, now)
        return closed

    def drain_spans(self, now: float) -> list[tuple[float, float]]:
        """Busy spans since the last drain, bounded; an open span is cut at `now` and continues from there."""
        spans = self._closed
        if self._open is not None and now > self._open:
            spans.append((self._open, now))
            self._open = now
        self._closed = []
        return merge_spans(spans)


def slot_occupancy(slot_seconds: float, seconds: float, slots: int) -> float | None:
    """Mean fraction of KV slots in use: slot-seconds / (elapsed x slots); None without a denominator."""
    if seconds <= 0 or slots <= 0:
        return None
    return min(1.0, max(0.0, slot_seconds / (seconds * slots)))
