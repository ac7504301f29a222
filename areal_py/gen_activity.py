"""When rollout servers were generating, and how full their slots were.

A server's `BusyMeter` is ticked once per loop iteration. It integrates busy time and slot-seconds
(running requests x seconds) and records busy spans in wall-clock time (`time.time()`, comparable
across processes on one machine or NTP-synced machines). Heartbeats carry the cumulative numbers and
the spans since the previous heartbeat; the controller turns them into each batch's mean slot
occupancy and generation spans, and the trainer writes them to `metrics.jsonl` so the report's
timeline shows real generation, not a guess at step resolution.
"""
from __future__ import annotations

MERGE_GAP_S = 0.05  # busy periods closer than this are one span (a poll between two steps is not idleness)
MAX_SPANS = 64      # per message: spans past this are coalesced across their smallest gaps


def merge_spans(spans: list[tuple[float, float]], gap: float = MERGE_GAP_S,
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


class BusyMeter:
    """Integrates one server's activity; `tick` at every loop iteration with the time and running count."""

    def __init__(self, now: float) -> None:
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
        self.last = now
        return closed

    def drain_spans(self, now: float) -> list[tuple[float, float]]:
        """Busy spans since the last drain; an open span is cut at `now` and continues from there."""
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
