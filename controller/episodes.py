"""Multi-turn episodes on the controller: workflows run on threads, each turn one Generate to a server.

A workflow (areal_py/workflow) is plain blocking code. Each of a group's n episodes runs on a thread
of a bounded pool; its `env.generate` puts a turn request on a thread-safe queue and waits on a
future (at most rollout.turn_timeout_s, the error naming the turn). The controller's poll loop, the
only thread that touches sockets and the server registry, drains the queue in `dispatch`, sends each
turn as a Generate of n=1 to the least loaded server, and resolves the future in `on_result`. A turn
is numbered in its own gid space (TURN_GID_BASE and up) so its Result never meets a group's; a
server's death or eviction queues its turns again under a new attempt, whose late results are
rejected as stale, as for groups.

Threads touch only: the request queue (put), their own futures (wait) and the tool sandbox. Everything
else here belongs to the poll loop.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from areal_py.config import Config
from areal_py.config.tools import ToolsConfig
from areal_py.tasks.base import Prompt
from areal_py.tools.sandbox import ToolSandbox
from areal_py.wire import protocol as P
from areal_py.wire.transport import reject
from areal_py.workflow.api import Episode, Turn, Workflow
from areal_py.workflow.assembly import AssembledEpisode, assemble
from areal_py.workflow.builtin import WorkflowSettings
from areal_py.workflow.loading import load_workflow
from controller.episode_tally import EpisodeTally
from controller.servers import ServerRegistry, ServerState

log = logging.getLogger("controller")
ROLE = "controller"

TURN_GID_BASE = 1 << 40
"""Turn requests are numbered from here: far above any group gid (a run admits far fewer than 2**40 groups)."""


@dataclass
class _TurnRequest:
    tid: int
    context: list[int]
    max_new_tokens: int
    future: Future = field(default_factory=Future)
    attempt: int = 0
    server: str | None = None


@dataclass
class EpisodeGroup:
    """A group's n episodes while they run; `stale` is set when any turn came back too stale to train."""
    gid: int
    futures: list[Future]
    stale: bool = False


class LazyTools:
    """The tool sandbox (areal_py/tools), started at the first call: a workflow that never calls a tool starts
    no worker process. Thread-safe; `close` stops the workers."""

    def __init__(self, cfg: ToolsConfig) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._box: ToolSandbox | None = None
        self._closed = False

    def call(self, name: str, args: Any) -> Any:
        with self._lock:
            if self._closed:
                raise RuntimeError("the controller stopped")
            if self._box is None:
                self._box = ToolSandbox(self.cfg)
                log.info("tool sandbox started: %d workers, network isolation %s", self.cfg.workers, self._box.network)
            box = self._box
        return box.call(name, args)

    def close(self) -> None:
        with self._lock:
            self._closed, box = True, self._box
        if box is not None:
            box.close()


def build_episode_runner(cfg: Config, tokenizer: Any, context_len: int | None, vocab_size: int,
                         tools: Any = None) -> EpisodeRunner | None:
    """The runner of `rollout.workflow`, or None for single_turn: the native grouped dispatch is that workflow
    (one Generate of n samples, the prompt prefilled once), kept as the default path."""
    r = cfg.rollout
    if r.workflow == "single_turn":
        return None
    workflow = load_workflow(r.workflow, WorkflowSettings(
        max_turns=r.max_turns, tool_tags=dict(r.tool_tags), agent=r.agent, chat_template=cfg.task.chat_template,
        system_prompt=cfg.task.system_prompt, temperature=r.temperature, top_p=r.top_p,
        max_new_tokens=r.max_new_tokens, turn_timeout_s=r.turn_timeout_s, openai=r.openai))
    return EpisodeRunner(workflow, tokenizer, n=cfg.controller.group_size,
                         sampling=P.SamplingBody(max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                                 top_p=r.top_p),
                         context_len=context_len or (1 << 30), vocab_size=vocab_size, threads=r.episode_threads,
                         turn_timeout_s=r.turn_timeout_s, tools=tools if tools is not None else LazyTools(cfg.tools))


