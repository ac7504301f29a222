"""What the controller knows about each rollout server: liveness, version, the work it holds."""
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

    @property
    def load(self) -> int:
        return sum(self.inflight.values())


class ServerRegistry:
    """Servers register by saying anything (hello or heartbeat); silence beyond a timeout is death."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.servers: dict[str, ServerState] = {}

    def seen(self, server_id: str, version: int | None = None) -> tuple[ServerState, bool]:
        """Record contact; returns (state, is_new_or_revived)."""
        s = self.servers.get(server_id)
        fresh = s is None or not s.alive
        if s is None:
            s = self.servers[server_id] = ServerState(server_id, version or 0)
        s.alive = True
        s.last_seen = time.monotonic()
        if version is not None:
            s.version = version
        return s, fresh

    def live(self) -> list[ServerState]:
        return [s for s in self.servers.values() if s.alive]

    def least_loaded(self) -> ServerState | None:
        live = self.live()
        return min(live, key=lambda s: (s.load, s.server_id)) if live else None

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
