"""The rollout side of the controller: admission under the staleness bound, dispatch, results, scoring.

A group goes admitted -> undispatched -> on a server (`inflight`) -> scoring -> `ready` (or dropped);
every step of the way is counted in the shared `RunCounters` (see controller.run_state for what
`running` and `accepted` mean). Rewards are computed in a worker pool so scoring never delays
dispatch or batching.

Resume is lossless: `snapshot` is every admitted group not yet trained or dropped (ready groups, and
pending ones with the samples they have finished), `restore` takes it back after a restart. A
restored group generates only its missing samples (`InflightGroup.slots`), and its finished ones keep
their per-token versions, so `pick_batch` applies the staleness bound to them as to any other.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from areal_py.config import Config
from areal_py.tasks.base import Prompt, Task
from areal_py.tasks.prompt_render import render_prompt
from areal_py.telemetry.prom import CONTROLLER as M
from areal_py.telemetry.signal_watch import SignalWatch
from areal_py.wire import protocol as P
from areal_py.wire.transport import RateLimitedLog, reject
from areal_py.workflow.assembly import AssembledEpisode
from controller.admission import AdmissionError, LengthGate
from controller.episodes import EpisodeRunner, Settled, settle
from controller.progress import AttemptClocks
from controller.reward_pool import RewardHandle, RewardPool
from controller.run_state import RunCounters
from controller.servers import ServerRegistry, ServerState
from controller.staleness import admission_capacity

log = logging.getLogger("controller")
ROLE = "controller"

ToServer = Callable[[ServerState, P.Generate], None]


@dataclass
class InflightGroup:
    gid: int
    prompt: Prompt
    prompt_ids: list[int]
    attempt: int = 0
    server: str | None = None
    avoid: str | None = None  # a server whose result for it was rejected: the group goes elsewhere if it can
    results: dict[int, P.Result] = field(default_factory=dict)  # sample index in the group -> its result
    slots: list[int] = field(default_factory=list)  # the current attempt's Result.idx j is sample slots[j]
    # a workflow group's finished episodes and the workflow's own rewards (None: scored by the reward functions)
    episodes: list[tuple[AssembledEpisode, float | None]] | None = None
    episode_info: list[dict[str, float]] = field(default_factory=list)  # each episode's info (turns, tool calls...)


class Rollouts:
    def __init__(self, cfg: Config, task: Task, tokenizer, length_gate: LengthGate, registry: ServerRegistry,
                 rewards: RewardPool, counts: RunCounters, to_server: ToServer,
                 episodes: EpisodeRunner | None = None) -> None:
        self.cfg = cfg
        self.task = task
        self.tokenizer = tokenizer
        self.length_gate = length_gate
        self.registry = registry
        self.rewards = rewards
        self.counts = counts
        self.to_server = to_server
        self.episodes = episodes  # rollout.workflow's runner (controller/episodes.py); None: single_turn, native
        self.drop_log = RateLimitedLog(log)
        self.n = cfg.controller.group_size
        # dynamic sampling drops uniform groups before any step: a batch's worth of them in a row, N times over
        self.uniform_watch = SignalWatch(cfg.trainer.warn_uninformative_steps * cfg.controller.batch_size)
        self.batch_size = cfg.controller.batch_size
        self.max_staleness = cfg.effective_max_staleness  # admission
        self.max_concurrent = cfg.controller.max_concurrent  # admission: groups in flight at once (None: unbounded)
        self.total_steps = cfg.trainer.total_steps

        self.inflight: dict[int, InflightGroup] = {}
        self.undispatched: deque[int] = deque()
        self.scoring: list[tuple[InflightGroup, RewardHandle]] = []
        self.ready: deque[P.Group] = deque()
        self.clocks = AttemptClocks(cfg.controller.group_timeout_s)  # a lost Generate or Result: generated again

    # --- the admission rule ------------------------------------------------------------------------
    @property
    def version(self) -> int | None:
        """The version every live server runs: what admission may count on (None: not synced yet)."""
        v = self.registry.min_version()
        return v if v is not None and v >= self.counts.base_version else None

    def capacity(self) -> int:
        v = self.version
        if v is None:
            return 0
        c = self.counts
        cap = admission_capacity(v, self.max_staleness, self.batch_size, c.accepted, c.running, self.max_concurrent)
        needed = self.total_steps * self.batch_size - (c.accepted + c.running)  # no work past the last step
        return max(0, min(cap, needed))

    def admit(self) -> None:
        for _ in range(self.capacity()):
            prompt, ids = self.next_prompt()
            g = InflightGroup(self.counts.next_gid, prompt, ids)
            self.counts.next_gid += 1
            self.inflight[g.gid] = g
            self.counts.running += 1
            self.undispatched.append(g.gid)

    def next_prompt(self) -> tuple[Prompt, list[int]]:
        """The next prompt that fits the model's context; longer ones are skipped, counted, never dispatched
        (the length gate raises AdmissionError after max_consecutive_skipped_prompts in a row)."""
        while True:
            prompt = self.task.prompt(self.counts.data_position)
            self.counts.data_position += 1
            ids = render_prompt(self.tokenizer, prompt, self.cfg.task.chat_template, self.cfg.task.system_prompt)
            if self.length_gate.fits(prompt.index, len(ids)):
                return prompt, ids
            self.counts.note_dropped("too_long", [prompt.index])

    @property
    def skipped_too_long(self) -> int:
        return self.length_gate.total

    def dispatch(self) -> None:
        """Send each undispatched group's missing samples (all of them, but for a group restored with some
        finished) to the least loaded server, once every live server runs the trainer's version (a resumed
        run's servers start from the base model: work sent before they load its weights would be stale)."""
        r = self.cfg.rollout
        sampling = P.SamplingBody(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p)
        if self.episodes is not None:  # a workflow: a group's episodes start now, their turns go out as they come
            while self.undispatched and self.version is not None:
                g = self.inflight[self.undispatched.popleft()]
                self.episodes.start(g.gid, g.prompt, g.prompt_ids)
            self.episodes.dispatch(self.registry, self.to_server)
            return
        while self.undispatched and self.version is not None:
            g = self.inflight[self.undispatched[0]]
            server = self.registry.least_loaded(avoid=g.avoid)
            if server is None:
                return
            self.undispatched.popleft()
            g.server = server.server_id
            g.slots = [i for i in range(self.n) if i not in g.results]
            server.inflight[g.gid] = len(g.slots)
            self.to_server(server, P.Generate(gid=g.gid, attempt=g.attempt, prompt_ids=g.prompt_ids, n=len(g.slots),
                                              sampling=sampling))
            self.clocks.dispatched(g.gid, g.attempt, server.server_id, time.monotonic())

    # --- results -----------------------------------------------------------------------------------
    def on_result(self, server_id: str, r: P.Result) -> None:
        if self.episodes is not None and self.episodes.owns(r.gid):  # one turn of an episode
            if self.episodes.on_result(server_id, r, self.registry):
                self.counts.add_generated(server_id, len(r.output_ids))
            return
        g = self.inflight.get(r.gid)
        if (g is None or g.attempt != r.attempt or g.server != server_id or r.idx >= len(g.slots)
                or g.slots[r.idx] in g.results):
            reject(ROLE, "stale_result", f"result {r.gid}:{r.attempt}:{r.idx} from {server_id} is not awaited")
            return
        g.results[g.slots[r.idx]] = r
        self.clocks.result(g.gid, time.monotonic())
        c = self.counts
        c.add_generated(server_id, len(r.output_ids))
        server = self.registry.servers[server_id]
        server.inflight[g.gid] -= 1
        if server.inflight[g.gid] == 0:
            del server.inflight[g.gid]
        if len(g.results) == self.n:
            self._finished(g, server_id)

    def _finished(self, g: InflightGroup, server_id: str) -> None:
        """A group with all its samples: dropped (stale, refused) or sent for scoring."""
        c = self.counts
        del self.inflight[g.gid]
        self.clocks.done(g.gid)
        if any(x.finish_reason == "stale" for x in g.results.values()):
            c.running -= 1  # aborted by the server as too stale for any batch to come
            c.drop("stale", [g.prompt.index])
            c.aborted_in_a_row = 0
        elif any(x.finish_reason == "abort" for x in g.results.values()):
            c.running -= 1  # refused by the server: forget it, capacity admits a fresh prompt
            self.on_refused(g, server_id)
        else:
            c.aborted_in_a_row = 0
            self.scoring.append((g, self.rewards.submit([self._scoring_item(g.prompt, g.results[i])
                                                         for i in range(self.n)])))

    def on_refused(self, g: InflightGroup, server_id: str) -> None:
        """Count a group a server refused; max_consecutive_skipped_prompts of them in a row stop the run:
        prompts that pass the length gate but that no server takes (another context, a tokenizer whose ids
        the model lacks) would otherwise be admitted and dropped in a tight loop forever."""
        c = self.counts
        c.drop("aborted", [g.prompt.index])
        c.aborted_in_a_row += 1
        self.drop_log.warning("refused", "group %d (prompt %d, %d tokens) refused by %s; dropped (%d so far; the "
                              "server's log says why)", g.gid, g.prompt.index, len(g.prompt_ids), server_id,
                              c.dropped_aborted)
        limit = self.cfg.controller.max_consecutive_skipped_prompts
        if c.aborted_in_a_row >= limit:
            raise AdmissionError(f"controller: {c.aborted_in_a_row} groups in a row of task {self.length_gate.task_name!r} "
                                 f"were refused by the rollout servers (finish_reason abort; last: prompt "
                                 f"{g.prompt.index}, {len(g.prompt_ids)} tokens, by {server_id}; controller."
                                 f"max_consecutive_skipped_prompts={limit}); their logs say why (a prompt too long for "
                                 f"the engine's context, token ids outside its vocabulary...)")

    def _scoring_item(self, prompt: Prompt, r: P.Result) -> tuple[Prompt, str, bool]:
        ids = [t for t in r.output_ids if t not in self.tokenizer.all_special_ids]
        return prompt, self.tokenizer.decode(ids, skip_special_tokens=True), r.finish_reason == "stop"

    def collect_episodes(self) -> None:
        """Workflow groups whose n episodes ended (controller/episodes.py `settle`): sent for scoring, or dropped
        (a workflow error as workflow_error, a stale turn as stale, a refused one as aborted)."""
        if self.episodes is None:
            return
        c = self.counts
        for gid, outcomes, stale in self.episodes.finished():
            g = self.inflight.pop(gid)
            s = settle(outcomes, stale, self.tokenizer)
            if s.kind == "ok":
                c.aborted_in_a_row = 0
                self._episode_metrics(s)
                self.episodes.tally.settled(s.episodes, s.info)
                g.episodes, g.episode_info = list(zip(s.episodes, s.rewards)), s.info
                self.scoring.append((g, self.rewards.submit([(g.prompt, text, stopped) for text, stopped in s.texts])))
                continue
            c.running -= 1
            if s.kind == "stale":
                c.drop("stale", [g.prompt.index])
            elif s.kind == "abort":
                self.on_refused(g, "a turn's server")
            else:
                M.dropped_groups.labels(reason="workflow_error").inc()
                c.note_dropped("workflow_error", [g.prompt.index])
                self.drop_log.warning("workflow_error", "group %d (prompt %d) dropped: its workflow (%s) failed: %s",
                                      g.gid, g.prompt.index, self.cfg.rollout.workflow, s.error)

    @staticmethod
    def _episode_metrics(s: Settled) -> None:
        for info in s.info:
            M.episodes.inc()
            M.episode_turns.inc(info.get("turns", 1.0))
            errors = info.get("tool_errors", 0.0)
            M.episode_tool_calls.labels(outcome="error").inc(errors)
            M.episode_tool_calls.labels(outcome="ok").inc(info.get("tool_calls", 0.0) - errors)
        tokens = sum(len(a.loss_mask) for a in s.episodes)
        M.episode_tool_token_share.set((tokens - sum(a.model_tokens for a in s.episodes)) / max(tokens, 1))

    def _group(self, g: InflightGroup, rewards: list[float]) -> P.Group:
        if g.episodes is not None:
            samples = [P.Sample(output_ids=a.output_ids, logprobs=a.logprobs, versions=a.versions,
                                finish_reason=a.finish_reason, reward=own if own is not None else reward,
                                loss_mask=a.loss_mask)
                       for (a, own), reward in zip(g.episodes, rewards)]
            return P.Group(gid=g.gid, prompt_index=g.prompt.index, prompt_ids=g.prompt_ids, samples=samples)
        samples = [P.Sample(output_ids=r.output_ids, logprobs=r.logprobs, versions=r.versions,
                            finish_reason=r.finish_reason, reward=reward)
                   for r, reward in zip((g.results[i] for i in range(self.n)), rewards)]
        return P.Group(gid=g.gid, prompt_index=g.prompt.index, prompt_ids=g.prompt_ids, samples=samples)

    def harvest_rewards(self) -> None:
        """Collect scored groups; a verifier that hangs or raises scores 0 (counted by the pool), never stalls."""
        self.collect_episodes()
        c = self.counts
        still = []
        for g, handle in self.scoring:
            if not handle.done():
                still.append((g, handle))
                continue
            c.running -= 1
            group = self._group(g, handle.result())
            c.add_scored([s.reward for s in group.samples])
            if g.episodes is not None and self.episodes is not None:
                self.episodes.tally.scored([s.reward for s in group.samples], g.episode_info)
            if self.cfg.controller.dynamic_sampling:
                uniform = len({s.reward for s in group.samples}) == 1
                self._watch_uniform(uniform, group.samples[0].reward)
                if uniform:
                    c.drop("uniform", [group.prompt_index])  # DAPO: no signal in it; capacity frees and a fresh prompt is admitted
                    continue
            self.ready.append(group)
            c.accepted += 1
        self.scoring = still

    def _watch_uniform(self, uniform: bool, reward: float) -> None:
        """Warn when dynamic sampling has dropped trainer.warn_uninformative_steps batches' worth of groups in
        a row: no batch forms from them, so the trainer waits and nothing is learned."""
        if self.uniform_watch.observe(0 if uniform else 1):
            log.warning("controller: the last %d scored groups all had equal rewards (the last: %g) and dynamic "
                        "sampling dropped every one: %d batches' worth with no learning signal, no batch formed "
                        "from them (trainer.warn_uninformative_steps=%d). Check the reward (ctrl_reward_errors, "
                        "scored_reward_mean) and whether the task suits the model", self.uniform_watch.streak,
                        reward, self.uniform_watch.streak // self.batch_size,
                        self.cfg.trainer.warn_uninformative_steps)

    def expire_servers(self) -> None:
        """Declare silent servers dead and queue their groups for re-dispatch (still `running`)."""
        for server in self.registry.expire():
            log.error("server %s silent for %.0fs: declared dead, re-dispatching %d groups",
                      server.server_id, self.registry.timeout_s, len(server.inflight))
            self.move_work(server, "server_dead")

    def move_work(self, server: ServerState, reason: str) -> None:
        """Queue every group `server` holds for re-dispatch, first in line (they stay `running`)."""
        for gid in list(server.inflight):
            if self.episodes is not None and self.episodes.owns(gid):
                self.episodes.redispatch(gid)
                continue
            self.redispatch(self.inflight[gid], reason)
        server.inflight.clear()

    def expire_attempts(self) -> None:
        """Re-dispatch every attempt with no sign of life for controller.group_timeout_s (controller/progress.py),
        to another server when one is live; the samples it did return are kept, only the missing are generated."""
        for gid in self.clocks.overdue(time.monotonic()):
            g = self.inflight[gid]
            server = self.registry.servers.get(g.server or "")
            log.warning("group %d attempt %d on %s: no result and not held by its server for %.0fs "
                        "(controller.group_timeout_s; a message lost on the way?): re-dispatching its %d missing "
                        "samples", gid, g.attempt, g.server, self.clocks.timeout_s, self.n - len(g.results))
            if server is not None:
                server.inflight.pop(gid, None)
            g.avoid = g.server
            self.redispatch(g, "timeout", keep_results=True)

    def redispatch(self, g: InflightGroup, reason: str, keep_results: bool = False) -> None:
        """Generate `g` again under a new attempt number (counted by `reason`): late results of the old attempt
        are rejected as stale, so nothing counts twice. `keep_results`: the samples it has stay (they passed
        every check), and only the missing ones are generated."""
        M.redispatched_groups.labels(reason=reason).inc()
        self.clocks.done(g.gid)
        g.attempt += 1
        g.server = None
        if not keep_results:
            g.results = {}
        self.undispatched.appendleft(g.gid)

    def on_invalid_result(self, server_id: str, r: P.Result) -> None:
        """An awaited result that failed the semantic check (controller/result_check.py; rejected and counted
        already): the group's attempt on `server_id` is abandoned and the group generated again, on another
        server when one is live, so bad numbers never reach a batch and the group is not lost."""
        if self.episodes is not None and self.episodes.owns(r.gid):
            self.episodes.on_invalid(server_id, r, self.registry)
            return
        g = self.inflight.get(r.gid)
        if g is None or g.attempt != r.attempt or g.server != server_id:
            return  # not awaited: the rejection was all
        server = self.registry.servers.get(server_id)
        if server is not None:
            server.inflight.pop(g.gid, None)
        g.avoid = server_id
        self.redispatch(g, "invalid_result")

    # --- lossless resume ---------------------------------------------------------------------------
    def snapshot(self) -> P.ControllerBuffer:
        """Every admitted group neither trained nor dropped: `ready`, and pending ones (undispatched,
        generating or scoring) with the samples they have finished, as `Rollouts.restore` takes them back."""
        pending = [P.PendingGroup(gid=g.gid, prompt_index=g.prompt.index, prompt_ids=g.prompt_ids,
                                  done=[r.model_copy(update={"idx": i}) for i, r in sorted(g.results.items())])
                   for g in [*self.inflight.values(), *(g for g, _ in self.scoring)]]
        return P.ControllerBuffer(ready=list(self.ready), pending=pending, next_gid=self.counts.next_gid)

    def restore(self, buffer: P.ControllerBuffer) -> None:
        """Take back a `snapshot` after a restart (RunCounters.restore has counted it as accepted/running).

        Ready groups wait for a batch again; a pending group with all its samples goes to scoring, any other
        is queued to generate only its missing samples (`dispatch` waits for the servers to run the resumed
        version). A group that cannot be what this run checkpointed (a sample index out of range or given
        twice, a token version newer than the resumed one) is dropped as `invalid`, counted in the ledger,
        rather than trained.
        """
        c, newest = self.counts, self.counts.base_version
        for group in buffer.ready:
            if max((v for s in group.samples for v in s.versions), default=0) > newest:
                c.accepted -= 1
                self._drop_invalid(group.gid, group.prompt_index, f"a token version above {newest}")
            else:
                self.ready.append(group)
        for pg in buffer.pending:
            g = InflightGroup(pg.gid, self.task.prompt(pg.prompt_index), list(pg.prompt_ids))
            g.results = {r.idx: r for r in pg.done if r.idx < self.n}
            if len(g.results) != len(pg.done) or any(v > newest for r in pg.done for v in r.versions):
                c.running -= 1
                self._drop_invalid(pg.gid, pg.prompt_index, f"samples {[r.idx for r in pg.done]} of a group of "
                                                            f"{self.n}, token versions up to {newest}")
                continue
            self.inflight[g.gid] = g
            if len(g.results) == self.n:
                self._finished(g, "resume")
            else:
                self.undispatched.append(g.gid)
        log.info("resumed %d ready and %d pending groups (%d finished samples kept)", len(buffer.ready),
                 len(buffer.pending), sum(len(pg.done) for pg in buffer.pending))

    def _drop_invalid(self, gid: int, prompt_index: int, expected: str) -> None:
        self.counts.note_dropped("invalid", [prompt_index])
        log.warning("resumed group %d (prompt %d) dropped as invalid: the checkpoint's buffer does not fit this run "
                    "(expected %s)", gid, prompt_index, expected)