class ControllerEnv:
    """The `EpisodeEnv` of one episode (areal_py.workflow.api): what its workflow thread calls."""

    def __init__(self, runner: EpisodeRunner, group: EpisodeGroup) -> None:
        self.runner, self.group = runner, group

    @property
    def tokenizer(self) -> Any:
        return self.runner.tokenizer

    def generate(self, context_ids: Sequence[int], max_new_tokens: int | None = None) -> Turn:
        r = self.runner
        context = [int(t) for t in context_ids]
        bad = [t for t in context if not 0 <= t < r.vocab_size]
        if not context or bad:
            raise ValueError(f"episode of group {self.group.gid}: a context needs 1+ token ids in [0, {r.vocab_size}), "
                             f"got {len(context)} ids{f', e.g. {bad[:3]}' if bad else ''}")
        limit = min(max_new_tokens or r.max_new_tokens, r.max_new_tokens, r.context_len - len(context))
        if limit < 1:  # no room left in the model's context: the episode can only end
            return Turn([], [], [], "length")
        req = r.submit(context, limit)
        try:
            turn = req.future.result(timeout=r.turn_timeout_s)
        except FutureTimeout:
            raise TimeoutError(f"episode of group {self.group.gid}: timed out after {r.turn_timeout_s:.0f}s waiting for "
                               f"turn {req.tid - TURN_GID_BASE} ({len(context)} context tokens) to be generated "
                               f"(rollout.turn_timeout_s)") from None
        if turn.finish_reason == "stale":
            self.group.stale = True
        return turn

    def call_tool(self, name: str, args: Any) -> Any:
        tools = self.runner.tools
        if tools is None:
            raise RuntimeError(f"the workflow called tool {name!r} but this run has no tool sandbox")
        result = tools.call(name, args)
        self.runner.tally.tool_call(result)
        return result


class EpisodeRunner:
    """Runs a workflow's episodes on threads and their turns through the servers (module docstring)."""

    def __init__(self, workflow: Workflow, tokenizer: Any, *, n: int, sampling: P.SamplingBody, context_len: int,
                 vocab_size: int, threads: int, turn_timeout_s: float, tools: Any = None) -> None:
        self.workflow, self.tokenizer, self.n, self.tools = workflow, tokenizer, n, tools
        self.sampling, self.max_new_tokens = sampling, sampling.max_new_tokens
        self.context_len, self.vocab_size, self.turn_timeout_s = context_len, vocab_size, turn_timeout_s
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="episode")
        self._incoming: queue.SimpleQueue[_TurnRequest] = queue.SimpleQueue()
        self._lock = threading.Lock()  # the turn counter, taken by episode threads
        self._next_tid = TURN_GID_BASE
        self._closed = False
        self.turns: dict[int, _TurnRequest] = {}  # poll loop only: turns queued or on a server
        self.queued: deque[int] = deque()
        self.groups: dict[int, EpisodeGroup] = {}
        self.tally = EpisodeTally()  # multi-turn counts since the previous batch (controller/episode_tally.py)

    # --- episode threads -----------------------------------------------------------------------------
    def submit(self, context: list[int], max_new_tokens: int) -> _TurnRequest:
        with self._lock:
            if self._closed:
                raise RuntimeError("the controller stopped")
            tid, self._next_tid = self._next_tid, self._next_tid + 1
            req = _TurnRequest(tid, context, max_new_tokens)
            self._incoming.put(req)
        return req

    # --- the poll loop ---------------------------------------------------------------------------------
    def start(self, gid: int, prompt: Prompt, prompt_ids: list[int]) -> None:
        """Start the group's n episodes."""
        group = EpisodeGroup(gid, [])
        group.futures = [self.pool.submit(self.workflow.run, prompt, list(prompt_ids), ControllerEnv(self, group))
                         for _ in range(self.n)]
        self.groups[gid] = group

    def owns(self, gid: int) -> bool:
        return gid >= TURN_GID_BASE

    def dispatch(self, registry: ServerRegistry, to_server: Callable[[ServerState, P.Generate], None]) -> None:
        """Send every queued turn to the least loaded server (a Generate of one sample)."""
        while True:
            try:
                req = self._incoming.get_nowait()
            except queue.Empty:
                break
            self.turns[req.tid] = req
            self.queued.append(req.tid)
        while self.queued:
            server = registry.least_loaded()
            if server is None:
                return
            req = self.turns[self.queued.popleft()]
            req.server = server.server_id
            server.inflight[req.tid] = 1
            sampling = self.sampling.model_copy(update={"max_new_tokens": req.max_new_tokens})
            to_server(server, P.Generate(gid=req.tid, attempt=req.attempt, prompt_ids=req.context, n=1,
                                         sampling=sampling))

    def on_result(self, server_id: str, r: P.Result, registry: ServerRegistry) -> bool:
        """Resolve the turn `r` answers; False (rejected as stale_result) when no such turn is awaited."""
        req = self.turns.get(r.gid)
        if req is None or req.attempt != r.attempt or req.server != server_id or r.idx != 0:
            reject(ROLE, "stale_result", f"turn result {r.gid}:{r.attempt}:{r.idx} from {server_id} is not awaited")
            return False
        del self.turns[r.gid]
        server = registry.servers.get(server_id)
        if server is not None:
            server.inflight.pop(r.gid, None)
        req.future.set_result(Turn(list(r.output_ids), list(r.logprobs), list(r.versions), r.finish_reason))
        return True

    def redispatch(self, tid: int) -> None:
        """Queue turn `tid` again, first in line, under a new attempt (its server died, was evicted, or sent
        a result that failed the checks)."""
        req = self.turns.get(tid)
        if req is None:
            return
        req.attempt += 1
        req.server = None
        self.queued.appendleft(tid)

    def on_invalid(self, server_id: str, r: P.Result, registry: ServerRegistry) -> None:
        """An awaited turn's result that failed the checks (rejected and counted already): generate it again."""
        req = self.turns.get(r.gid)
        if req is None or req.attempt != r.attempt or req.server != server_id:
            return
        server = registry.servers.get(server_id)
        if server is not None:
            server.inflight.pop(r.gid, None)
        self.redispatch(r.gid)

    def finished(self) -> list[tuple[int, list[Episode | BaseException], bool]]:
        """The groups whose n episodes all ended: (gid, each episode or the exception its workflow raised,
        whether any turn came back stale)."""
        out = []
        for gid, group in list(self.groups.items()):
            if all(f.done() for f in group.futures):
                del self.groups[gid]
                out.append((gid, [f.exception() or f.result() for f in group.futures], group.stale))
        return out

    def forget(self, gid: int) -> None:
        """Stop tracking group `gid` (its episodes keep running to their end; their results are ignored)."""
        self.groups.pop(gid, None)

    def close(self) -> None:
        """Fail every waiting turn so episode threads end, and stop the pool without waiting for them."""
        with self._lock:
            self._closed = True
        for req in self.turns.values():
            if not req.future.done():
                req.future.set_exception(RuntimeError("the controller stopped"))
        while True:
            try:
                req = self._incoming.get_nowait()
            except queue.Empty:
                break
            req.future.set_exception(RuntimeError("the controller stopped"))
        self.pool.shutdown(wait=False, cancel_futures=True)
        if callable(getattr(self.workflow, "close", None)):  # a workflow that serves something (openai_agent)
            self.workflow.close()
        if self.tools is not None and callable(getattr(self.tools, "close", None)):
            self.tools.close()


