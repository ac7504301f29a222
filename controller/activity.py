"""Rollout activity between batches: the controller's side of `areal_py.telemetry.gen_activity`.

Servers report cumulative counters; this keeps, per server, what it added since the previous batch
(slot-seconds, and the seconds they cover on the server's own clock), so each batch gets the mean
slot occupancy of the live servers over its interval and the generation spans that fell in it.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from areal_py.telemetry.gen_activity import MAX_SPANS, merge_spans, slot_occupancy
from areal_py.wire import protocol as P


@dataclass(frozen=True)
class Activity:
    """Rollout activity over one batch interval, as it goes into the batch's stats and spans."""

    gen_busy_s: float                      # seconds any server spent generating, summed over servers
    rollout_slot_occupancy: float | None   # mean over the live servers that reported; None if none did
    spans: list[tuple[float, float]]       # merged generation spans (server clocks), at most MAX_SPANS


@dataclass
class _Server:
    started: float       # the server's meter start; a new value means its counters restarted from 0
    at: float            # when its last counters were taken (epoch seconds, server clock)
    slot_seconds: float = 0.0
    busy_s: float = 0.0
    max_running: int = 0
    acc_slot_seconds: float = 0.0  # added since the previous batch...
    acc_seconds: float = 0.0       # ...over this much of the server's time


class ActivityTracker:
    def __init__(self) -> None:
        self.servers: dict[str, _Server] = {}
        self.busy_s = 0.0
        self.spans: list[tuple[float, float]] = []

    def add(self, server_id: str, hb: P.Heartbeat, received: float) -> None:
        """Account one heartbeat (`received`: epoch seconds, for senders that do not stamp `at`)."""
        at = hb.at or received
        s = self.servers.get(server_id)
        if s is None:
            s = self.servers[server_id] = _Server(started=hb.started, at=hb.started or at)
        elif hb.started != s.started or hb.slot_seconds < s.slot_seconds or hb.busy_s < s.busy_s:
            # restarted under the same id: its counters count again from its new meter's start
            s.started, s.at, s.slot_seconds, s.busy_s = hb.started, hb.started or at, 0.0, 0.0
        s.acc_slot_seconds += hb.slot_seconds - s.slot_seconds
        s.acc_seconds += max(0.0, at - s.at)
        self.busy_s += hb.busy_s - s.busy_s
        s.slot_seconds, s.busy_s, s.at, s.max_running = hb.slot_seconds, hb.busy_s, max(s.at, at), hb.max_running
        self.spans.extend(hb.spans)
        if len(self.spans) > 4 * MAX_SPANS:
            self.spans = merge_spans(self.spans)

    def take(self, live: Iterable[str]) -> Activity:
        """What happened since the previous call (see `Activity`); starts the next interval."""
        occ = [slot_occupancy(s.acc_slot_seconds, s.acc_seconds, s.max_running)
               for s in (self.servers.get(i) for i in live) if s is not None]
        occ = [o for o in occ if o is not None]
        out = Activity(gen_busy_s=self.busy_s, rollout_slot_occupancy=sum(occ) / len(occ) if occ else None,
                       spans=merge_spans(self.spans))
        for s in self.servers.values():
            s.acc_slot_seconds = s.acc_seconds = 0.0
        self.busy_s, self.spans = 0.0, []
        return out
