"""The rollout server: an engine loop that talks to the controller over ZeroMQ.

One thread does everything, in order: drain incoming messages, run one engine step, stream the
finished samples back. Weight updates are therefore applied between two engine steps, which is
the "step boundary" at which in-flight requests are interrupted and resumed under new weights.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import torch
import zmq

from areal_py.config import Config
from areal_py.model_dir import model_path
from areal_py.models import eos_token_id, load_model_and_tokenizer, load_tokenizer
from areal_py.telemetry.gen_activity import BusyMeter
from areal_py.telemetry.prom import ROLLOUT as M
from areal_py.wire import protocol as P
from areal_py.wire.curve import client_curve
from areal_py.wire.dist_weights import DistRejected, DistWeightsError, WeightGroup, model_specs, server_rank
from areal_py.wire.transport import ControllerLost, make_socket, parse, reject, send
from areal_py.wire.weight_files import WeightFileError, load_verified, read_verified
from rollout_server.backend import Backend, Finished, WeightSource
from rollout_server.kernel_report import KernelReport, engine_path, export_prometheus, write_report
from rollout_server.sampling import SamplingParams

log = logging.getLogger("rollout")
ROLE = "rollout"


def request_id(gid: int, attempt: int, idx: int) -> str:
    return f"{gid}:{attempt}:{idx}"


def parse_request_id(rid: str) -> tuple[int, int, int]:
    gid, attempt, idx = (int(x) for x in rid.split(":"))
    return gid, attempt, idx


def held_attempts(rids: set[str]) -> list[tuple[int, int]]:
    """The (gid, attempt) pairs of the held request ids, for the heartbeat: the controller re-dispatches an
    attempt that neither shows up here nor sends results for controller.group_timeout_s (a lost Generate)."""
    return sorted({parse_request_id(r)[:2] for r in rids})[:P.MAX_HELD_ATTEMPTS]


def build_engine(cfg: Config, seed: int) -> Backend:
    """The generation backend the config asks for (`rollout.backend`)."""
    path = model_path(cfg)
    if cfg.rollout.backend == "sglang":
        # lazy: sglang is an optional GPU extra
        from rollout_server.sglang_engine.engine import SGLangEngine

        return SGLangEngine(str(path), eos_token_id=eos_token_id(load_tokenizer(path)),
                            max_running=cfg.rollout.max_running, seed=seed, base_url=cfg.rollout.sglang_url or None)
    from rollout_server.torch_engine.engine import Engine

    model, tokenizer = load_model_and_tokenizer(path, dtype=cfg.model.dtype)
    engine = Engine(model, eos_token_id(tokenizer), max_running=cfg.rollout.max_running, seed=seed,
                    interrupt_mode=cfg.rollout.interrupt_mode, compile_decode=cfg.rollout.compile_decode,
                    decode_attention=cfg.rollout.decode_attention,
                    kernel_cache=Path(cfg.model.cache_dir).expanduser() / "kernels.json")
    log.info("torch engine (%d threads): %s", torch.get_num_threads(), engine.kernel_summary())
    return engine


class RolloutServer:
    def __init__(self, cfg: Config, server_id: str | None = None, engine: Backend | None = None) -> None:
        self.cfg = cfg
        self.server_id = server_id or cfg.rollout.server_id
        self.engine: Backend = engine or build_engine(cfg, seed=cfg.run.seed * 1000 + sum(self.server_id.encode()))
        self.engine_path = self._report_kernels()
        self.ctx = zmq.Context.instance()
        net = cfg.net
        curve = client_curve(net.keys_dir, self.server_id)  # net.keys_dir: its own pair, or the shared rollout one
        self.dealer = make_socket(self.ctx, zmq.DEALER, net.addr(net.rollout_port), bind=False, identity=self.server_id,
                                  max_message_bytes=net.max_message_bytes, curve=curve)
        self.sub = make_socket(self.ctx, zmq.SUB, net.addr(net.weights_port), bind=False,
                               max_message_bytes=net.max_message_bytes, curve=curve)
        self.generated_tokens = 0
        self.running = True
        self._last_beat = 0.0
        self.last_heard = time.monotonic()  # any valid message from the controller, pings included
        self.heard_once = False
        self.session: str | None = None  # the controller's, from its messages: another one means it restarted
        self.dead_sessions: set[str] = set()  # those of controllers that restarted: their messages are refused
        self.held: set[str] = set()  # request ids the engine holds for the controller
        self.reload = False  # after a rejoin: load the controller's next weights whatever their version
        self.meter = BusyMeter(time.time())
        self._dist_expected: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        try:
            self.weight_group = self._join_weight_group()
        except BaseException:
            self.dealer.close(linger=0)
            self.sub.close(linger=0)
            raise
        send(self.dealer, P.Hello(server_id=self.server_id, version=self.engine.version, engine_path=self.engine_path))

    def _report_kernels(self) -> P.EnginePath:
        """An engine that chooses kernels (`kernel_choices`) has its choice logged, written to
        `<run dir>/kernels/<server id>.json` and exported as `areal_rollout_kernel_info`; the generic Hugging
        Face path is a warning. Returns the engine path the server's hello announces."""
        choices = getattr(self.engine, "kernel_choices", None)
        if not callable(choices):
            return engine_path(None)
        report = KernelReport(server_id=self.server_id, threads=torch.get_num_threads(), torch=torch.__version__,
                              choices=choices())
        path = write_report(self.cfg.run_dir(), report)
        export_prometheus(report)
        log.info("%s: kernels %s (recorded in %s)", self.server_id, report.describe(), path or "nowhere")
        kind = engine_path(report.choices)
        if kind == "generic":
            runner = next(c for c in report.choices if c.op == "runner")
            log.warning("%s: generating with the generic Hugging Face forward, not the engine's fast path (%s: %s); "
                        "it is slower and has no kernel choice or compiled decode (generic_engine_servers in "
                        "metrics.jsonl, areal_rollout_kernel_info{op=\"runner\"})", self.server_id, runner.source,
                        runner.reason or "the engine was built with fast_runner=False")
        return kind

    def _join_weight_group(self) -> WeightGroup | None:
        """weights.transfer=dist: join the weight group as rank 1 + this server's index, before saying hello
        (blocks until trainer rank 0 and every server are up, at most weights.dist_join_timeout_s). None
        when not dist, or when the group formed without this server (a restart)."""
        w = self.cfg.weights
        if w.transfer != "dist":
            return None
        model = getattr(self.engine, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"weights.transfer=dist needs a backend whose model lives in this process (the torch "
                             f"engine); {type(self.engine).__name__} has none: use weights.transfer=disk or stream")
        self._dist_expected = model_specs(model)
        rank = server_rank(self.server_id, self.cfg.rollout.num_servers)
        log.info("%s: joining the weight group at %s:%d as rank %d", self.server_id, w.dist_host, w.dist_port, rank)
        return WeightGroup.join_member(host=w.dist_host, port=w.dist_port, rank=rank,
                                       num_servers=self.cfg.rollout.num_servers, timeout_s=w.dist_timeout_s,
                                       join_timeout_s=w.dist_join_timeout_s,
                                       device=next(model.parameters()).device)

    # --- messages ------------------------------------------------------------------------------
    def _handle(self, msg: P.Message) -> None:
        body = msg.body
        session = getattr(body, "session", None)
        if session is not None and session != self.session:
            if session in self.dead_sessions:  # sent by a controller that has restarted since: its work died with it
                reject(ROLE, "old_session", f"{msg.type} from controller session {session}, which restarted as "
                       f"{self.session}")
                return
            self._new_session(session)
        if isinstance(body, P.Generate):
            self._generate(body)
        elif type(body) is P.UpdateWeights:  # not its subclass WeightsReady, the trainer's notice to the controller
            self._update_weights(body, msg.tensors)
        elif isinstance(body, P.Ping):
            pass  # heard (poll_once noted it): the controller lives
        elif isinstance(body, P.Shutdown):
            log.info("%s: shutdown requested (%s)", self.server_id, body.reason)
            self.running = False
        else:
            reject(ROLE, "unexpected_type", f"{msg.type} is not a message a rollout server accepts")

    def _new_session(self, session: str) -> None:
        """Every message of a controller carries its session. The first one heard is noted; a new one means
        the controller restarted, and its work here died with it: every held request is dropped without a
        result, and what the dead controller sent that is still queued here is refused when it comes
        (`old_session`), so none of it reaches the new controller, which knows nothing of it. Then this
        server says hello again (`rejoin`) with the version it runs, and loads the next weights it is sent
        even when their version is older: the run may have rolled back past its own (docs/operations.md)."""
        old, self.session = self.session, session
        if old is None:
            return
        self.dead_sessions.add(old)
        dropped = len(self.held)
        for rid in self.held:
            self.engine.abort(rid)
        self.held.clear()
        self.reload = True
        log.warning("%s: the controller restarted (session %s, was %s): dropped %d request(s) in flight; rejoining "
                    "at version %d", self.server_id, session, old, dropped, self.engine.version)
        send(self.dealer, P.Hello(server_id=self.server_id, version=self.engine.version,
                                  engine_path=self.engine_path, rejoin=True))

    def _generate(self, g: P.Generate) -> None:
        params = SamplingParams(max_new_tokens=g.sampling.max_new_tokens, temperature=g.sampling.temperature,
                                top_p=g.sampling.top_p)
        if g.n > self.cfg.controller.group_size:  # the controller asks for at most a group's samples
            reject(ROLE, "bad_request", f"group {g.gid}: {g.n} samples asked, controller.group_size is "
                   f"{self.cfg.controller.group_size}")
            return
        rids = [request_id(g.gid, g.attempt, idx) for idx in range(g.n)]
        # a copy of a group it runs (a duplicated message) is refused alone: the engine would refuse it below,
        # and the abort there would end the running copy's requests too, dropping a group being generated
        if any(rid in self.held for rid in rids):
            reject(ROLE, "duplicate_request", f"group {g.gid} attempt {g.attempt} is already running")
            return
        try:
            self.engine.add_group(rids, list(g.prompt_ids), params)
            self.held.update(rids)
        except ValueError as e:  # too long, duplicate...: answer so the controller never waits on it
            reject(ROLE, "bad_request", f"group {g.gid}: {e}")
            for rid in rids:
                self.engine.abort(rid)
                self._send_result(Finished(rid, list(g.prompt_ids), [], [], [], "abort"))

    def _update_weights(self, u: P.UpdateWeights, tensors: dict[str, torch.Tensor]) -> None:
        start = time.perf_counter()
        if u.dist is not None:  # every member takes part, even in a duplicate: the others wait for it
            received = self._receive_dist(u)
            if received is None:
                return
            tensors = received
        if u.version <= self.engine.version and not self.reload:
            return  # a duplicate (broadcast and directed catch-up can both arrive)
        try:
            self.engine.update_weights(self._weights_source(u, tensors), u.version)
        except WeightFileError as e:
            reject(ROLE, e.reason, f"version {u.version} not loaded, still serving {self.engine.version}: {e}")
            return
        except Exception as e:  # noqa: BLE001 - no update may end the server: engines validate before the first copy
            reject(ROLE, "bad_weights", f"cannot load version {u.version}, still serving {self.engine.version}: "
                   f"{type(e).__name__}: {e}")
            return
        self.reload = False
        seconds = time.perf_counter() - start
        M.weight_swap_seconds.observe(seconds)
        M.interrupted_requests.inc(self.engine.num_running)
        M.policy_version.set(u.version)
        log.info("%s: now at version %d (swap %.3fs, %d in flight)", self.server_id, u.version, seconds,
                 self.engine.num_running)
        send(self.dealer, P.WeightsLoaded(server_id=self.server_id, version=u.version, seconds=seconds))
        self._abort_stale(u.min_token_version)

    def _weights_source(self, u: P.UpdateWeights, tensors: dict[str, torch.Tensor]) -> WeightSource:
        """What the engine loads: the frames' tensors, or the notice's file once checked (weight_files.py: in
        this run's weights.dir, named for its version, hashing to the notice's sha256). An engine whose model
        lives here gets the tensors of the bytes that were hashed; another (SGLang) the checked path."""
        if u.path is None:
            if not tensors:
                raise WeightFileError("bad_weights", "update carries neither a path nor tensors")
            return tensors
        if isinstance(getattr(self.engine, "model", None), torch.nn.Module):
            return load_verified(u.path, self.cfg.weights_dir(), u.version, u.sha256)
        return str(read_verified(u.path, self.cfg.weights_dir(), u.version, u.sha256)[0])

    def _receive_dist(self, u: P.UpdateWeights) -> dict[str, torch.Tensor] | None:
        """The tensors of a dist broadcast, or None: not a member (a restart, or the group failed: the weights
        come over the controller's catch-up path), a broadcast that does not fit the model (counted as a
        rejected message, reason dist_<why>), or a failed collective (counted as dist_failed)."""
        g = self.weight_group
        if g is None or g.broken or u.dist is None:
            return None
        try:
            return g.receive(u.dist, u.version, self._dist_expected)
        except DistRejected as e:
            reject(ROLE, f"dist_{e.reason}", f"weight broadcast of version {u.version}: {e}")
        except DistWeightsError as e:
            log.error("%s: %s; later versions come over the controller's catch-up path", self.server_id, e)
            reject(ROLE, "dist_failed", str(e))
        return None

    def _abort_stale(self, min_version: int) -> None:
        """Stop sequences the controller can no longer use, so long stragglers do not burn slots."""
        if not min_version:
            return
        stale = self.engine.requests_older_than(min_version)
        for rid in stale:
            f = self.engine.abort(rid)
            if f is not None:
                self._send_result(Finished(f.rid, f.prompt_ids, f.output_ids, f.logprobs, f.versions, "stale"))
        if stale:
            log.info("%s: aborted %d sequences with tokens older than version %d", self.server_id, len(stale),
                     min_version)

    def _send_result(self, f: Finished) -> None:
        self.held.discard(f.rid)
        gid, attempt, idx = parse_request_id(f.rid)
        send(self.dealer, P.Result(gid=gid, attempt=attempt, idx=idx, output_ids=f.output_ids,
                                   logprobs=f.logprobs, versions=f.versions, finish_reason=f.finish_reason))

    @staticmethod
    def _count(f: Finished) -> None:
        M.generated_tokens.inc(len(f.output_ids))
        for version, n in Counter(f.versions).items():
            M.version_tokens.labels(version=str(version)).inc(n)

    def _heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_beat >= self.cfg.rollout.heartbeat_s:
            self._last_beat = now
            m = self.meter  # counters as of its last tick, which the loop has just made
            send(self.dealer, P.Heartbeat(server_id=self.server_id, version=self.engine.version,
                                          running=self.engine.num_running, waiting=self.engine.num_waiting,
                                          generated_tokens=self.generated_tokens, busy_s=m.busy_s,
                                          slot_seconds=m.slot_seconds, max_running=self.engine.max_running,
                                          started=m.started, at=m.last, spans=m.drain_spans(m.last),
                                          held=held_attempts(self.held)))

    def _slots_next_step(self) -> int:
        """Requests that will hold a slot during the coming step: the running ones plus the waiting ones
        it admits (up to max_running), so a step that starts with a prefill is not counted as empty."""
        return min(self.engine.num_running + self.engine.num_waiting, self.engine.max_running)

    def check_controller(self) -> None:
        """Stop once the controller has been silent for `rollout.controller_timeout_s`.

        It pings every `rollout.heartbeat_s`; this is checked right after the messages that arrived
        are drained, so a long step or weight load of this server's own never reads as silence.
        Before its first word, `controller.startup_timeout_s` more is allowed: a controller started at
        the same time may spend long loading its task and tokenizer on a busy machine before it pings.
        """
        timeout = self.cfg.rollout.controller_timeout_s
        if not self.heard_once:
            timeout += self.cfg.controller.startup_timeout_s
        if time.monotonic() - self.last_heard > timeout:
            key = ("rollout.controller_timeout_s" if self.heard_once else
                   "rollout.controller_timeout_s + controller.startup_timeout_s, before its first word")
            raise ControllerLost(
                f"rollout {self.server_id}: lost the controller: timed out after {timeout:.0f}s waiting for the "
                f"controller at {self.cfg.net.addr(self.cfg.net.rollout_port)} ({key}): no message from it, not even "
                f"a ping (is it running? dead?). Lost: this server's {self.engine.num_running + self.engine.num_waiting}"
                " request(s) in flight, generated again after a resume (from the checkpoint's data position and "
                "the controller's buffer in it); it holds nothing else. Resume with `areal-py run --resume`, or, roles "
                "started by hand, start every role again, the trainer with --resume")

    # --- loop ----------------------------------------------------------------------------------
    def poll_once(self, timeout_ms: int) -> None:
        """Handle every message that is ready (waiting up to timeout_ms for the first)."""
        poller = zmq.Poller()
        poller.register(self.dealer, zmq.POLLIN)
        poller.register(self.sub, zmq.POLLIN)
        events = dict(poller.poll(timeout_ms))
        while events:
            for sock in (self.sub, self.dealer):  # weights first: a swap before more work joins
                if sock in events:
                    _, msg = parse(sock.recv_multipart(copy=False), ROLE)
                    if msg is not None:
                        self.last_heard, self.heard_once = time.monotonic(), True
                        self._handle(msg)
            events = dict(poller.poll(0))

    def serve(self) -> None:
        log.info("%s: serving, connected to %s", self.server_id, self.cfg.net.addr(self.cfg.net.rollout_port))
        try:
            while self.running:
                self.poll_once(0 if self.engine.has_work() else 20)
                self.check_controller()
                worked = self.engine.has_work()
                self.meter.tick(time.time(), self._slots_next_step(), worked)
                finished = self.engine.step() if worked else []
                went_idle = self.meter.tick(time.time(), self.engine.num_running, self.engine.has_work())
                # going idle is reported before the results that leave the server idle: the batch they
                # complete then always carries the generation that produced them
                for f in finished:
                    self.generated_tokens += len(f.output_ids)
                    self._count(f)
                self._heartbeat(force=went_idle)
                for f in finished:
                    self._send_result(f)
                if worked:
                    M.active_requests.set(self.engine.num_running)
                    M.queued_requests.set(self.engine.num_waiting)
                    M.kv_cache_occupancy.set(self.engine.kv_usage())
        finally:
            self.close()

    def close(self) -> None:
        if self.weight_group is not None:
            self.weight_group.close()
        self.engine.close()
        self.dealer.close()
        self.sub.close()
