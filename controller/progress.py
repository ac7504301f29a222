"""Each dispatched attempt's last sign of life: a group whose Generate or Results were lost is generated again.

A Generate or a Result can be lost on the way (a lossy link, a connection libzmq drops and reopens) while
the server stays alive and keeps sending heartbeats. Server liveness (controller/servers.py) cannot see
that: the group would wait on that server for ever, holding its place under the staleness bound, and
enough such groups stall admission. So every dispatched attempt has a clock, reset by each sign that it
is alive:

- its dispatch;
- each of its Results the controller accepts;
- each heartbeat of its server that lists it among the attempts the server holds (`Heartbeat.held`).

An attempt silent past `timeout_s` (`controller.group_timeout_s`) is overdue: the caller re-dispatches it
as a new attempt (controller/rollouts.py, `expire_attempts`), so a late Result of the old one is rejected
as `stale_result` and nothing counts twice. Because a server holding an attempt names it every
heartbeat, a long generation or a long queue never runs a clock out: only an attempt its server does not
hold (its Generate lost, or its server finished it and a Result was lost) or a server whose heartbeats
stopped does. A server that does not say `held` (None) leaves the clocks to dispatch and results alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AttemptClocks:
    """gid -> (attempt, server, last sign of life), for the attempts dispatched and not yet finished.

    Times are `time.monotonic()` seconds passed in by the caller (the tests pass their own)."""

    timeout_s: float
    clocks: dict[int, tuple[int, str, float]] = field(default_factory=dict)

    def dispatched(self, gid: int, attempt: int, server_id: str, now: float) -> None:
        """Attempt `attempt` of group `gid` was sent to `server_id`: its clock starts."""
        self.clocks[gid] = (attempt, server_id, now)

    def result(self, gid: int, now: float) -> None:
        """An accepted Result of the group's current attempt: it lives."""
        c = self.clocks.get(gid)
        if c is not None:
            self.clocks[gid] = (c[0], c[1], now)

    def held(self, server_id: str, held: list[tuple[int, int]] | None, now: float) -> None:
        """A heartbeat of `server_id` saying which (gid, attempt) it holds: each current attempt on it listed
        lives. An old attempt listed (a late copy still running) says nothing of the current one."""
        for gid, attempt in held or ():
            c = self.clocks.get(gid)
            if c is not None and c[0] == attempt and c[1] == server_id:
                self.clocks[gid] = (attempt, server_id, now)

    def done(self, gid: int) -> None:
        """The group's current attempt ended (finished, moved, abandoned): no clock until its next dispatch."""
        self.clocks.pop(gid, None)

    def overdue(self, now: float) -> list[int]:
        """The gids whose current attempt has shown no sign of life for more than `timeout_s`, oldest first."""
        late = [(t, gid) for gid, (_, _, t) in self.clocks.items() if now - t > self.timeout_s]
        return [gid for _, gid in sorted(late)]
