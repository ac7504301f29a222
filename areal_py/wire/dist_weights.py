"""Weights over a torch.distributed group of their own: trainer rank 0 broadcasts, every rollout server receives.

The group is separate from the trainer's FSDP world: a TCPStore hosted by trainer rank 0 at
`weights.dist_host:dist_port` and a `ProcessGroupGloo` (`ProcessGroupNCCL` on CUDA) built directly on
it, so the default process group is never touched. Rank 0 is the trainer; the server whose id ends
in `-i` is rank i + 1; the size is 1 + `rollout.num_servers`. The group forms once, at start, with
every member present; a server started after that (a restart) finds the store's `formed` key and
stays out (`join_member` returns None): it gets weights over the controller's catch-up path.

What travels where: the layout (names, dtypes, shapes, offsets, bucket by bucket) and the version ride
the ZeroMQ `UpdateWeights.dist` (areal_py/wire/protocol/); the group carries only bytes: first a
header `[MAGIC, version, buckets, total bytes]`, then each bucket as one flat uint8 tensor.

Invariants:
- A receiver checks the layout against its own model before the first byte (`check_layout`); a layout
  it rejects is still received into scratch and dropped (bounded by its own model's size), because a
  member that stays away stalls every other member until the timeout.
- Every collective waits at most `timeout_s`; a dead or stuck peer surfaces as `DistWeightsError`
  naming the step, the rank and the group, never as a hang. A group that failed once is closed for
  good (neither gloo nor NCCL recovers a broken communicator): the caller falls back.
- Offsets are aligned to `ALIGN` bytes so each tensor is a zero-copy view of its bucket.
"""
from __future__ import annotations

import datetime
import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as tdist

from areal_py.wire import protocol as P
from areal_py.wire.netaddr import local_address_toward

log = logging.getLogger("dist_weights")

ALIGN = 64  # bytes: a multiple of every dtype's size, so each tensor's bytes can be viewed as that dtype in place
MAGIC = 0x41524541  # first word of every broadcast header: the bytes on the group are a weight broadcast
FORMED_KEY = "areal/weights/formed"
_PREFIX = "areal/weights/group"
_DTYPE_NAMES = {v: k for k, v in P.DTYPES.items()}

Spec = tuple[torch.dtype, tuple[int, ...]]  # what a receiver's model holds under one name


class DistWeightsError(RuntimeError):
    """A collective of the weight group failed or timed out; the message names the step, rank and group.
    The group is closed afterwards."""


class DistRejected(ValueError):
    """A broadcast whose layout or header does not fit the receiver's model; `reason` labels the metric."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# --- pure layout -------------------------------------------------------------------------------------
def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def tensor_nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= int(s)
    return n


def plan_layout(specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], bucket_bytes: int) -> P.DistLayout:
    """Buckets in the given order: each tensor starts at the next ALIGN boundary of the current bucket, and a
    bucket is closed when the next tensor would end past `bucket_bytes`. A tensor larger than a bucket
    travels alone. A bucket's size is the end of its last tensor (no trailing padding)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket size must be >= 1 byte, got {bucket_bytes}")
    buckets: list[P.DistBucket] = []
    cur: list[P.DistTensor] = []
    end = 0
    for name, dtype, shape in specs:
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name}: dtype {dtype} cannot be broadcast; allowed {sorted(P.DTYPES)}")
        n = tensor_nbytes(dtype, shape)
        offset = _align(end) if cur else 0
        if cur and offset + n > bucket_bytes:
            buckets.append(P.DistBucket(nbytes=end, tensors=cur))
            cur, offset = [], 0
        cur.append(P.DistTensor(name=name, dtype=_DTYPE_NAMES[dtype], shape=list(shape), offset=offset))
        end = offset + n
    if not cur:
        raise ValueError("no tensors to lay out")
    buckets.append(P.DistBucket(nbytes=end, tensors=cur))
    return P.DistLayout(bucket_bytes=bucket_bytes, buckets=buckets)


def layout_for(weights: Mapping[str, torch.Tensor], bucket_bytes: int) -> P.DistLayout:
    return plan_layout(((k, v.dtype, tuple(v.shape)) for k, v in weights.items()), bucket_bytes)


def model_specs(model: torch.nn.Module) -> dict[str, Spec]:
    """What a receiver expects: its parameters (shared ones once, as `named_weights` sends them)."""
    return {name: (p.dtype, tuple(p.shape)) for name, p in model.named_parameters()}


