"""Reward functions, their weighted composition, and a process pool that scores with a timeout.

Every reward function has one signature, ``fn(prompt: Prompt, response_text: str, stopped: bool)
-> float`` (``stopped``: the response ended with EOS). Built in, by name:

- ``accuracy``: the task's own reward (exact match for ``arith``, math-verify for ``jsonl``).
- ``math_accuracy``: 1.0 iff math-verify finds the response equivalent to ``prompt.answer``.
- ``think_answer_format``: DeepSeek-R1's format reward, see :data:`THINK_ANSWER_RE`.
- ``reward_model``: a sequence-classification model's score of ``prompt.text + response_text``
  (:mod:`areal_py.reward_model`); needs ``reward_model={"path": ...}``.
- ``"package.module:function"``: your own verifier, imported by path. This is how users plug in
  their own rewards: any top-level function with the signature above, importable in a fresh
  Python process (it is imported again in every pool worker).

A spec is a ``{name: weight}`` dict; :func:`build_reward_fn` turns it into the weighted sum
``sum(weight * fn(...))``, e.g. ``{"accuracy": 1.0, "think_answer_format": 0.5}``.

:class:`RewardPool` scores lists of samples in worker processes (or in the calling thread when
``workers=0``) behind a non-blocking ``submit`` / ``poll`` / ``done`` API for a single-threaded
poll loop. A verifier that runs past ``timeout_s`` gives 0.0 and is counted; its worker is
killed and replaced so later samples are not held up. A verifier that raises gives 0.0 for its
own term, is logged with the sample and counted.
"""
from __future__ import annotations

import ctypes
import functools
import importlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from areal_py.metrics import REWARD_ERRORS, REWARD_TIMEOUTS

from areal_py.tasks import ArithTask, JsonlTask, Prompt, Task, make_task, math_reward
from areal_py.sum_cot import SumCotTask

log = logging.getLogger(__name__)

RewardFn = Callable[[Prompt, str, bool], float]


# ---------------------------------------------------------------------------------------------
# Reward functions


def _task_accuracy(task: Task, prompt: Prompt, response_text: str, stopped: bool) -> float:
    return float(task.reward(prompt, response_text, stopped))


def accuracy(task: Task) -> RewardFn:
    """The task's own reward as a reward function (a partial over ``task``)."""
    return functools.partial(_task_accuracy, task)


_ANSWER_BLOCK_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def math_accuracy(prompt: Prompt, response_text: str, stopped: bool) -> float:
    """1.0 iff math-verify finds the response's answer equivalent to ``prompt.answer``.

    If the response has ``<answer>...</answer>`` blocks, only the last block's content is graded
    (math-verify alone scores ``<answer>12</answer>`` as wrong, and would pick up numbers from
    the think block); otherwise math-verify extracts the answer from the whole text (a
    ``\\boxed{}`` first, else the final expression). ``stopped`` is ignored, so a truncated
    response that already holds the answer still counts.
    """
    blocks = _ANSWER_BLOCK_RE.findall(response_text)
    return math_reward(prompt.answer, blocks[-1] if blocks else response_text)


_NO_TAG = r"(?:(?!</?(?:think|answer)>).)*"
THINK_ANSWER_RE = re.compile(rf"\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*", re.DOTALL)
"""The format ``think_answer_format`` checks, applied with ``fullmatch``::

    \\s*<think>X</think>\\s*<answer>X</answer>\\s*      (re.DOTALL)
    X = (?:(?!</?(?:think|answer)>).)*                  any text, newlines included, without a tag

So exactly one think block then exactly one answer block; only whitespace before, between and
after; tags are case-sensitive; either block may be empty (as in DeepSeek-R1 / open-r1, where
``.*?`` also allows it); no ``<think>``, ``</think>``, ``<answer>`` or ``</answer>`` inside a block.
"""


def think_answer_format(prompt: Prompt, response_text: str, stopped: bool) -> float:
    """1.0 iff the response is ``<think>...</think><answer>...</answer>`` (see THINK_ANSWER_RE)."""
    return 1.0 if THINK_ANSWER_RE.fullmatch(response_text) else 0.0


def _constant(fn: RewardFn) -> Callable[[Task | None], RewardFn]:
    return lambda task: fn


# name -> builder(task) -> reward function. `accuracy` needs a task; the others ignore it.
REWARD_FUNCTIONS: dict[str, Callable[[Task | None], RewardFn]] = {
    "accuracy": lambda task: accuracy(_need_task(task)),
    "math_accuracy": _constant(math_accuracy),
    "think_answer_format": _constant(think_answer_format),
}
REWARD_MODEL = "reward_model"


