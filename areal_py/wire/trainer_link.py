"""The trainer's two links to the controller, and why only the trainer can use them.

The controller binds a ROUTER on `net.trainer_port` (hello, weights, done: trainer -> controller) and
a ROUTER on `net.batch_port` (batches: controller -> trainer). The trainer connects a DEALER to each,
both under one routing id drawn at random per trainer process (`new_trainer_id`).

Invariants the controller keeps with them (controller/trainer_side.py):
- the routing id of the first `TrainerHello` is the trainer's; any other sender's message on the
  trainer port (a `TrainerDone`, a `WeightsReady`, a second hello) is rejected and counted
  (`not_trainer`), so no other process can stop the run or choose the servers' weights;
- batches are sent to that routing id alone. A PUSH socket deals its messages round-robin to every
  PULL connected to it, so any process connecting to the batch port took every other batch.

Liveness: the controller sends the trainer nothing but batches, so while trainer rank 0 waits for one it
probes: a `Ping` on the trainer link every `rollout.heartbeat_s`, which the controller answers with a
`Ping` on the batch link (to the trainer's id alone). Silence is counted only while the trainer waits
(`Pulse.restart`: a long step of its own is not the controller's silence), and past
`trainer.controller_timeout_s` the wait ends with `ControllerLost`.

Before its hello the trainer probes until the controller answers (`await_controller`), so it knows the
session it says hello to and has heard the controller once: a controller that dies right after the
hello is then noticed within `trainer.controller_timeout_s` (no start-up grace), and one restarted in
that window answers under another session, which the trainer takes as a restart (it says its hello again).

The id is 64 random bits: another process cannot guess it to claim the trainer's name first (a ROUTER
refuses a second connection under an id already connected). Across machines the sockets are also
authenticated (CURVE); this is what holds on loopback, where anyone local may connect.
"""
from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from areal_py.config.launch import NetConfig
from areal_py.wire import protocol as P
from areal_py.wire.curve import TRAINER, Gatekeeper, client_curve
from areal_py.wire.transport import make_socket, parse, reject, try_send

TRAINER_ID_PREFIX = "trainer-"


def new_trainer_id() -> str:
    """A routing id for one trainer process: ``trainer-`` and 16 random hex digits."""
    return f"{TRAINER_ID_PREFIX}{secrets.token_hex(8)}"


def connect_trainer(ctx: zmq.Context, net: NetConfig, identity: str | None = None) -> tuple[zmq.Socket, zmq.Socket]:
    """The trainer's side: (to the controller, batches from it), two DEALERs under one routing id; CURVE
    clients with the trainer's key pair when net.keys_dir is set."""
    identity = identity or new_trainer_id()
    curve = client_curve(net.keys_dir, TRAINER)
    to_ctrl = make_socket(ctx, zmq.DEALER, net.addr(net.trainer_port), bind=False, identity=identity,
                          max_message_bytes=net.max_message_bytes, curve=curve)
    batches = make_socket(ctx, zmq.DEALER, net.addr(net.batch_port), bind=False, identity=identity,
                          max_message_bytes=net.max_message_bytes, curve=curve)
    return to_ctrl, batches


def bind_trainer(ctx: zmq.Context, net: NetConfig, *, send_timeout_s: float,
                 gate: Gatekeeper | None = None) -> tuple[zmq.Socket, zmq.Socket]:
    """The controller's side: (from the trainer, batches to it), two ROUTERs; CURVE servers accepting only
    the trainer's key when `gate` is given.

    The batch ROUTER is ROUTER_MANDATORY: a batch for a routing id not connected raises EHOSTUNREACH
    instead of vanishing, and one for a trainer that stopped taking them blocks up to
    `send_timeout_s` (the trainer's queue is full) and then raises `zmq.Again`.
    """
    from_trainer = make_socket(ctx, zmq.ROUTER, net.addr(net.trainer_port, bind=True), bind=True,
                               max_message_bytes=net.max_message_bytes, curve=gate and gate.server("trainer"))
    try:
        to_trainer = make_socket(ctx, zmq.ROUTER, net.addr(net.batch_port, bind=True), bind=True,
                                 max_message_bytes=net.max_message_bytes, curve=gate and gate.server("batch"))
    except OSError:
        from_trainer.close()
        raise
    to_trainer.setsockopt(zmq.ROUTER_MANDATORY, 1)
    to_trainer.setsockopt(zmq.SNDTIMEO, int(send_timeout_s * 1000))
    return from_trainer, to_trainer


@dataclass
class Pulse:
    """When a peer was last heard from, and when to probe it next (times from `time.monotonic`).

    Lost once silent for more than `limit()`: `silence_s`, plus `grace_s` before its first word (a peer
    started later by hand, or still loading on a busy machine). Only the waiting side counts silence, so
    each wait starts the clock anew (`restart`)."""

    probe_s: float
    silence_s: float
    grace_s: float = 0.0
    last_heard: float = 0.0
    heard_once: bool = False
    last_probe: float = -math.inf

    def restart(self, now: float) -> None:
        """A wait begins: silence is counted from now (or from the last word, if later)."""
        self.last_heard = max(self.last_heard, now)

    def heard(self, now: float) -> None:
        self.last_heard, self.heard_once = now, True

    def limit(self) -> float:
        return self.silence_s + (0.0 if self.heard_once else self.grace_s)

    def lost(self, now: float) -> bool:
        return now - self.last_heard > self.limit()

    def probe_due(self, now: float) -> bool:
        """True every `probe_s` (and the first time): the caller sends its probe then."""
        if now - self.last_probe < self.probe_s:
            return False
        self.last_probe = now
        return True


def await_controller(to_ctrl: zmq.Socket, batches: zmq.Socket, pulse: Pulse, role: str,
                     lost: Callable[[float], Exception]) -> str | None:
    """Probe the controller (a Ping on `to_ctrl` every `pulse.probe_s`) until it answers on `batches`; return
    the session of its answer. Silence past `pulse.limit()` raises `lost(seconds silent)`. Anything else
    arriving before the hello (a batch of a controller this trainer never said hello to) is rejected."""
    pulse.restart(time.monotonic())
    while True:
        now = time.monotonic()
        if pulse.lost(now):
            raise lost(now - pulse.last_heard)
        if pulse.probe_due(now):
            try_send(to_ctrl, P.Ping())
        if not batches.poll(int(pulse.probe_s * 1000) + 1):
            continue
        _, msg = parse(batches.recv_multipart(copy=False), role)
        if msg is None:  # counted by parse
            continue
        if isinstance(msg.body, P.Ping):
            pulse.heard(time.monotonic())
            return msg.body.session
        reject(role, "unexpected_type", f"{msg.type} before the trainer's hello")
