"""Run a function on N gloo trainer ranks (spawned processes with the standard env vars), for tests.

Each rank calls ``fn(*args)`` after `trainer.distributed.init_dist` has read its environment; the
results come back in rank order. Every wait is bounded: a rank that fails, hangs or dies makes
`run_ranks` raise with the rank and its traceback instead of blocking the suite.
"""
from __future__ import annotations

import io
import os
import queue
import time
import traceback

import torch.multiprocessing as mp
from conftest import free_ports


def _entry(fn, rank: int, world: int, port: int, q, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    import torch

    torch.set_num_threads(1)
    try:
        buf = io.BytesIO()  # by value: a tensor shared through the queue dies with this process
        torch.save(fn(*args), buf)
        q.put((rank, True, buf.getvalue()))
    except Exception:  # noqa: BLE001 -- any failure goes back to the parent with its traceback
        q.put((rank, False, traceback.format_exc()))
    finally:
        from trainer.distributed import close_dist

        close_dist()


def run_ranks(fn, world: int, *args, timeout_s: float = 60.0) -> list:
    """``fn(*args)`` on ``world`` spawned ranks; returns their results by rank, raises on any rank's failure."""
    results = run_ranks_partial(fn, world, *args, timeout_s=timeout_s)
    missing = [r for r in range(world) if r not in results]
    if missing:
        raise RuntimeError(f"ranks {missing} exited without a result")
    return [results[r] for r in range(world)]


def run_ranks_partial(fn, world: int, *args, timeout_s: float = 60.0) -> dict[int, object]:
    """Like `run_ranks`, for tests where a rank dies on purpose: the results of the ranks that returned,
    once every rank has returned or exited (a rank's exception still raises)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_ports(1)[0]
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, q, args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(errors) < world:
            try:
                rank, ok, value = q.get(timeout=1.0)
            except queue.Empty:
                exited = sum(p.exitcode is not None for p in procs)
                if exited == world and q.empty():
                    break  # every rank is gone; those without a result died
                if time.monotonic() < deadline:
                    continue
                raise TimeoutError(f"waited {timeout_s:g}s for {world} trainer ranks; results from ranks "
                                   f"{sorted(results)}, exit codes {[p.exitcode for p in procs]}") from None
            if ok:
                import torch

                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return results
