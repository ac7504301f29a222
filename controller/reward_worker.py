"""One reward worker process: what runs in it, and how the pool starts it (controller/reward_pool.py).

The worker builds the reward function once, then scores the chunks its pipe brings, one reply per event:
in ``None`` (stop) or a list of (prompt index, prompt text, answer, response text, stopped); out
``("ready",)`` once built, ``("init_error", traceback)`` if building failed, ``("batched",)`` after a chunk's
batched reward-model pass, and ``("item", value, errors)`` per sample, in order. Only plain data crosses
the pipe (the task travels as its recipe), so the worker is started with ``spawn``.

Invariant: on Linux a worker dies with the thread that started it (PR_SET_PDEATHSIG), so one stuck in a
verifier is never orphaned when the pool's process is killed.
"""
from __future__ import annotations

import ctypes
import multiprocessing.connection
import os
import signal
from typing import Any

from areal_py.rewards.functions import build_reward_fn, short_traceback, task_from_recipe
from areal_py.tasks.answer_extraction import AnswerExtraction
from areal_py.tasks.base import Prompt, TaskRecipe


def die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel kills this worker when the thread that started it exits (PR_SET_PDEATHSIG),
    so a worker stuck in a verifier is not orphaned if the pool's process is killed."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def worker_main(conn: multiprocessing.connection.Connection, parent_pid: int, spec: dict[str, float],
                task: TaskRecipe | None, reward_model: dict[str, Any] | None, answer: AnswerExtraction) -> None:
    """Build the reward function once, then score chunks until told to stop (None) or EOF.

    In:  None | list of (prompt index, prompt text, answer, response text, stopped).
    Out: ("ready",) | ("init_error", traceback) | ("batched",) | ("item", value, errors).
    """
    die_with_parent(parent_pid)
    try:
        reward = build_reward_fn(spec, task_from_recipe(task), reward_model, answer)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("init_error", short_traceback()))
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


def start_worker(ctx: Any, spec: dict[str, float], task: TaskRecipe | None, reward_model: dict[str, Any] | None,
                 answer: AnswerExtraction) -> tuple[Any, multiprocessing.connection.Connection]:
    """Start one worker in multiprocessing context `ctx` (``spawn``); return (its process, the pool's end of
    its pipe)."""
    parent_conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=worker_main, name="reward-worker", daemon=True,
                       args=(child_conn, os.getpid(), spec, task, reward_model, answer))
    proc.start()
    child_conn.close()
    return proc, parent_conn