@dataclass
class Settled:
    """What a finished episode group becomes: `kind` ok (scored and trained), error (a workflow raised or
    returned an episode that cannot be trained), stale (a turn was too stale to train) or abort (a turn
    was refused by its server)."""
    kind: str
    episodes: list[AssembledEpisode] = field(default_factory=list)
    rewards: list[float | None] = field(default_factory=list)  # the workflow's own (None: the reward functions')
    texts: list[tuple[str, bool]] = field(default_factory=list)  # what the reward functions score, and `stopped`
    info: list[dict[str, float]] = field(default_factory=list)
    error: str = ""


def settle(outcomes: list[Episode | BaseException], stale: bool, tokenizer: Any) -> Settled:
    """The rule, in order: any workflow exception or untrainable episode -> error; a stale turn -> stale; an
    episode finished as abort -> abort; else ok, each episode assembled (areal_py.workflow.assembly) and its
    text (every segment decoded, special tokens left out) for the reward functions."""
    done: list[Episode] = []
    for i, o in enumerate(outcomes):
        if isinstance(o, BaseException):
            return Settled("error", error=f"episode {i}: {type(o).__name__}: {o}")
        if not isinstance(o, Episode):
            return Settled("error", error=f"episode {i}: the workflow returned {type(o).__name__}, not an Episode")
        done.append(o)
    if stale:
        return Settled("stale")
    if any(e.finish_reason == "abort" for e in done):
        return Settled("abort")
    out = Settled("ok")
    for i, e in enumerate(done):
        try:
            a = assemble(e)
        except ValueError as err:
            return Settled("error", error=f"episode {i}: {err}")
        special = set(tokenizer.all_special_ids)
        text = tokenizer.decode([t for t in a.output_ids if t not in special], skip_special_tokens=True)
        out.episodes.append(a)
        out.rewards.append(e.reward)
        out.texts.append((text, e.finish_reason == "stop"))
        out.info.append({"turns": float(e.turns), **e.info})
    return out