def total_bytes(layout: P.DistLayout) -> int:
    return sum(b.nbytes for b in layout.buckets)


def pack_bucket(weights: Mapping[str, torch.Tensor], bucket: P.DistBucket,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """The bucket's bytes: each tensor's raw bytes at its offset, zeros in the alignment gaps."""
    buf = torch.zeros(bucket.nbytes, dtype=torch.uint8, device=device)
    for t in bucket.tensors:
        src = weights[t.name].detach().reshape(-1)
        n = src.numel() * src.element_size()
        if n:
            buf[t.offset:t.offset + n].copy_(src.contiguous().view(torch.uint8))
    return buf


def unpack_bucket(buf: torch.Tensor, bucket: P.DistBucket) -> dict[str, torch.Tensor]:
    """Zero-copy views of `buf` (uint8), one per tensor of the bucket."""
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != bucket.nbytes:
        raise ValueError(f"bucket buffer is {buf.dtype} {tuple(buf.shape)}, expected uint8 ({bucket.nbytes},)")
    out = {}
    for t in bucket.tensors:
        dtype = P.DTYPES[t.dtype]
        n = tensor_nbytes(dtype, t.shape)
        out[t.name] = buf[t.offset:t.offset + n].view(dtype).reshape(t.shape)
    return out


def check_layout(layout: P.DistLayout, expected: Mapping[str, Spec]) -> None:
    """Raise DistRejected unless `layout` is exactly the plan of `expected`'s tensors in the announced order at
    the announced bucket size: every name known and present once, each dtype and shape the model's, every
    offset and size where `plan_layout` puts it (so no bucket is larger than the model needs)."""
    names = [t.name for b in layout.buckets for t in b.tensors]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:5]
        raise DistRejected("names", f"tensors announced twice: {dup}")
    unknown, missing = sorted(set(names) - set(expected))[:5], sorted(set(expected) - set(names))[:5]
    if unknown or missing:
        raise DistRejected("names", f"unknown {unknown}, missing {missing} (model has {len(expected)} tensors)")
    for b in layout.buckets:
        for t in b.tensors:
            dtype, shape = expected[t.name]
            if P.DTYPES[t.dtype] != dtype:
                raise DistRejected("dtype", f"{t.name}: {t.dtype}, model has {_DTYPE_NAMES.get(dtype, dtype)}")
            if tuple(t.shape) != shape:
                raise DistRejected("shape", f"{t.name}: {tuple(t.shape)}, model has {shape}")
    plan = plan_layout(((n, *expected[n]) for n in names), layout.bucket_bytes)
    if plan != layout:
        got = [(b.nbytes, len(b.tensors)) for b in layout.buckets][:5]
        want = [(b.nbytes, len(b.tensors)) for b in plan.buckets][:5]
        raise DistRejected("size", f"bucket sizes or offsets differ from the plan of the model's tensors at "
                                   f"{layout.bucket_bytes} bytes a bucket: (bytes, tensors) {got}, expected {want}")


def drain_limit(expected: Mapping[str, Spec]) -> int:
    """Most bytes a receiver takes in for a broadcast it rejected: its own model's, plus alignment."""
    return sum(tensor_nbytes(d, s) + ALIGN for d, s in expected.values())


def server_rank(server_id: str, num_servers: int) -> int:
    """Weight-group rank of a server: 1 + the index its id ends with (`rollout-0` -> 1), which must be below
    `rollout.num_servers` (the group's size is fixed when it forms)."""
    m = re.search(r"(\d+)$", server_id)
    if m is None:
        raise ValueError(f"weights.transfer=dist: server id {server_id!r} does not end with its index "
                         f"(rollout-0 .. rollout-{num_servers - 1}), which gives its rank in the weight group")
    index = int(m.group(1))
    if index >= num_servers:
        raise ValueError(f"weights.transfer=dist: server {server_id!r} has index {index}, but the weight group "
                         f"has rollout.num_servers={num_servers} server ranks; set rollout.num_servers >= "
                         f"{index + 1} for every role, or use weights.transfer=stream")
    return index + 1


# --- the group ------------------------------------------------------------------------------------
def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _make_pg(store: tdist.Store, rank: int, size: int, timeout: datetime.timedelta, backend: str, host: str):
    if backend == "nccl":
        opts = tdist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return tdist.ProcessGroupNCCL(store, rank, size, opts)
    opts = tdist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [tdist.ProcessGroupGloo.create_device(hostname=host)]
    return tdist.ProcessGroupGloo(store, rank, size, opts)


