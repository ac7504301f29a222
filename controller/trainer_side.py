"""The controller's trainer side: the trainer's hello (and resume from it), its messages, its liveness, and
the batches assembled and sent to it. Mixed into `Controller` (controller/controller.py), whose poll loop
calls it; it reads and writes the controller's parts listed below, which `Controller.__init__` sets.

Invariants: only the routing id of the first TrainerHello is the trainer (any other sender on the trainer
port is rejected and counted, areal_py/wire/trainer_link.py); batches go to that id alone, each once, numbered
by the trainer version that trains it and never past trainer.total_steps; a batch whose state the trainer
checkpoints carries every admitted group not yet trained or dropped, so a resume from it loses none.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import zmq

from areal_py.config import Config
from areal_py.telemetry.prom import CONTROLLER as M
from areal_py.wire import protocol as P
from areal_py.wire.transport import WaitTimeout, recv, reject, send, try_send
from controller.activity import ActivityTracker
from controller.batching import pick_batch
from controller.reward_pool import RewardPool
from controller.rollouts import Rollouts
from controller.run_state import RunCounters
from controller.servers import ServerRegistry, ServerState
from controller.trainer_watch import TrainerLost, TrainerWatch, link_up
from controller.weight_sync import WeightSync

log = logging.getLogger("controller")
ROLE = "controller"


def generic_engine_servers(live: list[ServerState]) -> int | None:
    """How many of the `live` servers run the generic Hugging Face forward (None: none said its path)."""
    said = [s.engine_path for s in live if s.engine_path is not None]
    return sum(p == "generic" for p in said) if said else None


class TrainerSide:
    """The trainer's side of `Controller` (see the module): mixed in, so its methods are the controller's."""

    # set by Controller.__init__
    cfg: Config
    batch_size: int
    n: int
    total_steps: int
    max_staleness: int
    max_token_staleness: int
    skipped_bad_lines: int
    counts: RunCounters
    rollouts: Rollouts
    rewards: RewardPool
    registry: ServerRegistry
    activity: ActivityTracker
    weights: WeightSync
    from_trainer: zmq.Socket
    to_trainer: zmq.Socket
    trainer_id: bytes | None
    trainer_watch: TrainerWatch
    session: str
    trainer_done: bool
    ping: Callable[[], None]  # Controller.ping: the servers hear the controller lives during every wait

    # --- batches -----------------------------------------------------------------------------------
    def assemble_batches(self) -> None:
        """Send every batch the ready groups can fill (selection rule: `controller.batching`)."""
        c, ro = self.counts, self.rollouts
        while len(ro.ready) >= self.batch_size and c.next_batch_version < self.total_steps:
            b = c.next_batch_version
            pick = pick_batch(ro.ready, b, self.batch_size, self.max_token_staleness)
            if pick.dropped:
                c.drop("stale", [g.prompt_index for g in pick.stale])
            c.accepted -= pick.dropped
            ro.ready.clear()
            ro.ready.extend(pick.remaining)
            if not pick.groups:
                return
            groups = pick.groups
            for age in pick.ages:
                M.sample_staleness.observe(age)
            M.reward_mean.set(sum(s.reward for g in groups for s in g.samples) / (self.batch_size * self.n))
            state = c.snapshot(reward_timeouts=self.rewards.timeouts, reward_errors=self.rewards.errors,
                               skipped_too_long=ro.skipped_too_long, skipped_bad_lines=self.skipped_bad_lines)
            live = self.registry.live()
            activity = self.activity.take(s.server_id for s in live)
            # The reward of everything scored since the last batch, groups dynamic sampling dropped
            # included: with DAPO the trained batch's reward is biased toward 0.5, this one is not.
            stats = P.BatchStats(servers_live=len(live), gen_busy_s=activity.gen_busy_s,
                                 rollout_slot_occupancy=activity.rollout_slot_occupancy,
                                 scored_reward_mean=c.take_scored_reward_mean(), gen_tokens=dict(c.gen_tokens_by_server),
                                 generic_engine_servers=generic_engine_servers(live),
                                 **(ro.episodes.tally.take() if ro.episodes is not None else {}))
            self.send_batch(P.Batch(version=b, groups=groups, state=state, stats=stats, gen_spans=activity.spans,
                                    **self.ledger_fields(b)))
            c.next_batch_version += 1

    def send_batch(self, batch: P.Batch) -> None:
        """Send `batch` to the trainer alone (its routing id), waiting up to trainer.batch_timeout_s.

        Unroutable (the trainer's batch link not connected yet, or reconnecting) is retried, pinging the
        servers meanwhile; a trainer whose queue stays full blocks the send itself (SNDTIMEO)."""
        timeout = self.cfg.trainer.batch_timeout_s
        deadline = time.monotonic() + timeout
        while True:
            try:
                send(self.to_trainer, batch, to=self.trainer_id)
                return
            except zmq.Again:
                pass
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH:
                    raise
                if time.monotonic() < deadline:
                    self.ping()
                    time.sleep(0.05)
                    continue
            raise WaitTimeout(f"controller: timed out after {timeout:.0f}s waiting for the trainer to take batch "
                              f"{batch.version} on {self.cfg.net.addr(self.cfg.net.batch_port, bind=True)}")

    def ledger_fields(self, b: int) -> dict:
        """What batch `b` carries besides its groups: the prompts dropped since the previous batch (the
        ledger) and, when the trainer checkpoints this batch's state (version b + 1), every admitted group
        not yet trained or dropped, so a resume from that checkpoint loses none (controller/rollouts.py)."""
        buffer = self.rollouts.snapshot() if self.cfg.trainer.checkpoints_at(b + 1) else None
        return {"dropped_prompts": self.counts.take_dropped(), "buffer": buffer}

    def resume(self, hello: P.TrainerHello) -> None:
        """Go on from the trainer's version and, on resume, its checkpoint's counters and buffer: the
        buffer's groups wait for a batch or generate their missing samples again, nothing admitted is lost."""
        self.counts.restore(hello.version, self.batch_size, hello.resume_state, hello.resume_buffer)
        if hello.resume_state is not None:
            self.rollouts.length_gate.total = hello.resume_state.skipped_too_long
        if hello.resume_buffer is not None:
            self.rollouts.restore(hello.resume_buffer)

    # --- trainer side ------------------------------------------------------------------------------
    def on_trainer(self, sender: bytes, msg: P.Message) -> None:
        """A message on the trainer port: accepted only from the routing id that said the trainer's hello."""
        body = msg.body
        if sender != self.trainer_id:
            reject(ROLE, "not_trainer", f"{msg.type} from {sender!r}, not the trainer ({self.trainer_id!r})")
            return
        self.trainer_watch.heard(time.monotonic())
        if isinstance(body, P.Ping):  # the waiting trainer's probe: answered on the batch link, never blocking
            try_send(self.to_trainer, P.Ping(session=self.session), to=self.trainer_id)
        elif isinstance(body, P.WeightsReady):
            self.weights.publish(body, msg.tensors)
        elif isinstance(body, P.TrainerDone):
            log.info("trainer finished at version %d", body.version)
            self.trainer_done = True
        elif isinstance(body, P.TrainerHello):
            reject(ROLE, "unexpected_type", "a second trainer hello")
        else:
            reject(ROLE, "unexpected_type", f"{msg.type} on the trainer socket")

    def start(self) -> None:
        """Wait for the trainer's hello: it fixes the starting version and, on resume, the counters.

        A probe (Ping) before it is answered with this controller's session: a running trainer whose
        controller restarted learns so from it, rolls back to its latest checkpoint and says the hello of a
        resume (docs/operations.md). Anything else before the hello (a running trainer's queued weights
        notice, a forgery) is rejected."""
        sender, msg = recv(self.from_trainer, ROLE, timeout_s=self.cfg.controller.startup_timeout_s, tick=self.ping,
                           routed=True, waiting_for="the trainer's hello on "
                                                    f"{self.cfg.net.addr(self.cfg.net.trainer_port, bind=True)}")
        while not isinstance(msg.body, P.TrainerHello):
            if isinstance(msg.body, P.Ping) and sender is not None:
                try_send(self.to_trainer, P.Ping(session=self.session), to=sender)
            else:
                reject(ROLE, "unexpected_type", f"{msg.type} before the trainer's hello")
            sender, msg = recv(self.from_trainer, ROLE, timeout_s=self.cfg.controller.startup_timeout_s,
                               tick=self.ping, routed=True, waiting_for="the trainer's hello")
        self.trainer_id = sender
        self.trainer_watch.heard(time.monotonic())
        hello: P.TrainerHello = msg.body
        self.resume(hello)
        c = self.counts
        log.info("trainer at version %d; data position %d, accepted %d, max_staleness %d, max_token_staleness %d",
                 hello.version, c.data_position, c.accepted, self.max_staleness, self.max_token_staleness)

    def check_trainer(self) -> None:
        """Stop with TrainerLost once the trainer has been silent past controller.trainer_timeout_s and its
        link is down (controller/trainer_watch.py): under `serve` no launcher would notice, and the controller
        would wait for ever. Nothing is saved here: the trainer's checkpoints hold the state a resume needs."""
        w = self.trainer_watch
        if not w.lost(time.monotonic(), lambda: link_up(self.to_trainer, self.trainer_id, P.Ping(session=self.session))):
            return
        silent = time.monotonic() - w.last_heard
        raise TrainerLost(
            f"controller: TrainerLost: no message from the trainer for {silent:.0f} s and its link is down "
            f"(controller.trainer_timeout_s={w.timeout_s:g}; it died or cannot be reached). The state a resume needs "
            f"is in the trainer's latest checkpoint under {self.cfg.run_dir() / 'checkpoints'} (weights, counters and "
            "the groups in flight at that step); what this controller held since is generated again from it. The "
            "rollout servers are left running to rejoin: start the controller again with `areal-py serve controller "
            "<config> --resume` and the trainer with `areal-py serve trainer <config> --resume` (with the launcher: "
            f"`areal-py run --resume run.name={self.cfg.run.name}`)")
