"""The controller: admission under the staleness bound, dispatch, rewards, batches, weight sync.

It is the only process that knows the global version and the staleness bound. One thread runs a
poll loop; rewards are computed in a worker pool so scoring never delays dispatch or batching.

Counters (in groups; one prompt's n samples are one group):
  running  - admitted, not yet finished and scored (re-dispatch after a server death keeps it here)
  accepted - finished and scored: waiting in the buffer or already sent to the trainer
A group dropped as too stale leaves `accepted`, which frees capacity for a fresh one.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from areal_py.config import Config, dump_config
from areal_py.model_dir import build_task, context_length, model_path
from areal_py.models import load_tokenizer
from areal_py.tasks.base import Prompt, Task
from areal_py.telemetry.dashboard import start_dashboard, stop_dashboard
from areal_py.telemetry.prom import CONTROLLER as M
from areal_py.telemetry.report import write_report
from areal_py.wire import protocol as P
from areal_py.wire.transport import RateLimitedLog, WaitTimeout, make_socket, parse, recv, reject, send
from controller.activity import ActivityTracker
from controller.admission import AdmissionError, LengthGate
from controller.batching import pick_batch
from controller.reward_pool import RewardHandle, RewardPool
from controller.servers import ServerRegistry, ServerState
from controller.staleness import admission_capacity

log = logging.getLogger("controller")
ROLE = "controller"
CATCH_UP_AFTER_S = 2.0  # resend weights directly to a server still behind after this long


@dataclass
class InflightGroup:
    gid: int
    prompt: Prompt
    prompt_ids: list[int]
    attempt: int = 0
    server: str | None = None
    results: dict[int, P.Result] = field(default_factory=dict)


@dataclass
class PublishedWeights:
    version: int
    path: str | None
    tensors: dict
    at: float = field(default_factory=time.monotonic)


class Controller:
    def __init__(self, cfg: Config, task: Task | None = None, tokenizer=None) -> None:
        self.cfg = cfg
        self.task = task or build_task(cfg)
        self.tokenizer = tokenizer or load_tokenizer(model_path(cfg))
        limit = cfg.controller.max_consecutive_skipped_prompts
        self.length_gate = LengthGate(context_length(cfg), limit, getattr(self.task, "name", type(self.task).__name__))
        self.dropped_aborted = 0  # groups refused by a server (finish_reason abort)
        self.aborted_in_a_row = 0  # since the last group that finished otherwise; `limit` stops the run
        self.drop_log = RateLimitedLog(log)
        self.n = cfg.controller.group_size
        self.batch_size = cfg.controller.batch_size
        self.max_staleness = cfg.effective_max_staleness  # admission
        self.max_token_staleness = cfg.effective_max_token_staleness  # hard drop limit (>= max_staleness)
        self.total_steps = cfg.trainer.total_steps
        self.registry = ServerRegistry(cfg.controller.server_timeout_s)
        rc = cfg.reward
        self.rewards = RewardPool(rc.functions, self.task, workers=rc.workers, timeout_s=rc.timeout_s,
                                  reward_model={"path": rc.reward_model_path} if rc.reward_model_path else None)

        net, ctx = cfg.net, zmq.Context.instance()
        cap = net.max_message_bytes
        self.router = make_socket(ctx, zmq.ROUTER, net.addr(net.rollout_port, bind=True), bind=True, max_message_bytes=cap)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.pub = make_socket(ctx, zmq.PUB, net.addr(net.weights_port, bind=True), bind=True, max_message_bytes=cap)
        self.from_trainer = make_socket(ctx, zmq.PULL, net.addr(net.trainer_port, bind=True), bind=True,
                                        max_message_bytes=cap)
        self.to_trainer = make_socket(ctx, zmq.PUSH, net.addr(net.batch_port, bind=True), bind=True,
                                      max_message_bytes=cap)
        self.to_trainer.setsockopt(zmq.SNDTIMEO, int(cfg.trainer.batch_timeout_s * 1000))

        # counters and positions (restored from the trainer's checkpoint on resume)
        self.data_position = 0
        self.accepted = 0
        self.running = 0
        self.dropped_stale = 0
        self.dropped_uniform = 0
        self.generated_tokens = 0
        self.next_gid = 0
        self.next_batch_version = 0
        self.base_version = 0
        self.latest: PublishedWeights | None = None
        self.last_ping = 0.0

        self.inflight: dict[int, InflightGroup] = {}
        self.undispatched: deque[int] = deque()
        self.scoring: list[tuple[InflightGroup, RewardHandle]] = []
        self.ready: deque[P.Group] = deque()
        self.trainer_done = False
        self.gen_tokens_by_server: dict[str, int] = {}
        self.activity = ActivityTracker()  # servers' generation spans and slot use since the last batch
        self.scored_reward_sum, self.scored_samples = 0.0, 0  # every sample scored since the last batch

    # --- the admission rule ------------------------------------------------------------------------
    @property
    def version(self) -> int | None:
        """The version every live server runs: what admission may count on (None: not synced yet)."""
        v = self.registry.min_version()
        return v if v is not None and v >= self.base_version else None

    def capacity(self) -> int:
        v = self.version
        if v is None:
            return 0
        cap = admission_capacity(v, self.max_staleness, self.batch_size, self.accepted, self.running)
        needed = self.total_steps * self.batch_size - (self.accepted + self.running)  # no work past the last step
        return max(0, min(cap, needed))

    def admit(self) -> None:
        for _ in range(self.capacity()):
            prompt, ids = self.next_prompt()
            g = InflightGroup(self.next_gid, prompt, ids)
            self.next_gid += 1
            self.inflight[g.gid] = g
            self.running += 1
            self.undispatched.append(g.gid)

    def next_prompt(self) -> tuple[Prompt, list[int]]:
        """The next prompt that fits the model's context; longer ones are skipped, counted, never dispatched
        (the length gate raises AdmissionError after max_consecutive_skipped_prompts in a row)."""
        while True:
            prompt = self.task.prompt(self.data_position)
            self.data_position += 1
            ids = list(self.tokenizer(prompt.text).input_ids)
            if self.length_gate.fits(prompt.index, len(ids)):
                return prompt, ids

    @property
    def skipped_too_long(self) -> int:
        return self.length_gate.total

    def dispatch(self) -> None:
        r = self.cfg.rollout
        sampling = P.SamplingBody(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p)
        while self.undispatched:
            server = self.registry.least_loaded()
            if server is None:
                return
            g = self.inflight[self.undispatched.popleft()]
            g.server, g.results = server.server_id, {}
            server.inflight[g.gid] = self.n
            self._to_server(server, P.Generate(gid=g.gid, attempt=g.attempt, prompt_ids=g.prompt_ids, n=self.n,
                                               sampling=sampling))

    def _to_server(self, server: ServerState, body, tensors: dict | None = None) -> None:
        try:
            send(self.router, body, tensors, to=server.server_id.encode())
        except zmq.ZMQError as e:  # unroutable: the server is gone; expiry will move its work
            log.warning("cannot reach %s: %s", server.server_id, e)

    # --- rollout side ------------------------------------------------------------------------------
    def on_rollout(self, sender: bytes, msg: P.Message) -> None:
        server_id = sender.decode(errors="replace")
        body = msg.body
        if isinstance(body, (P.Hello, P.Heartbeat, P.WeightsLoaded)):
            server, fresh = self.registry.seen(server_id, body.version)
            if fresh:
                log.info("server %s joined at version %d", server_id, body.version)
            if isinstance(body, P.Heartbeat):
                self.activity.add(server_id, body, received=time.time())
            self._catch_up(server, force=fresh)
        elif isinstance(body, P.Result):
            self.registry.seen(server_id)
            self.on_result(server_id, body)
        else:
            reject(ROLE, "unexpected_type", f"{msg.type} from {server_id} on the rollout socket")

    def on_result(self, server_id: str, r: P.Result) -> None:
        g = self.inflight.get(r.gid)
        if g is None or g.attempt != r.attempt or g.server != server_id or r.idx >= self.n or r.idx in g.results:
            reject(ROLE, "stale_result", f"result {r.gid}:{r.attempt}:{r.idx} from {server_id} is not awaited")
            return
        g.results[r.idx] = r
        self.generated_tokens += len(r.output_ids)
        self.gen_tokens_by_server[server_id] = self.gen_tokens_by_server.get(server_id, 0) + len(r.output_ids)
        server = self.registry.servers[server_id]
        server.inflight[g.gid] -= 1
        if server.inflight[g.gid] == 0:
            del server.inflight[g.gid]
        if len(g.results) == self.n:
            del self.inflight[g.gid]
            if any(x.finish_reason == "stale" for x in g.results.values()):
                self.running -= 1  # aborted by the server as too stale for any batch to come
                self.dropped_stale += 1
                self.aborted_in_a_row = 0
            elif any(x.finish_reason == "abort" for x in g.results.values()):
                self.running -= 1  # refused by the server: forget it, capacity admits a fresh prompt
                self.on_refused(g, server_id)
            else:
                self.aborted_in_a_row = 0
                self.scoring.append((g, self.rewards.submit([self._scoring_item(g.prompt, g.results[i])
                                                             for i in range(self.n)])))

    def on_refused(self, g: InflightGroup, server_id: str) -> None:
        """Count a group a server refused; max_consecutive_skipped_prompts of them in a row stop the run:
        prompts that pass the length gate but that no server takes (another context, a tokenizer whose ids
        the model lacks) would otherwise be admitted and dropped in a tight loop forever."""
        self.dropped_aborted += 1
        self.aborted_in_a_row += 1
        M.aborted_groups.inc()
        self.drop_log.warning("refused", "group %d (prompt %d, %d tokens) refused by %s; dropped (%d so far; the "
                              "server's log says why)", g.gid, g.prompt.index, len(g.prompt_ids), server_id,
                              self.dropped_aborted)
        limit = self.cfg.controller.max_consecutive_skipped_prompts
        if self.aborted_in_a_row >= limit:
            raise AdmissionError(f"controller: {self.aborted_in_a_row} groups in a row of task {self.length_gate.task_name!r} "
                                 f"were refused by the rollout servers (finish_reason abort; last: prompt "
                                 f"{g.prompt.index}, {len(g.prompt_ids)} tokens, by {server_id}; controller."
                                 f"max_consecutive_skipped_prompts={limit}); their logs say why (a prompt too long for "
                                 f"the engine's context, token ids outside its vocabulary...)")

    def _scoring_item(self, prompt: Prompt, r: P.Result) -> tuple[Prompt, str, bool]:
        ids = [t for t in r.output_ids if t not in self.tokenizer.all_special_ids]
        return prompt, self.tokenizer.decode(ids, skip_special_tokens=True), r.finish_reason == "stop"

    def _group(self, g: InflightGroup, rewards: list[float]) -> P.Group:
        samples = [P.Sample(output_ids=r.output_ids, logprobs=r.logprobs, versions=r.versions,
                            finish_reason=r.finish_reason, reward=reward)
                   for r, reward in zip((g.results[i] for i in range(self.n)), rewards)]
        return P.Group(gid=g.gid, prompt_index=g.prompt.index, prompt_ids=g.prompt_ids, samples=samples)

    def harvest_rewards(self) -> None:
        """Collect scored groups; a verifier that hangs or raises scores 0 (counted by the pool), never stalls."""
        still = []
        for g, handle in self.scoring:
            if not handle.done():
                still.append((g, handle))
                continue
            self.running -= 1
            group = self._group(g, handle.result())
            self.scored_reward_sum += sum(s.reward for s in group.samples)
            self.scored_samples += len(group.samples)
            if self.cfg.controller.dynamic_sampling and len({s.reward for s in group.samples}) == 1:
                self.dropped_uniform += 1  # DAPO: no signal in it; capacity frees and a fresh prompt is admitted
                continue
            self.ready.append(group)
            self.accepted += 1
        self.scoring = still

    def expire_servers(self) -> None:
        for server in self.registry.expire():
            moved = list(server.inflight)
            log.error("server %s silent for %.0fs: declared dead, re-dispatching %d groups",
                      server.server_id, self.registry.timeout_s, len(moved))
            for gid in moved:
                g = self.inflight[gid]
                g.attempt += 1  # late results of the old attempt are rejected, nothing counts twice
                g.server, g.results = None, {}
                self.undispatched.appendleft(gid)
            server.inflight.clear()

    def check_servers_present(self) -> None:
        """Stop once no server has been live for `controller.no_server_timeout_s` since the last word of any.

        Before any server has spoken the startup timeout (_serve) applies instead. Without this, a
        controller started by hand whose only server died would idle forever, admitting nothing.
        """
        if not self.registry.servers or self.registry.live():
            return
        timeout = self.cfg.controller.no_server_timeout_s
        last = max(s.last_seen for s in self.registry.servers.values())
        if time.monotonic() - last > timeout:
            raise WaitTimeout(f"controller: timed out after {timeout:.0f}s waiting for a live rollout server: "
                              f"{', '.join(sorted(self.registry.servers))} went silent (dead after "
                              f"controller.server_timeout_s={self.registry.timeout_s:g}s) and none came back")

    def ping(self) -> None:
        """Tell every server the controller lives, every `rollout.heartbeat_s`.

        Broadcast on the weights PUB, so it reaches servers not yet registered too; called from every
        wait of the controller's (the poll loop, the trainer's hello), never from one that can block long.
        """
        now = time.monotonic()
        if now - self.last_ping >= self.cfg.rollout.heartbeat_s:
            self.last_ping = now
            send(self.pub, P.Ping())

    # --- weights -----------------------------------------------------------------------------------
    def on_weights(self, w: P.WeightsReady, tensors: dict) -> None:
        self.latest = PublishedWeights(w.version, w.path, tensors)
        send(self.pub, self._update_message(w.version, w.path), tensors or None)
        for s in self.registry.live():
            s.last_weights_sent = time.monotonic()

    def _catch_up(self, server: ServerState, force: bool = False) -> None:
        w = self.latest
        if w is None or server.version >= w.version:
            return
        if force or time.monotonic() - server.last_weights_sent > CATCH_UP_AFTER_S:
            server.last_weights_sent = time.monotonic()
            self._to_server(server, self._update_message(w.version, w.path), w.tensors or None)

    def _update_message(self, version: int, path: str | None) -> P.UpdateWeights:
        """Weights plus the oldest token version a batch still to come can take (older work is doomed)."""
        floor = max(0, self.next_batch_version - self.max_token_staleness)
        return P.UpdateWeights(version=version, path=path, min_token_version=floor)

    def check_weight_sync(self) -> None:
        w = self.latest
        if w is None:
            return
        behind = [s.server_id for s in self.registry.live() if s.version < w.version]
        if behind and time.monotonic() - w.at > self.cfg.controller.weight_sync_timeout_s:
            raise WaitTimeout(f"controller: timed out after {self.cfg.controller.weight_sync_timeout_s:.0f}s "
                              f"waiting for servers {behind} to load weight version {w.version}")

    # --- batches -----------------------------------------------------------------------------------
    def assemble_batches(self) -> None:
        """Send every batch the ready groups can fill (selection rule: `controller.batching`)."""
        while len(self.ready) >= self.batch_size and self.next_batch_version < self.total_steps:
            b = self.next_batch_version
            pick = pick_batch(self.ready, b, self.batch_size, self.max_token_staleness)
            self.dropped_stale += pick.dropped
            self.accepted -= pick.dropped
            self.ready = deque(pick.remaining)
            if not pick.groups:
                return
            groups = pick.groups
            for age in pick.ages:
                M.sample_staleness.observe(age)
            M.reward_mean.set(sum(s.reward for g in groups for s in g.samples) / (self.batch_size * self.n))
            state = {"data_position": self.data_position, "accepted": self.accepted, "running": self.running,
                     "dropped_stale": self.dropped_stale, "dropped_uniform": self.dropped_uniform,
                     "reward_timeouts": self.rewards.timeouts, "reward_errors": self.rewards.errors, "generated_tokens": self.generated_tokens,
                     "skipped_too_long": self.skipped_too_long, "dropped_aborted": self.dropped_aborted}
            activity, spans = self.activity.take(s.server_id for s in self.registry.live())
            # The reward of everything scored since the last batch, groups dynamic sampling dropped
            # included: with DAPO the trained batch's reward is biased toward 0.5, this one is not.
            scored = {"scored_reward_mean": self.scored_reward_sum / self.scored_samples} if self.scored_samples else {}
            self.scored_reward_sum, self.scored_samples = 0.0, 0
            try:
                send(self.to_trainer, P.Batch(version=b, groups=groups, state=state, gen_spans=spans,
                                              stats={"servers_live": len(self.registry.live()), **activity, **scored,
                                                     **{f"gen_tokens/{k}": v for k, v in self.gen_tokens_by_server.items()}}))
            except zmq.Again:
                raise WaitTimeout(f"controller: timed out after {self.cfg.trainer.batch_timeout_s:.0f}s "
                                  f"waiting for the trainer to take batch {b}") from None
            self.next_batch_version += 1

    # --- trainer side ------------------------------------------------------------------------------
    def on_trainer(self, msg: P.Message) -> None:
        body = msg.body
        if isinstance(body, P.WeightsReady):
            self.on_weights(body, msg.tensors)
        elif isinstance(body, P.TrainerDone):
            log.info("trainer finished at version %d", body.version)
            self.trainer_done = True
        elif isinstance(body, P.TrainerHello):
            reject(ROLE, "unexpected_type", "a second trainer hello")
        else:
            reject(ROLE, "unexpected_type", f"{msg.type} on the trainer socket")

    def start(self) -> None:
        """Wait for the trainer's hello: it fixes the starting version and, on resume, the counters."""
        _, msg = recv(self.from_trainer, ROLE, timeout_s=self.cfg.controller.startup_timeout_s, tick=self.ping,
                      waiting_for=f"the trainer's hello on {self.cfg.net.addr(self.cfg.net.trainer_port, bind=True)}")
        while not isinstance(msg.body, P.TrainerHello):
            reject(ROLE, "unexpected_type", f"{msg.type} before the trainer's hello")
            _, msg = recv(self.from_trainer, ROLE, timeout_s=self.cfg.controller.startup_timeout_s, tick=self.ping,
                          waiting_for="the trainer's hello")
        hello: P.TrainerHello = msg.body
        self.base_version = self.next_batch_version = hello.version
        if hello.resume_state:
            self.data_position = hello.resume_state["data_position"]
            self.dropped_stale = hello.resume_state.get("dropped_stale", 0)
            self.dropped_uniform = hello.resume_state.get("dropped_uniform", 0)
            self.generated_tokens = hello.resume_state.get("generated_tokens", 0)
            self.length_gate.total = hello.resume_state.get("skipped_too_long", 0)
            self.dropped_aborted = hello.resume_state.get("dropped_aborted", 0)
        self.accepted = hello.version * self.batch_size  # every trained group; nothing in flight survives a restart
        log.info("trainer at version %d; data position %d, accepted %d, max_staleness %d, max_token_staleness %d",
                 hello.version, self.data_position, self.accepted, self.max_staleness, self.max_token_staleness)

    def step(self, timeout_ms: int = 10) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.from_trainer, zmq.POLLIN)
        events = dict(poller.poll(timeout_ms))
        while events:
            if self.from_trainer in events:
                _, msg = parse(self.from_trainer.recv_multipart(copy=False), ROLE)
                if msg is not None:
                    self.on_trainer(msg)
            if self.router in events:
                sender, msg = parse(self.router.recv_multipart(copy=False), ROLE, routed=True)
                if msg is not None and sender is not None:
                    self.on_rollout(sender, msg)
            self.ping()  # even while a flood of messages keeps this loop going
            events = dict(poller.poll(0))
        self.ping()
        self.expire_servers()
        self.check_servers_present()
        for s in self.registry.live():
            self._catch_up(s)
        self.check_weight_sync()
        self.harvest_rewards()
        self.admit()
        self.dispatch()
        self.assemble_batches()
        self.export_gauges()

    def export_gauges(self) -> None:
        M.admitted_groups.set(self.next_gid)
        M.running_groups.set(self.running)
        M.accepted_groups.set(self.accepted)
        M.staleness_capacity_groups.set(self.capacity())
        M.queue_depth.labels(queue="undispatched").set(len(self.undispatched))
        M.queue_depth.labels(queue="scoring").set(len(self.scoring))
        M.queue_depth.labels(queue="ready").set(len(self.ready))
        for s in self.registry.live():
            M.server_policy_version.labels(server=s.server_id).set(s.version)
        if self.version is not None:
            M.policy_version.set(self.version)

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
            dash, port = start_dashboard(self.cfg.run_dir(), port, host=self.cfg.net.bind_host)
        except OSError as e:  # a busy port must not stop a training run
            log.warning("live dashboard not started on port %d: %s", port, e)
            return None
        log.info("live dashboard on http://%s:%d/", self.cfg.net.bind_host, port)
        return dash

    def _serve(self) -> None:
        self.start()
        deadline = time.monotonic() + self.cfg.controller.startup_timeout_s
        try:
            while not self.trainer_done:
                self.step()
                if not self.registry.servers and time.monotonic() > deadline:
                    raise WaitTimeout(f"controller: timed out after {self.cfg.controller.startup_timeout_s:.0f}s "
                                      f"waiting for a rollout server to connect")
        finally:
            self.close()

    def close(self) -> None:
        for s in self.registry.live():
            self._to_server(s, P.Shutdown(reason="run finished"))
        self.rewards.close()
        self.router.close(linger=1000)  # let the shutdown notices leave
        for sock in (self.pub, self.from_trainer, self.to_trainer):
            sock.close()