@dataclass
class _Pending:
    work: object
    tensor: torch.Tensor
    what: str
    t0: float
    timeout_s: float


@dataclass
class WeightGroup:
    """This process's membership of the weight group. Rank 0 sends (`send`), the others receive (`receive`)."""

    rank: int
    size: int
    host: str
    port: int
    timeout_s: float
    device: torch.device
    store: tdist.Store
    pg: object
    broken: str | None = None

    @property
    def where(self) -> str:
        return f"rank {self.rank} of {self.size} in the weight group at {self.host}:{self.port}"

    @classmethod
    def _join(cls, store: tdist.Store, rank: int, size: int, *, host: str, port: int, timeout_s: float,
              join_timeout_s: float, device: torch.device) -> WeightGroup:
        t0 = time.monotonic()
        pg = None
        try:
            # gloo binds this member's own address on the route to rank 0 (for rank 0, `host` itself): the
            # peers connect to what each member advertises, so it must be an address of this host
            pg = _make_pg(tdist.PrefixStore(_PREFIX, store), rank, size, datetime.timedelta(seconds=join_timeout_s),
                          _backend(device), local_address_toward(host, port))
            group = cls(rank, size, host, port, timeout_s, device, store, pg)
            group._bcast(torch.zeros(1, dtype=torch.int64, device=device), "forming the group", join_timeout_s)
        except DistWeightsError:
            raise
        except Exception as e:  # noqa: BLE001 - store and backend errors come as several types
            raise DistWeightsError(
                f"weights.transfer=dist: forming the weight group ({size} ranks) at {host}:{port} failed on rank "
                f"{rank} after {time.monotonic() - t0:.1f}s (weights.dist_join_timeout_s={join_timeout_s:g}; are "
                f"trainer rank 0 and all rollout.num_servers={size - 1} servers up?): {e}") from None
        group.timeout_s = timeout_s
        return group

    @classmethod
    def join_root(cls, *, host: str, port: int, num_servers: int, timeout_s: float, join_timeout_s: float,
                  device: torch.device | None = None) -> WeightGroup:
        """Trainer rank 0: host the store, wait for every server, then mark the group formed."""
        device = device or torch.device("cpu")
        try:
            store = tdist.TCPStore(host, port, world_size=None, is_master=True,
                                   timeout=datetime.timedelta(seconds=join_timeout_s), wait_for_workers=False)
        except Exception as e:  # noqa: BLE001
            raise DistWeightsError(f"weights.transfer=dist: cannot host the weight group's store at {host}:{port} "
                                   f"(weights.dist_host/dist_port): {e}") from None
        group = cls._join(store, 0, 1 + num_servers, host=host, port=port, timeout_s=timeout_s,
                          join_timeout_s=join_timeout_s, device=device)
        store.set(FORMED_KEY, "1")
        return group

    @classmethod
    def join_member(cls, *, host: str, port: int, rank: int, num_servers: int, timeout_s: float,
                    join_timeout_s: float, device: torch.device | None = None) -> WeightGroup | None:
        """A server: join as `rank`, or return None when the group formed without it (a restart)."""
        device = device or torch.device("cpu")
        try:
            store = tdist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=join_timeout_s))
        except Exception as e:  # noqa: BLE001
            raise DistWeightsError(f"weights.transfer=dist: no weight group store at {host}:{port} after "
                                   f"{join_timeout_s:g}s (weights.dist_join_timeout_s; is trainer rank 0 up?): "
                                   f"{e}") from None
        if store.check([FORMED_KEY]):
            log.warning("weight group at %s:%d formed without rank %d (a restart?): weights will come over the "
                        "controller's catch-up path", host, port, rank)
            return None
        return cls._join(store, rank, 1 + num_servers, host=host, port=port, timeout_s=timeout_s,
                         join_timeout_s=join_timeout_s, device=device)

    def _start(self, tensor: torch.Tensor, what: str, timeout_s: float | None = None) -> _Pending:
        """Issue a broadcast without waiting for it (collectives run in the backend's own threads)."""
        if self.broken:
            raise DistWeightsError(f"weights.transfer=dist: {what}: the group ({self.where}) is closed after an "
                                   f"earlier failure: {self.broken}")
        timeout = timeout_s or self.timeout_s
        opts = tdist.BroadcastOptions()
        opts.rootRank = 0
        opts.timeout = datetime.timedelta(seconds=timeout)
        t0 = time.monotonic()
        try:
            work = self.pg.broadcast([tensor], opts)
        except Exception as e:  # noqa: BLE001 - DistBackendError, RuntimeError: a peer died
            self._fail(what, t0, timeout, e)
        return _Pending(work, tensor, what, t0, timeout)

    def _wait(self, p: _Pending) -> None:
        """Wait for a started broadcast; at most its timeout from when it started."""
        left = max(0.001, p.timeout_s - (time.monotonic() - p.t0))
        try:
            done = p.work.wait(datetime.timedelta(seconds=left))
        except Exception as e:  # noqa: BLE001 - DistBackendError, RuntimeError: a peer died or timed out
            self._fail(p.what, p.t0, p.timeout_s, e)
        if done is False:
            self._fail(p.what, p.t0, p.timeout_s, "timed out")

    def _fail(self, what: str, t0: float, timeout: float, cause: object) -> NoReturn:
        if isinstance(cause, BaseException):
            cause = f"{type(cause).__name__}: {str(cause).splitlines()[0][:300] if str(cause) else ''}"
        msg = (f"weights.transfer=dist: {what} failed on {self.where} after {time.monotonic() - t0:.1f}s "
               f"(timeout {timeout:g}s): {cause}")
        self.close(msg)
        raise DistWeightsError(msg)

    def _bcast(self, tensor: torch.Tensor, what: str, timeout_s: float | None = None) -> None:
        self._wait(self._start(tensor, what, timeout_s))

    def send(self, weights: Mapping[str, torch.Tensor], version: int, layout: P.DistLayout) -> None:
        """Rank 0: the header, then every bucket of `layout` packed from `weights`."""
        n = len(layout.buckets)
        header = torch.tensor([MAGIC, version, n, total_bytes(layout)], dtype=torch.int64, device=self.device)
        self._bcast(header, f"header of version {version}")
        pending: _Pending | None = None
        for i, b in enumerate(layout.buckets):  # bucket i is packed while bucket i-1 is on the wire
            buf = pack_bucket(weights, b, self.device)
            if pending is not None:
                self._wait(pending)
            pending = self._start(buf, f"bucket {i + 1}/{n} of version {version}")
        if pending is not None:
            self._wait(pending)

    def receive(self, layout: P.DistLayout, version: int, expected: Mapping[str, Spec]) -> dict[str, torch.Tensor]:
        """A server: the tensors of a broadcast announced by `layout`, checked against `expected` (its model).

        A layout that does not fit is still received and dropped, then raises DistRejected (the group stays
        usable). A header that disagrees with the announcement, or an announcement too large to drain,
        closes the group: the bytes that follow cannot be framed."""
        rejected: DistRejected | None = None
        try:
            check_layout(layout, expected)
        except DistRejected as e:
            rejected = e
            if total_bytes(layout) > drain_limit(expected):
                self.close(f"rejected a broadcast too large to drain: {e}")
                raise DistRejected(e.reason, f"{e} (and {total_bytes(layout)} bytes is more than this model's "
                                             f"{drain_limit(expected)}: left the group)") from None
        n = len(layout.buckets)
        header = torch.zeros(4, dtype=torch.int64, device=self.device)
        self._bcast(header, f"header of version {version}")
        want = [MAGIC, version, n, total_bytes(layout)]
        if header.tolist() != want:
            reason = "version" if header[0] == MAGIC and header[1] != version else "header"
            detail = f"header {header.tolist()} on the group, announced {want}"
            self.close(f"rejected {detail}")
            raise DistRejected(reason, f"{detail} (left the group)")
        out: dict[str, torch.Tensor] = {}
        pending = [self._start(torch.empty(b.nbytes, dtype=torch.uint8, device=self.device),
                               f"bucket {i + 1}/{n} of version {version}") for i, b in enumerate(layout.buckets)]
        for p, b in zip(pending, layout.buckets):  # every bucket posted at once, taken in order
            self._wait(p)
            if rejected is None:
                out.update(unpack_bucket(p.tensor, b))
        if rejected is not None:
            raise rejected
        return out

    def close(self, why: str = "closed") -> None:
        """Leave the group for good; later calls fail at once. Aborting the backend (where it can) ends the
        peers' waits on this rank instead of leaving them to their timeouts."""
        if self.broken:
            return
        self.broken = why
        abort = getattr(self.pg, "abort", None)
        if callable(abort):
            try:
                abort()
            except Exception as e:  # noqa: BLE001 - best effort: the group is dead either way
                log.debug("aborting the weight group's backend: %s", e)
        self.pg = None
