"""ZeroMQ plumbing: sockets with sane options, timed receives, and counted rejection.

Every blocking wait goes through `recv` with a timeout whose error names what it waited for.
Every rejection is counted exactly (`areal_rejected_messages_total{role, reason}`), but logged
as a bounded summary at most once per (role, reason) every LOG_EVERY_S: a peer flooding bad or
huge messages must not also flood the log and the disk.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, Protocol

import zmq

from areal_py.config import ConfigError
from areal_py.telemetry.metrics import REJECTED_MESSAGES
from areal_py.wire.netaddr import is_local_host, tcp_host
from areal_py.wire.protocol import Message, ProtocolError, decode, encode

log = logging.getLogger(__name__)


class WaitTimeout(TimeoutError):
    """A blocking wait ran out; the message says what was awaited and for how long."""


class ControllerLost(WaitTimeout):
    """A trainer or rollout server heard nothing from the controller (no batch, no ping, no answer to its
    own probe) for its configured bound: the controller died, hangs or cannot be reached. The message
    names the bound's key, what the role held that is lost, and how to resume."""


SUMMARY_CHARS = 200  # of a rejected message's detail in the log line
LOG_EVERY_S = 10.0  # per (role, reason); the first of a kind is always logged at once


def summarize(text: str, limit: int = SUMMARY_CHARS) -> str:
    """`text` cut to `limit` characters, saying how long it was: log lines stay bounded whatever a peer sends."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


class RateLimitedLog:
    """At most one warning per key every `every_s`; the next one says how many were suppressed.

    The first occurrence of a key is always logged at once, so a new failure is never hidden; only its
    repeats are thinned. Counting is the metric's job and stays exact; this only bounds the log.
    """

    def __init__(self, logger: logging.Logger, every_s: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.every_s, self.clock = logger, every_s, clock
        self._last: dict[Hashable, float] = {}
        self._suppressed: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: Hashable, fmt: str, *args: Any) -> bool:
        """Log unless `key` was logged less than `every_s` ago; returns whether it logged."""
        with self._lock:
            now = self.clock()
            last = self._last.get(key)
            if last is not None and now - last < self.every_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            fmt, args = fmt + " (%d more like this suppressed since the previous line)", (*args, suppressed)
        self.logger.warning(fmt, *args)
        return True


REJECT_LOG = RateLimitedLog(log)


def _nbytes(frames: list[Any]) -> int:
    return sum(len(f.buffer) if hasattr(f, "buffer") else len(f) for f in frames)


class InsecureSocket(ConfigError):
    """A socket off loopback without CURVE keys."""


class CurveSide(Protocol):
    """The CURVE options of one socket (areal_py.wire.curve: CurveServer, CurveClient), set before bind/connect."""

    def apply(self, sock: zmq.Socket) -> None: ...


def require_keys(addr: str, *, bind: bool) -> None:
    """Refuse a tcp endpoint off loopback without CURVE: anyone who reaches the port could join the run."""
    host = tcp_host(addr)
    if host is None or is_local_host(host):
        return
    raise InsecureSocket(
        f"refusing to {'listen on' if bind else 'connect to'} {addr} without CURVE keys: off loopback every socket "
        "must be authenticated and encrypted. Create keys with `areal-py keys DIR` and set net.keys_dir=DIR on every "
        "role (`areal-py run` and `areal-py slurm` make a run's keys themselves), or keep net.bind_host and "
        "net.controller_host on 127.0.0.1")


def make_socket(ctx: zmq.Context, kind: int, addr: str, *, bind: bool, identity: str | None = None,
                max_message_bytes: int | None = None, curve: CurveSide | None = None) -> zmq.Socket:
    """A socket with LINGER 0; roles pass `net.max_message_bytes` so no peer can make them allocate more.

    ZMQ_MAXMSGSIZE is checked by libzmq per frame, not per multipart message: a frame over it makes
    libzmq drop the connection (the message is lost, never seen by the role, not counted; the peer
    reconnects by itself), so the limit must exceed the largest single tensor streamed as weights.
    `curve` makes it a CURVE server or client; without it a tcp address off loopback is refused
    (`InsecureSocket`) before any socket exists.
    """
    if curve is None:
        require_keys(addr, bind=bind)
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.apply(sock)
    if max_message_bytes is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity.encode())
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    if bind:
        try:
            sock.bind(addr)
        except zmq.ZMQError as e:
            sock.close()
            raise OSError(f"cannot bind {addr}: {e} (is another run using this port? set net.*_port)") from None
    else:
        sock.connect(addr)
    return sock


def send(sock: zmq.Socket, body: Any, tensors: dict | None = None, *, to: bytes | None = None) -> None:
    frames = encode(body, tensors)
    if to is not None:
        frames = [to, *frames]
    sock.send_multipart(frames, copy=False)


def try_send(sock: zmq.Socket, body: Any, *, to: bytes | None = None) -> bool:
    """Send `body` without blocking; False when it cannot leave now (no peer connected, a full queue, a routing
    id not connected). For liveness probes and their answers: a lost one is followed by the next, and a probe
    must never block the loop that is waiting for its answer."""
    frames = encode(body, None)
    try:
        sock.send_multipart([to, *frames] if to is not None else frames, flags=zmq.NOBLOCK, copy=False)
    except zmq.ZMQError:  # EAGAIN (would block), EHOSTUNREACH (ROUTER_MANDATORY, peer gone)
        return False
    return True


def parse(frames: list[Any], role: str, *, routed: bool = False) -> tuple[bytes | None, Message | None]:
    """Decode frames; on a bad message log it, count it and return (sender, None) so the caller goes on."""
    sender = None
    if routed:
        if len(frames) < 2:
            REJECTED_MESSAGES.labels(role=role, reason="empty").inc()
            REJECT_LOG.warning((role, "empty"), "%s: rejected message: no body frames", role)
            return None, None
        sender, frames = bytes(frames[0]), frames[1:]
    try:
        return sender, decode(frames)
    except ProtocolError as e:
        REJECTED_MESSAGES.labels(role=role, reason=e.reason).inc()
        REJECT_LOG.warning((role, e.reason), "%s: rejected message from %s (%d bytes in %d frames): %s", role,
                           summarize(repr(sender), 80), _nbytes(frames), len(frames), summarize(str(e)))
        return sender, None


def reject(role: str, reason: str, detail: str) -> None:
    """Count a well-formed message that makes no sense here (wrong type for this socket, stale)."""
    REJECTED_MESSAGES.labels(role=role, reason=reason).inc()
    REJECT_LOG.warning((role, reason), "%s: rejected message (%s): %s", role, reason, summarize(detail))


TICK_S = 0.1  # longest gap between two `tick` calls of a waiting `recv`


def recv(sock: zmq.Socket, role: str, *, timeout_s: float, waiting_for: str, routed: bool = False,
         tick: Callable[[], None] | None = None) -> tuple[bytes | None, Message]:
    """Block for the next valid message; bad ones are counted and skipped, time runs out with a clear error.

    `tick` is called at least every TICK_S while waiting, so a role keeps up its own duties (the
    controller's pings) during a long wait instead of looking dead to its peers.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if tick is not None:
            tick()
        left = deadline - time.monotonic()
        if tick is not None:
            left = min(left, TICK_S)
        if left <= 0 or not sock.poll(int(left * 1000) + 1):
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"{role}: timed out after {timeout_s:.0f}s waiting for {waiting_for}")
            continue
        sender, msg = parse(sock.recv_multipart(copy=False), role, routed=routed)
        if msg is not None:
            return sender, msg
