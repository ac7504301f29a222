"""ZeroMQ plumbing: sockets with sane options, timed receives, and counted rejection.

Every blocking wait goes through `recv` with a timeout whose error names what it waited for.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import zmq

from areal_py.metrics import REJECTED_MESSAGES
from areal_py.protocol import Message, ProtocolError, decode, encode

log = logging.getLogger(__name__)


class WaitTimeout(TimeoutError):
    """A blocking wait ran out; the message says what was awaited and for how long."""


def make_socket(ctx: zmq.Context, kind: int, addr: str, *, bind: bool, identity: str | None = None) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
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


def parse(frames: list[Any], role: str, *, routed: bool = False) -> tuple[bytes | None, Message | None]:
    """Decode frames; on a bad message log it, count it and return (sender, None) so the caller goes on."""
    sender = None
    if routed:
        if len(frames) < 2:
            REJECTED_MESSAGES.labels(role=role, reason="empty").inc()
            log.warning("%s: rejected message: no body frames", role)
            return None, None
        sender, frames = bytes(frames[0]), frames[1:]
    try:
        return sender, decode(frames)
    except ProtocolError as e:
        REJECTED_MESSAGES.labels(role=role, reason=e.reason).inc()
        log.warning("%s: rejected message from %r: %s", role, sender, e)
        return sender, None


def reject(role: str, reason: str, detail: str) -> None:
    """Count a well-formed message that makes no sense here (wrong type for this socket, stale)."""
    REJECTED_MESSAGES.labels(role=role, reason=reason).inc()
    log.warning("%s: rejected message: %s", role, detail)


def recv(sock: zmq.Socket, role: str, *, timeout_s: float, waiting_for: str, routed: bool = False) -> tuple[bytes | None, Message]:
    """Block for the next valid message; bad ones are counted and skipped, time runs out with a clear error."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not sock.poll(int(left * 1000) + 1):
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"{role}: timed out after {timeout_s:.0f}s waiting for {waiting_for}")
            continue
        sender, msg = parse(sock.recv_multipart(copy=False), role, routed=routed)
        if msg is not None:
            return sender, msg
