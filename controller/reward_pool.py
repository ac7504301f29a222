"""A process pool that scores rewards with a timeout, behind a poll-loop-friendly API.

:class:`RewardPool` scores lists of samples in worker processes (or in the calling thread when
``workers=0``) behind a non-blocking ``submit`` / ``poll`` / ``done`` API for a single-threaded
poll loop. A verifier that runs past ``timeout_s`` gives 0.0 and is counted; its worker is
killed and replaced so later samples are not held up. A verifier that raises, or returns a value
that is not finite in float32 (the trainer's dtype), gives 0.0 for its own term, is logged with the
sample and counted in ``errors``. The functions themselves are in
:mod:`areal_py.rewards.functions`; what runs in a worker process, and the pipe it answers on, in
:mod:`controller.reward_worker`.
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import multiprocessing.connection
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from areal_py.rewards.functions import build_reward_fn, task_from_recipe, task_recipe, validate_spec
from areal_py.tasks.answer_extraction import DEFAULT_EXTRACTION, AnswerExtraction
from areal_py.tasks.base import Prompt, Task, TaskRecipe
from areal_py.telemetry.metrics import REWARD_ERRORS, REWARD_TIMEOUTS
from controller.reward_worker import start_worker

log = logging.getLogger(__name__)


class RewardHandle:
    """The rewards of one ``submit``: ``done()`` (non-blocking; advances the pool) and ``result()``.

    ``status[i]`` is "ok", "error" (some term raised; that term counted 0) or "timeout"
    (the whole sample scored 0).
    """

    def __init__(self, pool: RewardPool, n: int) -> None:
        self._pool = pool
        self.rewards: list[float] = [0.0] * n
        self.status: list[str] = ["pending"] * n
        self._left = n
        self._cancelled = False

    def done(self) -> bool:
        if self._left and not self._cancelled:
            self._pool.poll()
        return self._left == 0 or self._cancelled

    def result(self, timeout: float | None = None) -> list[float]:
        return self._pool.result(self, timeout)

    def _set(self, pos: int, value: float, status: str) -> bool:
        self.rewards[pos] = value
        self.status[pos] = status
        self._left -= 1
        return self._left == 0


@dataclass
class _Chunk:
    handle: RewardHandle
    positions: list[int]  # indices into handle.rewards
    items: list[tuple[int, str, str, str, bool]]  # plain data sent to the worker
    reported: int = 0  # items whose result came back
    batched_done: bool = False


class _Worker:
    def __init__(self, proc: Any, conn: multiprocessing.connection.Connection) -> None:
        self.proc = proc
        self.conn = conn
        self.ready = False
        self.chunk: _Chunk | None = None
        self.deadline = math.inf


class RewardPool:
    """Scores ``(prompt, response_text, stopped)`` samples with a reward spec, off the caller's thread.

    ``RewardPool(spec, task, workers=2, timeout_s=10.0, reward_model=None, chunk_size=8, answer=AnswerExtraction())``:

    - ``spec``: ``{name: weight}``, see :func:`build_reward_fn`; validated here.
    - ``task``: a registered task, or its :class:`TaskRecipe` (workers rebuild it from the recipe;
      see :func:`task_recipe`); None if no ``accuracy`` term.
    - ``workers``: worker processes (``spawn`` context). Each builds the reward function (and
      loads the reward model, if any) once at start. ``workers=0`` scores in the calling thread
      inside ``submit``, for cheap rule rewards where process overhead dominates; then there is
      **no timeout enforcement** (a hung verifier hangs the caller) but errors are still caught.
    - ``timeout_s``: per sample: a worker must report each sample within ``timeout_s`` of the
      previous report (the batched reward-model pass of a chunk gets one ``timeout_s`` too; if it
      overruns, every sample of that chunk scores 0 and counts as a timeout). On a timeout the
      sample scores 0, ``timeouts`` and ``areal_reward_timeouts_total`` go up, the worker is
      killed and a fresh one started, and the chunk's unscored samples are requeued first.
    - ``chunk_size``: samples sent to a worker at once (one reward-model batch); a submit is
      spread over all workers.
    - ``answer``: how ``math_accuracy`` finds the final answer (``reward.answer``).

    Single-threaded use: ``h = pool.submit(items)``; call ``h.done()`` or ``pool.poll()`` (which
    returns the handles completed since the last poll) from your loop; ``h.result()`` (or
    ``pool.result(h, timeout)``) blocks. Timeouts are detected when the pool is polled, so poll
    regularly. Not thread-safe: use one pool from one thread. ``close()`` stops the workers.
    On Linux workers die with the thread that started them (so none is orphaned if this process
    is killed): create the pool on a long-lived thread, e.g. the main one.
    """

    def __init__(self, spec: dict[str, float], task: Task | TaskRecipe | None = None, *, workers: int = 2,
                 timeout_s: float = 10.0, reward_model: dict[str, Any] | None = None, chunk_size: int = 8,
                 answer: AnswerExtraction = DEFAULT_EXTRACTION) -> None:
        if workers < 0 or chunk_size < 1 or not timeout_s > 0:
            raise ValueError("need workers >= 0, chunk_size >= 1, timeout_s > 0")
        validate_spec(spec, reward_model)
        self.spec = dict(spec)
        self.workers = workers
        self.timeout_s = timeout_s
        self.chunk_size = chunk_size
        self.reward_model = reward_model
        self.answer = answer
        self.timeouts = 0
        self.errors = 0
        self._closed = False
        self._completed: list[RewardHandle] = []
        self._pending: set[RewardHandle] = set()
        self._queue: deque[_Chunk] = deque()
        self._workers: list[_Worker] = []
        if workers == 0:
            local_task = task_from_recipe(task) if isinstance(task, TaskRecipe) else task
            self._local = build_reward_fn(self.spec, local_task, reward_model, answer)
        else:
            if "accuracy" in self.spec and task is None:
                raise ValueError("reward function 'accuracy' needs a task")
            self._task_recipe = task_recipe(task)
            self._ctx = multiprocessing.get_context("spawn")
            for _ in range(workers):
                self._workers.append(self._start_worker())

    # -- public API -----------------------------------------------------------------------------

    def submit(self, items: Sequence[tuple[Prompt, str, bool]]) -> RewardHandle:
        """Queue samples ``(prompt, response_text, stopped)``; returns at once (``workers > 0``)."""
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        handle = RewardHandle(self, len(items))
        if not items:
            self._completed.append(handle)
            return handle
        data = [(p.index, p.text, p.answer, str(r), bool(s)) for p, r, s in items]
        if self.workers == 0:
            self._score_locally(handle, data)
            return handle
        self._pending.add(handle)
        per = max(1, min(self.chunk_size, -(-len(data) // self.workers)))
        for start in range(0, len(data), per):
            positions = list(range(start, min(start + per, len(data))))
            self._queue.append(_Chunk(handle, positions, [data[i] for i in positions]))
        self.poll()
        return handle

    def poll(self) -> list[RewardHandle]:
        """Advance without blocking: read results, enforce timeouts, dispatch queued work.

        Returns the handles completed since the previous ``poll``.
        """
        if self.workers and not self._closed:
            self._read_messages()
            self._enforce_timeouts()
            self._dispatch()
        done, self._completed = self._completed, []
        return done

    def result(self, handle: RewardHandle, timeout: float | None = None) -> list[float]:
        """Block until ``handle`` is done (TimeoutError after ``timeout`` seconds)."""
        end = math.inf if timeout is None else time.monotonic() + timeout
        while not handle.done():
            now = time.monotonic()
            if now >= end:
                raise TimeoutError(f"rewards not ready after {timeout} s")
            wake = min([end, now + 1.0] + [w.deadline for w in self._workers])
            multiprocessing.connection.wait(
                [w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers],
                timeout=max(0.0, wake - now))
        if handle._cancelled and handle._left:
            raise RuntimeError("RewardPool was closed before these rewards were computed")
        return list(handle.rewards)

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers (idle ones are asked to exit, busy or stuck ones killed).

        Unfinished handles are cancelled: their ``done()`` is True and ``result()`` raises.
        """
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                if w.chunk is None:
                    w.conn.send(None)
                else:
                    w.proc.kill()
            except OSError:
                pass
        end = time.monotonic() + timeout
        for w in self._workers:
            w.proc.join(max(0.0, end - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            w.conn.close()
        self._workers = []
        self._queue.clear()
        for h in self._pending:
            h._cancelled = True
        self._pending.clear()

    def __enter__(self) -> RewardPool:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------

    def _start_worker(self) -> _Worker:
        return _Worker(*start_worker(self._ctx, self.spec, self._task_recipe, self.reward_model, self.answer))

    def _score_locally(self, handle: RewardHandle, data: list[tuple[int, str, str, str, bool]]) -> None:
        prompts = [Prompt(index=i, text=t, answer=a) for i, t, a, _, _ in data]
        events = self._local.score(prompts, [d[3] for d in data], [d[4] for d in data])
        positions = iter(range(len(data)))
        for kind, payload in events:
            if kind == "item":
                pos = next(positions)
                self._record(handle, pos, data[pos], *payload)

    def _record(self, handle: RewardHandle, pos: int, item: tuple, value: float,
                errors: list[tuple[str, str]]) -> None:
        for name, message in errors:
            self.errors += 1
            REWARD_ERRORS.inc()
            log.warning("reward function %r failed (scored 0) on sample prompt=%s response=%s\n%s",
                        name, _short(item[1]), _short(item[3]), message.rstrip())
        if handle._set(pos, value, "error" if errors else "ok"):
            self._finish(handle)

    def _finish(self, handle: RewardHandle) -> None:
        self._pending.discard(handle)
        self._completed.append(handle)

    def _read_messages(self) -> None:
        conns = [w.conn for w in self._workers]
        for conn in multiprocessing.connection.wait(conns, timeout=0):
            w = next((w for w in self._workers if w.conn is conn), None)
            if w is None:  # replaced while handling an earlier connection
                continue
            try:
                while w.conn.poll():
                    self._on_message(w, w.conn.recv())
            except (EOFError, OSError):
                self._on_worker_death(w)

    def _on_message(self, w: _Worker, msg: tuple) -> None:
        kind = msg[0]
        if kind == "init_error":
            self.close()
            raise RuntimeError(f"a reward worker failed to build the reward function:\n{msg[1]}")
        if kind == "ready":
            w.ready = True
            return
        chunk = w.chunk
        assert chunk is not None, f"reward worker sent {kind!r} while idle"
        w.deadline = time.monotonic() + self.timeout_s
        if kind == "batched":
            chunk.batched_done = True
            return
        pos = chunk.reported
        chunk.reported += 1
        if chunk.reported == len(chunk.items):
            w.chunk, w.deadline = None, math.inf
        self._record(chunk.handle, chunk.positions[pos], chunk.items[pos], msg[1], msg[2])

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        for w in list(self._workers):
            if w.chunk is not None and now >= w.deadline:
                self._fail_current(w, "timeout")

    def _on_worker_death(self, w: _Worker) -> None:
        if not w.ready:
            code = w.proc.exitcode
            self.close()
            raise RuntimeError(f"a reward worker died while starting (exit code {code})")
        if w.chunk is None:
            self._replace(w)
        else:
            self._fail_current(w, "died")

    def _fail_current(self, w: _Worker, why: str) -> None:
        """Score the sample in progress 0 (all of the chunk if the batched pass was running),
        requeue the rest, replace the worker."""
        chunk = w.chunk
        assert chunk is not None
        w.chunk = None
        failed = range(chunk.reported, chunk.reported + 1 if chunk.batched_done else len(chunk.items))
        for pos in failed:
            item = chunk.items[pos]
            if why == "timeout":
                self.timeouts += 1
                REWARD_TIMEOUTS.inc()
                log.warning("reward computation timed out after %.1f s (scored 0; worker %d replaced) on "
                            "sample prompt=%s response=%s", self.timeout_s, w.proc.pid, _short(item[1]),
                            _short(item[3]))
            else:
                self.errors += 1
                REWARD_ERRORS.inc()
                log.warning("reward worker %d died (exit code %s; scored 0) on sample prompt=%s response=%s",
                            w.proc.pid, w.proc.exitcode, _short(item[1]), _short(item[3]))
            if chunk.handle._set(chunk.positions[pos], 0.0, "timeout" if why == "timeout" else "error"):
                self._finish(chunk.handle)
        rest = failed.stop
        if rest < len(chunk.items):
            self._queue.appendleft(_Chunk(chunk.handle, chunk.positions[rest:], chunk.items[rest:]))
        self._replace(w)

    def _replace(self, w: _Worker) -> None:
        w.proc.kill()
        w.proc.join()
        w.conn.close()
        self._workers[self._workers.index(w)] = self._start_worker()

    def _dispatch(self) -> None:
        for w in self._workers:
            if not self._queue:
                return
            if w.ready and w.chunk is None:
                chunk = self._queue.popleft()
                w.chunk = chunk
                w.deadline = time.monotonic() + self.timeout_s
                w.conn.send(chunk.items)


def _short(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + f"...[{len(text)} chars]")
