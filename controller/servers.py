"""What the controller knows about each rollout server: liveness, version, the work it holds.

Membership rules: a server joins by a hello alone (never by a heartbeat or a result: a forged gid must not
conjure a member); silence past `timeout_s` is death (`expire`); a server that does not load the newest
weights in time is evicted (`evict`) and rejoins only once it reports running them, so it neither
stalls the weight sync nor takes work meanwhile.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class ServerState:
    server_id: str
    version: int
    last_seen: float = field(default_factory=time.monotonic)
    inflight: dict[int, int] = field(default_factory=dict)  # gid -> samples still outstanding
    alive: bool = True
    last_weights_sent: float = 0.0
    engine_path: str | None = None  # from its hello (protocol.EnginePath); None: not said
    joined: float = field(default_factory=time.monotonic)  # when it last became live
    last_live: float = field(default_factory=time.monotonic)  # its last word while live (not evicted)
    evicted_until: int | None = None  # evicted: live again once it reports this version

    @property
    def load(self) -> int:
        return sum(self.inflight.values())


class ServerRegistry:
    """Servers the controller has met (the caller registers one on its hello alone); silence beyond a timeout
    is death, and a known server's next word revives it."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.servers: dict[str, ServerState] = {}

    def seen(self, server_id: str, version: int | None = None) -> tuple[ServerState, bool]:
        """Record contact; returns (state, is_new_or_revived). An evicted server stays out (not live) until
        `version` reaches the one it was evicted for."""
        now = time.monotonic()
        s = self.servers.get(server_id)
        if s is None:
            s = self.servers[server_id] = ServerState(server_id, version or 0, alive=False)
        s.last_seen = now
        if version is not None:
            s.version = version
        if s.evicted_until is not None:
            if s.version < s.evicted_until:
                return s, False
            s.evicted_until = None
        fresh = not s.alive
        if fresh:
            s.joined = now
        s.alive, s.last_live = True, now
        return s, fresh

    def evict(self, server: ServerState, until_version: int) -> None:
        """Take `server` out of the live set until it reports `until_version` (the caller moves its work)."""
        server.alive = False
        server.evicted_until = until_version

    def live(self) -> list[ServerState]:
        return [s for s in self.servers.values() if s.alive]

    def least_loaded(self, avoid: str | None = None) -> ServerState | None:
        """The live server with the least work; `avoid` only when no other is live."""
        live = self.live()
        pick = [s for s in live if s.server_id != avoid] or live
        return min(pick, key=lambda s: (s.load, s.server_id)) if pick else None

    def expire(self) -> list[ServerState]:
        """Mark servers silent for too long as dead and return them (their work must move)."""
        now = time.monotonic()
        dead = [s for s in self.live() if now - s.last_seen > self.timeout_s]
        for s in dead:
            s.alive = False
        return dead

    def min_version(self) -> int | None:
        live = self.live()
        return min(s.version for s in live) if live else None