def _need_task(task: Task | None) -> Task:
    if task is None:
        raise ValueError("reward function 'accuracy' needs a task")
    return task


def allowed_names() -> list[str]:
    return [*sorted(REWARD_FUNCTIONS), REWARD_MODEL, "module:function"]


def import_reward_fn(path: str) -> RewardFn:
    """Import ``"package.module:function"``."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"custom reward {path!r}: expected 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"custom reward {path!r} cannot be imported: {e}") from e
    if not callable(fn):
        raise ValueError(f"custom reward {path!r} is not callable")
    return fn


class WeightedReward:
    """``sum(weight * fn(prompt, response_text, stopped))`` over named terms.

    Calling it lets exceptions propagate; :meth:`score` (used by :class:`RewardPool`) catches
    them per term instead. A term with a ``batch(prompts, responses, stopped) -> list[float]``
    method (the reward model) is evaluated for a whole list at once by :meth:`score`.
    """

    def __init__(self, terms: list[tuple[str, float, RewardFn]]) -> None:
        self.terms = terms

    def __call__(self, prompt: Prompt, response_text: str, stopped: bool) -> float:
        return sum(w * _checked(fn(prompt, response_text, stopped)) for _, w, fn in self.terms)

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str], stopped: Sequence[bool]
              ) -> Iterator[tuple[str, Any]]:
        """Yield ``("batched", None)`` once the batched terms are done, then for each sample
        ``("item", (value, errors))`` with errors a list of ``(term name, message)``."""
        batched: dict[str, list[float] | str] = {}
        for name, _, fn in self.terms:
            if hasattr(fn, "batch"):
                try:
                    values = fn.batch(prompts, responses, stopped)
                    if len(values) != len(prompts):
                        raise ValueError(f"batch returned {len(values)} values for {len(prompts)} samples")
                    batched[name] = [_checked(v) for v in values]
                except Exception:  # noqa: BLE001 - reported per sample below
                    batched[name] = _format_exc()
        yield "batched", None
        for i, (prompt, response, stop) in enumerate(zip(prompts, responses, stopped)):
            total, errors = 0.0, []
            for name, w, fn in self.terms:
                if name in batched:
                    value = batched[name]
                    if isinstance(value, str):
                        errors.append((name, value))
                    else:
                        total += w * value[i]
                    continue
                try:
                    total += w * _checked(fn(prompt, response, stop))
                except Exception:  # noqa: BLE001 - a verifier failure scores 0 and is reported
                    errors.append((name, _format_exc()))
            yield "item", (total, errors)


def _checked(value: Any) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"reward is not finite: {value}")
    return value


def _format_exc(limit: int = 2000) -> str:
    text = traceback.format_exc()
    return text if len(text) <= limit else "..." + text[-limit:]


def validate_spec(spec: dict[str, float], reward_model: dict[str, Any] | None = None) -> None:
    """Check names and weights without building anything expensive (no model is loaded)."""
    if not spec:
        raise ValueError(f"empty reward spec; name at least one of {allowed_names()}")
    for name, weight in spec.items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
            raise ValueError(f"reward {name!r}: weight must be a finite number, got {weight!r}")
        if name in REWARD_FUNCTIONS:
            continue
        if name == REWARD_MODEL:
            if not reward_model or not reward_model.get("path"):
                raise ValueError("reward 'reward_model' needs reward_model={'path': <model directory>}")
            continue
        if ":" in name:
            import_reward_fn(name)
            continue
        raise ValueError(f"unknown reward function {name!r}; allowed: {allowed_names()}")


def build_reward_fn(spec: dict[str, float], task: Task | None,
                    reward_model: dict[str, Any] | None = None) -> WeightedReward:
    """The weighted sum of the named reward functions, e.g. ``{"accuracy": 1, "think_answer_format": 0.5}``.

    ``reward_model``: keyword arguments of :class:`areal_py.reward_model.RewardModelScorer`
    (``path`` required), used when the spec names ``reward_model``; the model is loaded here.
    Unknown names raise ValueError listing the allowed ones.
    """
    validate_spec(spec, reward_model)
    terms: list[tuple[str, float, RewardFn]] = []
    for name, weight in spec.items():
        if name in REWARD_FUNCTIONS:
            fn = REWARD_FUNCTIONS[name](task)
        elif name == REWARD_MODEL:
            from areal_py.reward_model import RewardModelReward, RewardModelScorer  # torch + transformers

            fn = RewardModelReward(RewardModelScorer(**reward_model))
        else:
            fn = import_reward_fn(name)
        terms.append((name, float(weight), fn))
    return WeightedReward(terms)


def task_config(task: Task | dict[str, Any] | None) -> dict[str, Any] | None:
    """Plain-data description of a task, rebuilt in workers with ``make_task(**config)``.

    Built-in tasks are converted; for your own task pass a dict ``{"name": ..., **kwargs}``
    that ``areal_py.tasks.make_task`` understands.
    """
    if task is None or isinstance(task, dict):
        return task
    if isinstance(task, ArithTask):
        return {"name": "arith", "min_operand": task.min_operand, "max_operand": task.max_operand, "seed": task.seed}
    if isinstance(task, JsonlTask):
        return {"name": "jsonl", "path": str(task.path), "prompt_key": task.prompt_key,
                "answer_key": task.answer_key, "seed": task.seed}
    if isinstance(task, SumCotTask):
        return {"name": "sum_cot", "min_terms": task.min_terms, "max_terms": task.max_terms, "alpha": task.alpha,
                "seed": task.seed}
    raise TypeError(f"cannot describe task {type(task).__name__} as plain data; pass a task config dict")


def _build_task(config: dict[str, Any] | None) -> Task | None:
    if config is None:
        return None
    config = dict(config)
    return make_task(config.pop("name"), **config)


# ---------------------------------------------------------------------------------------------
# Worker process


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel kills this worker when the thread that started it exits (PR_SET_PDEATHSIG),
    so a worker stuck in a verifier is not orphaned if the pool's process is killed."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _worker_main(conn: multiprocessing.connection.Connection, parent_pid: int, spec: dict[str, float],
                 task_cfg: dict[str, Any] | None, reward_model: dict[str, Any] | None) -> None:
    """Build the reward function once, then score chunks until told to stop (None) or EOF.

    In:  None | list of (prompt index, prompt text, answer, response text, stopped).
    Out: ("ready",) | ("init_error", traceback) | ("batched",) | ("item", value, errors).
    """
    _die_with_parent(parent_pid)
    try:
        reward = build_reward_fn(spec, _build_task(task_cfg), reward_model)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("init_error", _format_exc()))
        return
    conn.send(("ready",))
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):  # the parent went away
            return
        if chunk is None:
            return
        prompts = [Prompt(index=i, text=t, answer=a) for i, t, a, _, _ in chunk]
        for kind, payload in reward.score(prompts, [c[3] for c in chunk], [c[4] for c in chunk]):
            conn.send(("batched",) if kind == "batched" else ("item", *payload))


# ---------------------------------------------------------------------------------------------
# Pool


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

    ``RewardPool(spec, task, workers=2, timeout_s=10.0, reward_model=None, chunk_size=8)``:

    - ``spec``: ``{name: weight}``, see :func:`build_reward_fn`; validated here.
    - ``task``: a built-in task or a task config dict ``{"name": ..., **kwargs}`` (workers rebuild
      it; see :func:`task_config`); None if no ``accuracy`` term.
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

    Single-threaded use: ``h = pool.submit(items)``; call ``h.done()`` or ``pool.poll()`` (which
    returns the handles completed since the last poll) from your loop; ``h.result()`` (or
    ``pool.result(h, timeout)``) blocks. Timeouts are detected when the pool is polled, so poll
    regularly. Not thread-safe: use one pool from one thread. ``close()`` stops the workers.
    On Linux workers die with the thread that started them (so none is orphaned if this process
    is killed): create the pool on a long-lived thread, e.g. the main one.
    """

    def __init__(self, spec: dict[str, float], task: Task | dict[str, Any] | None = None, *, workers: int = 2,
                 timeout_s: float = 10.0, reward_model: dict[str, Any] | None = None, chunk_size: int = 8) -> None:
        if workers < 0 or chunk_size < 1 or not timeout_s > 0:
            raise ValueError("need workers >= 0, chunk_size >= 1, timeout_s > 0")
        validate_spec(spec, reward_model)
        self.spec = dict(spec)
        self.workers = workers
        self.timeout_s = timeout_s
        self.chunk_size = chunk_size
        self.reward_model = reward_model
        self.timeouts = 0
        self.errors = 0
        self._closed = False
        self._completed: list[RewardHandle] = []
        self._pending: set[RewardHandle] = set()
        self._queue: deque[_Chunk] = deque()
        self._workers: list[_Worker] = []
        if workers == 0:
            local_task = task if task is None or not isinstance(task, dict) else _build_task(task)
            self._local = build_reward_fn(self.spec, local_task, reward_model)
        else:
            if "accuracy" in self.spec and task is None:
                raise ValueError("reward function 'accuracy' needs a task")
            self._task_cfg = task_config(task)
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

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, name="reward-worker", daemon=True,
                                 args=(child_conn, os.getpid(), self.spec, self._task_cfg, self.reward_model))
        proc.start()
        child_conn.close()
        return _Worker(proc, parent_conn)

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
