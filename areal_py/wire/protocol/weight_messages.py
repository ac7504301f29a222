"""Weight messages: the trainer's new weights announced to the controller (WeightsReady), passed on to every
server (UpdateWeights) and acknowledged (WeightsLoaded); the layout of a `weights.transfer=dist` broadcast.

Invariants: the bytes themselves never travel in a body: they are a file named by `path` (checked against
`sha256`), the frames after the header (areal_py/wire/protocol/codec.py) or a broadcast on the weight group;
a dist layout is bounded (at most MAX_DIST_TENSORS tensors and buckets, shapes of at most 8 dims), so a
receiver checks it against its own model before the first byte arrives.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from areal_py.wire.protocol.base import MAX_COUNT, Body, Count, Session

MAX_DIST_TENSORS = 2**16  # tensors one dist broadcast may announce: far above any model's parameter count
DtypeName = Literal["float32", "float16", "bfloat16", "int64", "int32", "uint8"]


class DistTensor(Body):
    """One tensor's place in a dist bucket: `offset` bytes into the bucket, `numel * itemsize` bytes long."""
    name: str = Field(max_length=1024)
    dtype: DtypeName
    shape: list[Annotated[int, Field(ge=0, le=MAX_COUNT)]] = Field(max_length=8)
    offset: Count = 0


class DistBucket(Body):
    nbytes: Count
    tensors: list[DistTensor] = Field(min_length=1, max_length=MAX_DIST_TENSORS)


class DistLayout(Body):
    """What a `weights.transfer=dist` broadcast carries, bucket by bucket in broadcast order; the bytes
    themselves go over the torch.distributed weight group (areal_py/wire/dist_weights.py), not this socket.
    Receivers check it against their own model before the first byte arrives."""
    bucket_bytes: int = Field(ge=1, le=MAX_COUNT)
    buckets: list[DistBucket] = Field(min_length=1, max_length=MAX_DIST_TENSORS)


class UpdateWeights(Body):
    """New weights: `path` to a safetensors file (disk transfer), the tensors in the frames (stream), or
    `dist`: the layout of a broadcast on the weight group that every member joins now (dist).

    `min_token_version`: tokens older than this can no longer be trained (every batch still to come
    would drop them), so servers abort sequences holding them instead of finishing doomed work.

    `sha256`: hex digest of the file at `path`, which the trainer computes after writing it; a server loads
    the file only if its bytes match it (areal_py/wire/weight_files.py), and refuses a path without one.
    """
    version: int = Field(ge=0)
    path: str | None = Field(None, max_length=4096)
    min_token_version: int = Field(0, ge=0)
    dist: DistLayout | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    session: Session | None = None  # the sending controller's (None: not said, and the trainer's notice)


class WeightsLoaded(Body):
    server_id: str
    version: int = Field(ge=0)
    seconds: float = Field(ge=0)


class WeightsReady(UpdateWeights):
    pass
