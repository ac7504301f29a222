"""Weight sync: publish the trainer's new weights to every server and bring laggards up to date.

The newest weights are broadcast once on the PUB socket; a server that joins later, or is still
behind CATCH_UP_AFTER_S after a publish, gets them sent directly. Every update carries the oldest
token version a batch still to come can take, so servers abort doomed sequences early.

weights.transfer=dist: the trainer's notice carries only the layout (`dist`); it is relayed on the PUB
socket as the signal for every member of the weight group to join the broadcast now, and the bytes go
over that group, never through here. Such a version has nothing to send directly, so a server behind
it waits: the trainer falls back to stream (a version with tensors) when a broadcast fails, which is
also what happens once a member dies and restarts (docs/architecture.md, weights over a process group).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from areal_py.wire import protocol as P
from areal_py.wire.transport import reject, send
from areal_py.wire.weight_files import path_problem
from controller.run_state import RunCounters
from controller.servers import ServerRegistry, ServerState

CATCH_UP_AFTER_S = 2.0  # resend weights directly to a server still behind after this long

ToServer = Callable[[ServerState, P.UpdateWeights, dict | None], None]


@dataclass
class PublishedWeights:
    version: int
    path: str | None
    tensors: dict
    dist: P.DistLayout | None = None
    sha256: str | None = None
    at: float = field(default_factory=time.monotonic)


class WeightSync:
    def __init__(self, pub: zmq.Socket, registry: ServerRegistry, counts: RunCounters, to_server: ToServer, *,
                 max_token_staleness: int, sync_timeout_s: float, session: str | None = None) -> None:
        self.pub = pub
        self.registry = registry
        self.counts = counts
        self.to_server = to_server
        self.max_token_staleness = max_token_staleness
        self.sync_timeout_s = sync_timeout_s
        self.session = session  # the controller's, on every update (a server ignores a dead controller's)
        self.latest: PublishedWeights | None = None

    def publish(self, w: P.WeightsReady, tensors: dict) -> None:
        """Broadcast new weights; a path that cannot be the file of its version (`path_problem`: relative,
        `..`, another name) is rejected here (counted, reason weights_path) and never reaches a server."""
        if w.path is not None and (problem := path_problem(w.path, w.version)) is not None:
            reject("controller", "weights_path", problem)
            return
        self.latest = PublishedWeights(w.version, w.path, tensors, w.dist, w.sha256)
        send(self.pub, self.update_message(w.version, w.path, w.dist, w.sha256), tensors or None)
        for s in self.registry.live():
            s.last_weights_sent = time.monotonic()

    def catch_up(self, server: ServerState, force: bool = False) -> None:
        """Send the newest weights straight to `server` if it is behind: at once when `force` (it just
        joined), else once the broadcast had CATCH_UP_AFTER_S to arrive."""
        w = self.latest
        if w is None or server.version >= w.version or (w.path is None and not w.tensors):
            return  # nothing held to send: a dist-only version (see the module docstring)
        if force or time.monotonic() - server.last_weights_sent > CATCH_UP_AFTER_S:
            server.last_weights_sent = time.monotonic()
            self.to_server(server, self.update_message(w.version, w.path, sha256=w.sha256), w.tensors or None)

    def update_message(self, version: int, path: str | None, dist: P.DistLayout | None = None,
                       sha256: str | None = None) -> P.UpdateWeights:
        """Weights plus the oldest token version a batch still to come can take (older work is doomed)."""
        floor = max(0, self.counts.next_batch_version - self.max_token_staleness)
        return P.UpdateWeights(version=version, path=path, min_token_version=floor, dist=dist, sha256=sha256,
                               session=self.session)

    def laggards(self) -> list[ServerState]:
        """Live servers still behind the newest weights `sync_timeout_s` after they were sent them (the
        publish, or their joining since): the controller evicts them rather than wait, or fail the run."""
        w = self.latest
        if w is None:
            return []
        now = time.monotonic()
        return [s for s in self.registry.live()
                if s.version < w.version and now - max(w.at, s.joined) > self.sync_timeout_s]
