"""The controller: its sockets and parts, the poll loop, the rollout servers' messages, and the run's end.

It is the only process that knows the global version and the staleness bound. One thread runs a
poll loop over the rollout ROUTER and the trainer's ROUTER; the work itself lives in its parts:
`Rollouts` (admission, dispatch, results, scoring), `WeightSync` (weights to servers),
`RunCounters` (the counts, checkpointed through the trainer and restored on resume) and
`TrainerSide` (controller/trainer_side.py: the trainer's hello and messages, the batches sent to it).
"""
from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

import zmq

from areal_py.config import Config, dump_config
from areal_py.model_dir import context_length, model_path, vocab_size
from areal_py.models import load_tokenizer
from areal_py.tasks.base import Task, build_task
from areal_py.telemetry.dashboard import start_dashboard, stop_dashboard
from areal_py.telemetry.http_auth import http_token
from areal_py.telemetry.prom import CONTROLLER as M
from areal_py.telemetry.report import write_report
from areal_py.telemetry.skips import skipped_lines
from areal_py.wire import protocol as P
from areal_py.wire.curve import Gatekeeper
from areal_py.wire.trainer_link import bind_trainer
from areal_py.wire.transport import WaitTimeout, make_socket, parse, reject, send
from controller.activity import ActivityTracker
from controller.admission import AdmissionError, LengthGate
from controller.episodes import build_episode_runner
from controller.result_check import Invalid, ResultLimits, check_result, check_version
from controller.reward_pool import RewardPool
from controller.rollouts import Rollouts
from controller.run_state import RunCounters
from controller.servers import ServerRegistry, ServerState
from controller.trainer_side import TrainerSide
from controller.trainer_watch import TrainerLost, TrainerWatch
from controller.weight_sync import WeightSync

__all__ = ["AdmissionError", "Controller"]

log = logging.getLogger("controller")
ROLE = "controller"


