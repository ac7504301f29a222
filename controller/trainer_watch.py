"""The controller's watch on the trainer: a trainer killed under `areal-py serve` ends the controller with a
named error instead of an endless wait.

Without a launcher nothing else notices: once the trainer is gone, no batch can be sent, and when none is
due (every batch the staleness bound allows is already sent) the controller would wait for ever. The
trainer's rank 0 speaks often while it waits for a batch (a probe every rollout.heartbeat_s,
areal_py/wire/trainer_link.py), but not at all while it trains a step or writes a checkpoint, which may
take minutes. So silence alone cannot tell a busy trainer from a dead one; its link can:

    lost  <=>  silent for more than timeout_s  and  its routing id unreachable on the batch link

A routing id is unreachable once the trainer's connection is gone (its process died, so its kernel
closed the connection; libzmq then forgets the id, and a send to it fails at once under
ROUTER_MANDATORY). The reachability probe is a Ping on the batch link, which the trainer reads as the
answer to one of its own probes; it is sent only past the silence bound, every `probe_s`. A trainer that
hangs with its connection up, or whose machine vanishes without closing it, is not noticed here.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from areal_py.wire import protocol as P
from areal_py.wire.transport import WaitTimeout


class TrainerLost(WaitTimeout):
    """Nothing from the trainer for controller.trainer_timeout_s and its link is down: it died or cannot be
    reached. The message names the bound, where the state a resume needs is, and how to resume."""


@dataclass
class TrainerWatch:
    """When the trainer last spoke, and whether its silence has become its loss (module docstring).

    Times are `time.monotonic()` seconds passed in by the caller."""

    timeout_s: float
    probe_s: float
    last_heard: float = 0.0
    last_probe: float = -math.inf

    def heard(self, now: float) -> None:
        """Any message from the trainer's routing id."""
        self.last_heard = now

    def lost(self, now: float, reachable: Callable[[], bool]) -> bool:
        """True once the trainer has been silent past `timeout_s` and `reachable()` (called at most every
        `probe_s`, and only past the bound) says its link is down."""
        if now - self.last_heard <= self.timeout_s or now - self.last_probe < self.probe_s:
            return False
        self.last_probe = now
        return not reachable()


def link_up(sock: zmq.Socket, to: bytes, probe: P.Ping) -> bool:
    """Send `probe` to routing id `to` on a ROUTER_MANDATORY socket without blocking: False when the id is not
    connected (EHOSTUNREACH); True when it took the probe or its queue is full (EAGAIN: connected, busy)."""
    try:
        sock.send_multipart([to, *P.encode(probe, None)], flags=zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return True
    except zmq.ZMQError as e:
        if e.errno == zmq.EHOSTUNREACH:
            return False
        raise
    return True
