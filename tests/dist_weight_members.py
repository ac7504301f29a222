"""Weight-group members for tests: rollout-server stand-ins in spawned processes, and the harness that runs
them beside trainer rank 0 in the test process.

A member joins the group, then follows a script of rounds: for each, the layout announced to it (in the
real system it arrives over ZeroMQ; here the parent passes it in the script), what it does, and what it
reports back. Every wait is bounded: a member that fails, hangs or dies surfaces as a result or an exit
code, never a blocked suite.
"""
from __future__ import annotations

import io
import os
import queue
import signal
import time
import traceback
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp
from conftest import free_ports

from areal_py.wire import dist_weights as D
from areal_py.wire import protocol as P


@dataclass(frozen=True)
class Round:
    version: int
    layout: dict  # P.DistLayout.model_dump(): plain data across the process boundary
    die_after_buckets: int | None = None  # SIGKILL itself after receiving this many buckets


def tiny_weights(seed: int) -> dict[str, torch.Tensor]:
    from tiny_models import tiny_model

    return {k: v.detach().clone() for k, v in tiny_model(seed=seed).named_parameters()}


def plain_weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(64, 64, generator=g) for i in range(4)}


def specs_of(weights: dict[str, torch.Tensor]) -> dict[str, tuple[str, list[int]]]:
    """A model's parameter names, dtypes and shapes as plain data: members rebuild a model of that shape
    without importing transformers (seconds per spawned process on a busy machine)."""
    return {k: (str(v.dtype).removeprefix("torch."), list(v.shape)) for k, v in weights.items()}


def own_weights(specs: dict[str, tuple[str, list[int]]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g).to(getattr(torch, dtype)) for k, (dtype, shape) in specs.items()}


def _member(rank: int, num_servers: int, port: int, timeout_s: float, specs: dict, rounds: list[Round], q) -> None:
    torch.set_num_threads(1)
    try:
        own = own_weights(specs, seed=100 + rank)  # the model's shape, other values than the trainer's
        expected = {k: (v.dtype, tuple(v.shape)) for k, v in own.items()}
        g = D.WeightGroup.join_member(host="127.0.0.1", port=port, rank=rank, num_servers=num_servers,
                                      timeout_s=timeout_s, join_timeout_s=60)
        for r in rounds:
            layout = P.DistLayout.model_validate(r.layout)
            if r.die_after_buckets is not None:  # take part as far as told, then die mid-broadcast
                g._bcast(torch.zeros(4, dtype=torch.int64), "header")
                for b in layout.buckets[:r.die_after_buckets]:
                    g._bcast(torch.empty(b.nbytes, dtype=torch.uint8), "bucket")
                os.kill(os.getpid(), signal.SIGKILL)
            t0 = time.monotonic()
            try:
                got = g.receive(layout, r.version, expected)
                own.update({k: v.clone() for k, v in got.items()})
                buf = io.BytesIO()  # by value: a tensor shared through the queue dies with this process
                torch.save(own, buf)
                q.put((rank, r.version, "ok", buf.getvalue()))
            except D.DistRejected as e:
                q.put((rank, r.version, f"rejected:{e.reason}", None))
            except D.DistWeightsError as e:
                q.put((rank, r.version, "error", (str(e), time.monotonic() - t0)))
                return
    except Exception:  # noqa: BLE001 - any failure goes back to the parent with its traceback
        q.put((rank, -1, "crash", traceback.format_exc()))


class Members:
    """`num_servers` member processes with their scripts (rank -> rounds); the test process is rank 0."""

    def __init__(self, num_servers: int, scripts: dict[int, list[Round]], *, specs: dict, timeout_s: float) -> None:
        ctx = mp.get_context("spawn")
        self.q = ctx.Queue()
        self.port = free_ports(1)[0]
        self.num_servers = num_servers
        self.timeout_s = timeout_s
        self.procs = {r: ctx.Process(target=_member, args=(r, num_servers, self.port, timeout_s, specs, s, self.q),
                                     daemon=True) for r, s in scripts.items()}
        for p in self.procs.values():
            p.start()

    def join_root(self) -> D.WeightGroup:
        return D.WeightGroup.join_root(host="127.0.0.1", port=self.port, num_servers=self.num_servers,
                                       timeout_s=self.timeout_s, join_timeout_s=60)

    def results(self, n: int, wait_s: float) -> list[tuple]:
        out = []
        for _ in range(n):
            try:
                out.append(self.q.get(timeout=wait_s))
            except queue.Empty:
                raise TimeoutError(f"waited {wait_s:g}s for member results; got {[r[:3] for r in out]}, exit codes "
                                   f"{ {r: p.exitcode for r, p in self.procs.items()} }") from None
        crashed = [r for r in out if r[2] == "crash"]
        assert not crashed, crashed[0][3]
        return [(*r[:3], torch.load(io.BytesIO(r[3])) if r[2] == "ok" else r[3]) for r in out]

    def close(self) -> None:
        for p in self.procs.values():
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