class Controller(TrainerSide):
    def __init__(self, cfg: Config, task: Task | None = None, tokenizer=None) -> None:
        self.cfg = cfg
        task = task or build_task(cfg)
        tokenizer = tokenizer or load_tokenizer(model_path(cfg))
        self.vocab_size = vocab_size(cfg) or len(tokenizer)  # bound on the token ids a Result may carry
        gate = LengthGate(context_length(cfg), cfg.controller.max_consecutive_skipped_prompts,
                          getattr(task, "name", type(task).__name__))
        self.skipped_bad_lines = skipped_lines(task)  # left out by the task's loader: counted once, per start
        if self.skipped_bad_lines:
            M.skipped_prompts.labels(reason="bad_line").inc(self.skipped_bad_lines)
            log.warning("task %s left out %d malformed data line(s) at load (ctrl_skipped_bad_lines; `areal-py "
                        "check` lists them)", gate.task_name, self.skipped_bad_lines)
        self.n = cfg.controller.group_size
        self.batch_size = cfg.controller.batch_size
        self.max_staleness = cfg.effective_max_staleness  # admission
        self.max_token_staleness = cfg.effective_max_token_staleness  # hard drop limit (>= max_staleness)
        self.total_steps = cfg.trainer.total_steps
        self.registry = ServerRegistry(cfg.controller.server_timeout_s)
        rc = cfg.reward
        self.rewards = RewardPool(rc.functions, task, workers=rc.workers, timeout_s=rc.timeout_s,
                                  reward_model={"path": rc.reward_model_path} if rc.reward_model_path else None,
                                  answer=rc.answer.extraction())

        net, ctx = cfg.net, zmq.Context.instance()
        cap = net.max_message_bytes
        # net.keys_dir: CURVE on every socket, each accepting only its listed client keys (areal_py/wire/curve.py)
        self.gate = Gatekeeper.from_config(net.keys_dir, ctx)
        self.router = make_socket(ctx, zmq.ROUTER, net.addr(net.rollout_port, bind=True), bind=True, max_message_bytes=cap,
                                  curve=self.gate and self.gate.server("rollout"))
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.pub = make_socket(ctx, zmq.PUB, net.addr(net.weights_port, bind=True), bind=True, max_message_bytes=cap,
                               curve=self.gate and self.gate.server("weights"))
        # ROUTERs: trainer messages accepted from, and batches sent to, the trainer's routing id alone
        self.from_trainer, self.to_trainer = bind_trainer(ctx, net, send_timeout_s=cfg.trainer.batch_timeout_s,
                                                          gate=self.gate)
        self.trainer_id: bytes | None = None  # routing id of the trainer's hello (areal_py/wire/trainer_link.py)
        # this process's id, on every message to a peer: one hearing another id knows the controller restarted
        # and rejoins; a server ignores what a dead controller sent (rollout_server/server.py)
        self.session = secrets.token_hex(8)

        self.counts = RunCounters()  # restored from the trainer's checkpoint on resume (see start)
        # rollout.workflow: multi-turn episodes on threads, each turn a Generate (None: single_turn, native)
        episodes = build_episode_runner(cfg, tokenizer, context_length(cfg), self.vocab_size)
        self.rollouts = Rollouts(cfg, task, tokenizer, gate, self.registry, self.rewards, self.counts, self._to_server,
                                 episodes=episodes)
        self.weights = WeightSync(self.pub, self.registry, self.counts, self._to_server,
                                  max_token_staleness=self.max_token_staleness,
                                  sync_timeout_s=cfg.controller.weight_sync_timeout_s, session=self.session)
        self.activity = ActivityTracker()  # servers' generation spans and slot use since the last batch
        self.trainer_done = False
        self.last_ping = 0.0
        self.trainer_watch = TrainerWatch(cfg.controller.trainer_timeout_s, probe_s=cfg.rollout.heartbeat_s)

    def _to_server(self, server: ServerState, body, tensors: dict | None = None) -> None:
        if "session" in type(body).model_fields:
            body = body.model_copy(update={"session": self.session})
        try:
            send(self.router, body, tensors, to=server.server_id.encode())
        except zmq.ZMQError as e:  # unroutable: the server is gone; expiry will move its work
            log.warning("cannot reach %s: %s", server.server_id, e)

    # --- rollout side ------------------------------------------------------------------------------
    def newest_version(self) -> int:
        """The newest policy version that exists: the trainer's last published weights, or its start."""
        w = self.weights.latest
        return max(self.counts.base_version, w.version if w is not None else 0)

    def result_limits(self) -> ResultLimits:
        return ResultLimits(group_size=self.n, max_new_tokens=self.cfg.rollout.max_new_tokens,
                            vocab_size=self.vocab_size, newest_version=self.newest_version())

    def on_rollout(self, sender: bytes, msg: P.Message) -> None:
        """A message from a rollout server, checked before it counts (controller/result_check.py). Only a
        hello registers a server: a heartbeat, result or load report from an id never registered is rejected
        (unknown_server), so a forged message cannot add a member the weight sync waits for, and after a
        restart a server's work for the dead controller, queued on its socket, cannot slip in before it
        rejoins. An awaited result that fails a check sends its group to be generated again."""
        server_id = sender.decode(errors="replace")
        body = msg.body
        known = server_id in self.registry.servers
        if isinstance(body, (P.Hello, P.Heartbeat, P.WeightsLoaded)):
            version = body.version
            if isinstance(body, P.Hello) and body.rejoin and version > self.newest_version() > 0:
                # its weights come from steps this run rolled back (the controller restarted from an older
                # checkpoint): none of them is usable, so it counts as the start's weights, below every
                # version a resumed run holds: it is sent the newest and takes no work before loading them
                log.info("server %s rejoins with version %d, past this controller's %d: sending it the newest "
                         "weights", server_id, version, self.newest_version())
                version = 0
            bad = check_version(version, self.newest_version(), f"{msg.type} from {server_id}")
            if bad is None and not known and not isinstance(body, P.Hello):
                # a heartbeat or load report queued while the controller was away, or forged: only a hello joins
                bad = Invalid("unknown_server", f"{msg.type} from {server_id}, which never said hello")
            if bad is not None:
                reject(ROLE, bad.reason, bad.detail)
                return
            server, fresh = self.registry.seen(server_id, version)
            if isinstance(body, P.Hello):
                server.engine_path = body.engine_path
            if fresh:
                log.info("server %s joined at version %d", server_id, body.version)
            if isinstance(body, P.Heartbeat):
                self.activity.add(server_id, body, received=time.time())
                self.rollouts.clocks.held(server_id, body.held, time.monotonic())  # controller/progress.py
            self.weights.catch_up(server, force=fresh)
        elif isinstance(body, P.Result):
            if not known:
                reject(ROLE, "unknown_server", f"result {body.gid}:{body.attempt}:{body.idx} from {server_id}, "
                       "which never said hello")
                return
            bad = check_result(body, self.result_limits())
            if bad is not None:
                reject(ROLE, bad.reason, f"{bad.detail} (from {server_id})")
                self.rollouts.on_invalid_result(server_id, body)
                return
            self.registry.seen(server_id)
            self.rollouts.on_result(server_id, body)
        else:
            reject(ROLE, "unexpected_type", f"{msg.type} from {server_id} on the rollout socket")

    def check_servers_present(self) -> None:
        """Stop once no server has been live for `controller.no_server_timeout_s` since the last word of any.

        Before any server has spoken the startup timeout (_serve) applies instead. Without this, a
        controller started by hand whose only server died would idle forever, admitting nothing.
        """
        if not self.registry.servers or self.registry.live():
            return
        timeout = self.cfg.controller.no_server_timeout_s
        last = max(s.last_live for s in self.registry.servers.values())
        if time.monotonic() - last > timeout:
            evicted = sorted(s.server_id for s in self.registry.servers.values() if s.evicted_until is not None)
            silent = sorted(set(self.registry.servers) - set(evicted))
            why = [(f"{', '.join(silent)} went silent (dead after controller.server_timeout_s="
                    f"{self.registry.timeout_s:g}s)")] if silent else []
            if evicted:
                why.append(f"{', '.join(evicted)} did not load the newest weights within controller."
                           f"weight_sync_timeout_s={self.weights.sync_timeout_s:g}s (evicted; their logs say why)")
            raise WaitTimeout(f"controller: timed out after {timeout:.0f}s waiting for a live rollout server: "
                              f"{'; '.join(why)}, and none came back")

    def evict_laggards(self) -> None:
        """Evict each live server that has not loaded the newest weights within controller.weight_sync_timeout_s:
        its groups go to the others, and it rejoins once it reports those weights (it is still sent them).
        Waiting for it would stall the run, failing would let one server end it."""
        w = self.weights.latest
        for s in self.weights.laggards():
            log.error("server %s still at version %d, %.0fs after weight version %d was sent: evicted, "
                      "re-dispatching its %d groups", s.server_id, s.version, self.weights.sync_timeout_s, w.version,
                      len(s.inflight))
            M.evicted_servers.inc()
            self.registry.evict(s, w.version)
            self.rollouts.move_work(s, "evicted")

    def ping(self) -> None:
        """Tell every server the controller lives, every `rollout.heartbeat_s`.

        Broadcast on the weights PUB, so it reaches servers not yet registered too; called from every
        wait of the controller's (the poll loop, the trainer's hello), never from one that can block long.
        """
        now = time.monotonic()
        if now - self.last_ping >= self.cfg.rollout.heartbeat_s:
            self.last_ping = now
            send(self.pub, P.Ping(session=self.session))

    def step(self, timeout_ms: int = 10) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.from_trainer, zmq.POLLIN)
        events = dict(poller.poll(timeout_ms))
        while events:
            if self.from_trainer in events:
                sender, msg = parse(self.from_trainer.recv_multipart(copy=False), ROLE, routed=True)
                if msg is not None and sender is not None:
                    self.on_trainer(sender, msg)
            if self.router in events:
                frames = self.router.recv_multipart(copy=False)
                sender, msg = parse(frames, ROLE, routed=True)
                if msg is not None and sender is not None and (self.gate is None or self.gate.sender_fits(sender, frames)):
                    self.on_rollout(sender, msg)
            self.ping()  # even while a flood of messages keeps this loop going
            events = dict(poller.poll(0))
        self.ping()
        ro = self.rollouts
        ro.expire_servers()
        ro.expire_attempts()
        self.check_servers_present()
        for s in self.registry.live():
            self.weights.catch_up(s)
        self.evict_laggards()
        ro.harvest_rewards()
        ro.admit()
        ro.dispatch()
        self.assemble_batches()
        self.export_gauges()

    def export_gauges(self) -> None:
        c, ro = self.counts, self.rollouts
        M.admitted_groups.set(c.next_gid)
        M.running_groups.set(c.running)
        M.accepted_groups.set(c.accepted)
        M.staleness_capacity_groups.set(ro.capacity())
        M.queue_depth.labels(queue="undispatched").set(len(ro.undispatched))
        M.queue_depth.labels(queue="scoring").set(len(ro.scoring))
        M.queue_depth.labels(queue="ready").set(len(ro.ready))
        for s in self.registry.live():
            M.server_policy_version.labels(server=s.server_id).set(s.version)
        if ro.version is not None:
            M.policy_version.set(ro.version)

    def serve(self) -> None:
        self._record_config()
        dash = self._start_dashboard()
        try:
            self._serve()
        finally:
            if dash is not None:
                stop_dashboard(dash)
            self.write_report()

    def _record_config(self) -> None:
        """Write ``<run_dir>/config.yaml`` when nothing has: `areal-py run` writes it before any role
        starts, roles started by hand do not, and the dashboard and report read it (config table,
        why a chart is 0 by construction). An existing file is never replaced."""
        path = self.cfg.run_dir() / "config.yaml"
        if not path.exists():
            try:
                dump_config(self.cfg, path)
            except OSError as e:
                log.warning("config not recorded in %s: %s", path, e)

    def write_report(self) -> Path | None:
        """``<run_dir>/report.html`` from the run as it stands, at the end of every serve (finished,
        failed or stopped): roles started by hand have no launcher to write it. Rewriting it is
        harmless (atomic, from the same files), so `areal-py run` writing it again after all
        processes have exited costs nothing. The trainer writes metrics.jsonl: with no copy in this
        machine's run directory (roles on machines that share no filesystem) there is nothing to
        draw, and the log says where to run the report instead."""
        run_dir = self.cfg.run_dir()
        if not (run_dir / "metrics.jsonl").exists():
            log.info("no report: %s has no metrics.jsonl (the trainer writes it); where it does, run "
                     "`python -m areal_py.telemetry.report <run_dir>`", run_dir)
            return None
        try:
            path = write_report(run_dir)
        except Exception as e:  # noqa: BLE001 - the report must never fail a run, nor hide why it failed
            log.warning("report not written: %s: %s", type(e).__name__, e)
            return None
        log.info("report %s", path)
        return path

    def _start_dashboard(self):
        port = self.cfg.run.dashboard_port
        if not port:
            return None
        try:
            dash, port = start_dashboard(self.cfg.run_dir(), port, host=self.cfg.net.bind_host,
                                         token=http_token(self.cfg.net))
        except OSError as e:  # a busy port must not stop a training run (no token off loopback does: HttpAuthError)
            log.warning("live dashboard not started on port %d: %s", port, e)
            return None
        log.info("live dashboard on http://%s:%d/", self.cfg.net.bind_host, port)
        return dash

    def _serve(self) -> None:
        self.start()
        deadline = time.monotonic() + self.cfg.controller.startup_timeout_s
        keep_servers = False  # the trainer lost: servers stay up to rejoin a controller restarted with --resume
        try:
            while not self.trainer_done:
                self.step()
                if not self.registry.servers and time.monotonic() > deadline:
                    raise WaitTimeout(f"controller: timed out after {self.cfg.controller.startup_timeout_s:.0f}s "
                                      f"waiting for a rollout server to connect")
                self.check_trainer()
        except TrainerLost:
            keep_servers = True
            raise
        finally:
            self.close(shutdown_servers=not keep_servers)

    def close(self, shutdown_servers: bool = True) -> None:
        for s in self.registry.live() if shutdown_servers else ():
            self._to_server(s, P.Shutdown(reason="run finished"))
        self.rewards.close()
        if self.rollouts.episodes is not None:
            self.rollouts.episodes.close()
        self.router.close(linger=1000)  # let the shutdown notices leave
        for sock in (self.pub, self.from_trainer, self.to_trainer):
            sock.close()
        if self.gate is not None:
            self.gate.stop()
