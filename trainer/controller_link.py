"""Trainer rank 0's link to the controller: the batch intake and the watch on the controller's liveness.

The two sockets (areal_py/wire/trainer_link.py: hello, weights, done and probes to the controller; batches
and the answers to the probes from it), the controller's session as last heard, and the batches that
overtook an earlier one. The step loop (trainer/trainer.py) asks it for the batch of each version.

Invariants:
- while a batch is awaited the controller is probed every rollout.heartbeat_s; silence past
  trainer.controller_timeout_s ends the wait with ControllerLost, and trainer.batch_timeout_s bounds it
  whatever the controller says;
- an answer under a session other than the one heard before raises ControllerRestarted (the trainer then
  rolls back and says its hello again, `Trainer.rejoin`);
- a batch for a later version, at most max_staleness ahead, is kept for its turn (the controller sends
  each batch once); a copy of one kept, one further ahead, an older one or anything else is rejected and
  counted: nothing is dropped uncounted.
"""
from __future__ import annotations

import time

import zmq

from areal_py.config import Config
from areal_py.wire import protocol as P
from areal_py.wire.trainer_link import Pulse, await_controller, connect_trainer
from areal_py.wire.transport import ControllerLost, WaitTimeout, parse, reject, try_send
from trainer.checkpoint import checkpoint_dirs

ROLE = "trainer"


def controller_pulse(cfg: Config) -> Pulse:
    """The trainer's watch on the controller: probed every rollout.heartbeat_s, lost after
    trainer.controller_timeout_s of silence (controller.startup_timeout_s more before its first word)."""
    return Pulse(probe_s=cfg.rollout.heartbeat_s, silence_s=cfg.trainer.controller_timeout_s,
                 grace_s=cfg.controller.startup_timeout_s)


def lost_controller(cfg: Config, version: int, silent_s: float, doing: str = "") -> str:
    """ControllerLost's message for a trainer at `version`: the bound, what is kept, what is lost, how to resume.
    The trainer writes no checkpoint then: one without the controller's buffer would lose the groups in flight,
    while the latest checkpoint holds them."""
    ckpts = checkpoint_dirs(cfg.run_dir() / "checkpoints")
    kept = (f"kept: {ckpts[0]}, the latest checkpoint (weights, optimizer, data position and the controller's "
            "groups in flight at that step); lost: the steps trained since it and what the controller held since, "
            "both trained again from it on resume, nothing admitted is skipped" if ckpts else
            "no checkpoint was written yet, so nothing is kept: start the run again (without --resume)")
    return (f"{ROLE}: lost the controller at {cfg.net.addr(cfg.net.trainer_port)}: nothing from it for "
            f"{silent_s:.0f}s {doing or f'while waiting for batch {version}'} (trainer.controller_timeout_s="
            f"{cfg.trainer.controller_timeout_s:g}; it died, hangs or cannot be reached); {kept}. Resume with "
            f"`areal-py run --resume run.name={cfg.run.name}`, or, roles started by hand, start the controller and "
            "servers again and the trainer with `areal-py serve trainer <config> --resume`")


class ControllerRestarted(Exception):
    """The controller answered a probe under a session other than the one this trainer said hello to."""

    def __init__(self, session: str) -> None:
        super().__init__(f"the controller restarted (session {session})")
        self.session = session


class ControllerLink:
    """Rank 0's sockets to the controller, its session and the batches held for their turn (see the module)."""

    def __init__(self, cfg: Config, to_ctrl: zmq.Socket, batches: zmq.Socket) -> None:
        self.cfg = cfg
        self.to_ctrl, self.batches = to_ctrl, batches
        self.pulse = controller_pulse(cfg)
        self.controller_session: str | None = None  # from its answers to probes; another one: it restarted
        self.ahead: dict[int, P.Batch] = {}  # batches that overtook an earlier one on the link, by version

    @classmethod
    def connect(cls, cfg: Config) -> ControllerLink:
        """Two DEALERs under one random routing id (areal_py/wire/trainer_link.py)."""
        return cls(cfg, *connect_trainer(zmq.Context.instance(), cfg.net))

    def await_controller(self, version: int) -> None:
        """Before a hello: probe until the controller answers, and take its session as the one the hello goes to,
        so an answer under another one later is a restart, however soon after the hello it came."""
        self.controller_session = await_controller(
            self.to_ctrl, self.batches, self.pulse, ROLE,
            lambda silent: ControllerLost(lost_controller(self.cfg, version, silent, "before its hello")))

    def next_batch(self, version: int) -> tuple[P.Batch, float]:
        """The batch for `version` and the seconds waited for it. While waiting, the controller is probed (a Ping
        on the trainer link every rollout.heartbeat_s, answered on the batch link; areal_py/wire/trainer_link.py):
        silence past trainer.controller_timeout_s ends the wait with ControllerLost, and trainer.batch_timeout_s
        bounds it whatever the controller says.

        A batch for a later version that arrives first (it overtook the one before it: a reordering link, a
        reconnect) is kept for its turn, not thrown away: the controller sends each batch once. The controller
        forms batches at most max_staleness versions past the trainer's (the admission bound), so at most that
        many are kept; anything further, or older, is rejected."""
        t0 = time.perf_counter()
        for v in [v for v in self.ahead if v < version]:
            del self.ahead[v]
        if version in self.ahead:
            return self.ahead.pop(version), time.perf_counter() - t0
        start = time.monotonic()
        self.pulse.restart(start)
        deadline = start + self.cfg.trainer.batch_timeout_s
        while True:
            now = time.monotonic()
            if self.pulse.lost(now):
                raise ControllerLost(lost_controller(self.cfg, version, now - self.pulse.last_heard))
            if now >= deadline:
                raise WaitTimeout(f"{ROLE}: timed out after {self.cfg.trainer.batch_timeout_s:.0f}s waiting for batch "
                                  f"{version} from the controller at {self.cfg.net.addr(self.cfg.net.batch_port)}")
            if self.pulse.probe_due(now):
                try_send(self.to_ctrl, P.Ping())
            if not self.batches.poll(int(min(self.pulse.probe_s, deadline - now) * 1000) + 1):
                continue
            _, msg = parse(self.batches.recv_multipart(copy=False), ROLE)
            if msg is None:  # counted by parse
                continue
            self.pulse.heard(time.monotonic())
            if isinstance(msg.body, P.Ping):  # the controller's answer to a probe
                session = msg.body.session
                if session is not None and self.controller_session not in (None, session):
                    raise ControllerRestarted(session)
                self.controller_session = session or self.controller_session
                continue
            if isinstance(msg.body, P.Batch) and msg.body.version == version:
                return msg.body, time.perf_counter() - t0
            if (isinstance(msg.body, P.Batch) and msg.body.version not in self.ahead
                    and 0 < msg.body.version - version <= self.cfg.effective_max_staleness):
                self.ahead[msg.body.version] = msg.body
                continue
            detail = f"batch for version {msg.body.version}" if isinstance(msg.body, P.Batch) else msg.type
            reject(ROLE, "unexpected_type", f"{detail} while waiting for batch {version}")

    def close(self) -> None:
        self.to_ctrl.close(linger=2000)  # let the last messages leave
        self.batches.close()
