"""The trainer's ranks: the torch.distributed process group, and collectives that fail with a named error.

A trainer of world size N is N processes started with the standard environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT: what ``torchrun`` and ``areal-py run`` set). World size 1
(WORLD_SIZE unset or 1) creates no process group at all, so the single-process trainer runs
exactly as before. The backend follows the device: NCCL when CUDA is available, gloo on CPU.

Every wait has a bound. The process group is created with ``timeout_s``, and the collectives the
trainer itself issues go through `all_reduce`, `broadcast` and `scatter` here, which wait on the
async work handle with that timeout and turn a timeout or a peer's failure into `DistError`
naming the collective, this rank and the step, instead of a bare backend error or a hang.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from areal_py.wire.netaddr import interface_toward

log = logging.getLogger("trainer.distributed")

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistError(RuntimeError):
    """A collective between trainer ranks failed or timed out; the message names the collective, the rank
    and the step (a crashed or stuck peer shows up here, within the timeout)."""


@dataclass(frozen=True)
class Dist:
    """Where this process sits among the trainer's ranks. ``backend`` is "gloo" or "nccl", or "none" when
    there is no process group (world size 1)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that talks to the controller, publishes weights and writes metrics."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when there is a process group (world size > 1)."""
        return self.world_size > 1

    @classmethod
    def single(cls, device: torch.device | None = None) -> Dist:
        """World size 1, no process group."""
        return cls(rank=0, world_size=1, local_rank=0, backend="none", device=device or torch.device("cpu"))


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"{name} is not set: a trainer with WORLD_SIZE > 1 needs {', '.join(_ENV)} "
                             "(torchrun and `areal-py run trainer.world_size=N` set them)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


def init_dist(timeout_s: float, longest_wait_s: float | None = None) -> Dist:
    """Join the trainer's process group from the environment, or return `Dist.single()` when WORLD_SIZE is
    unset or 1 (no process group is created). ``timeout_s`` bounds the rendezvous and every collective issued
    here; ``longest_wait_s`` (>= timeout_s) is the backend's own bound, for the one wait that may legitimately
    be longer (ranks > 0 waiting for the next batch while rank 0 waits for the controller)."""
    if timeout_s <= 0:
        raise ValueError(f"dist timeout must be > 0 seconds, got {timeout_s}")
    world = _env_int("WORLD_SIZE", 1)
    if world < 1:
        raise ValueError(f"WORLD_SIZE={world}: must be >= 1")
    cuda = torch.cuda.is_available()
    if world == 1:
        return Dist.single(torch.device("cuda", torch.cuda.current_device()) if cuda else None)
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(f"{name} is not set: a trainer with WORLD_SIZE > 1 needs {', '.join(_ENV)}")
    if tdist.is_initialized():
        raise RuntimeError("init_dist: a torch.distributed process group already exists in this process")
    if cuda:
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        _choose_gloo_interface()
    try:
        tdist.init_process_group(backend=backend, rank=rank, world_size=world,
                                 timeout=datetime.timedelta(seconds=max(timeout_s, longest_wait_s or 0.0)))
    except Exception as e:  # rendezvous timeout (a rank never started) or a bad address
        raise DistError(f"rank {rank}/{world}: joining the trainer process group at "
                        f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({backend}) failed within "
                        f"{timeout_s:g}s: {e}") from e
    _TIMEOUT[0] = timeout_s
    log.info("trainer rank %d/%d (local %d) joined the process group: %s on %s", rank, world, local_rank,
             backend, device)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=device)


def _choose_gloo_interface() -> None:
    """Set GLOO_SOCKET_IFNAME (unless the user set it) to the interface this host reaches MASTER_ADDR through.

    Without it gloo binds and advertises the address of the host name, which Debian's /etc/hosts and many
    containers map to loopback: a rank on another host would then be told to connect to its own 127.0.x.x.
    A loopback MASTER_ADDR (every rank on this host) leaves gloo's own choice."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    host, port = os.environ["MASTER_ADDR"], _env_int("MASTER_PORT")
    try:
        name = interface_toward(host, port)
    except OSError as e:
        raise DistError(f"trainer ranks: MASTER_ADDR={host}: {e}") from None
    if name is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = name
        log.info("gloo: GLOO_SOCKET_IFNAME=%s (the interface toward MASTER_ADDR=%s)", name, host)


_TIMEOUT = [0.0]  # the process group's timeout, the default bound of the collectives below


def close_dist() -> None:
    """Leave the process group (if any). Safe to call when none exists or it was already closed."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def _wait(work, what: str, dist: Dist, step: int | None, timeout_s: float | None) -> None:
    bound = timeout_s if timeout_s is not None else _TIMEOUT[0]
    where = f"rank {dist.rank}/{dist.world_size}" + (f", step {step}" if step is not None else "")
    try:
        ok = work.wait(timeout=datetime.timedelta(seconds=bound)) if bound else work.wait()
    except Exception as e:
        raise DistError(f"{what} ({where}) failed or timed out after at most {bound:g}s: a peer rank crashed, "
                        f"exited or is stuck ({type(e).__name__}: {e})") from e
    if ok is False:
        raise DistError(f"{what} ({where}) did not complete within {bound:g}s")


def _staged(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """``t`` where the backend can move it: NCCL only moves GPU tensors (gloo takes CPU ones as they are)."""
    return t.to(dist.device) if dist.backend == "nccl" and t.device != dist.device else t


def all_reduce(t: torch.Tensor, dist: Dist, what: str, step: int | None = None, op=None,
               timeout_s: float | None = None) -> torch.Tensor:
    """In-place all-reduce (sum by default) of ``t`` over the trainer's ranks; a no-op at world size 1."""
    if dist.distributed:
        x = _staged(t, dist)
        work = tdist.all_reduce(x, op=op if op is not None else tdist.ReduceOp.SUM, async_op=True)
        _wait(work, f"all_reduce of {what}", dist, step, timeout_s)
        if x is not t:
            t.copy_(x)
    return t


def broadcast(t: torch.Tensor, dist: Dist, what: str, step: int | None = None, src: int = 0,
              timeout_s: float | None = None) -> torch.Tensor:
    """In-place broadcast of ``t`` from rank ``src``; every rank must pass a tensor of the same shape and dtype."""
    if dist.distributed:
        x = _staged(t, dist)
        work = tdist.broadcast(x, src=src, async_op=True)
        _wait(work, f"broadcast of {what} from rank {src}", dist, step, timeout_s)
        if x is not t:
            t.copy_(x)
    return t


def scatter(out: torch.Tensor, chunks: list[torch.Tensor] | None, dist: Dist, what: str, step: int | None = None,
            src: int = 0, timeout_s: float | None = None) -> torch.Tensor:
    """Rank ``src`` sends ``chunks[r]`` to rank r (each the shape of ``out``); the others pass ``chunks=None``.
    gloo has no scatter with unequal sizes, so callers pad to one shape and send the true sizes first."""
    if not dist.distributed:
        if chunks is not None:
            out.copy_(chunks[0])
        return out
    x = _staged(out, dist)
    sends = [_staged(c, dist) for c in chunks] if dist.rank == src and chunks is not None else None
    work = tdist.scatter(x, scatter_list=sends, src=src, async_op=True)
    _wait(work, f"scatter of {what} from rank {src}", dist, step, timeout_s)
    if x is not out:
        out.copy_(x)
    return out
