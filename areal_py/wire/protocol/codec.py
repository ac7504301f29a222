"""The codec: one message to ZeroMQ frames and back, and the table of message types it knows.

A message is a ZeroMQ multipart: frame 0 is a msgpack map `{"type", "schema", "body", "tensors"}`,
frames 1.. are the raw bytes of the tensors listed in `tensors` (name, dtype, shape), in order.

Invariants: `decode` either returns a validated body of a type in BODIES or raises one `ProtocolError`
with a short reason label (the receiver logs it, counts it and keeps serving); a tensor frame must be
exactly the bytes its description says; nothing here ever unpickles: a socket is an input from outside.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
from pydantic import ValidationError

from areal_py.wire.protocol.base import Body
from areal_py.wire.protocol.rollout_messages import Generate, Heartbeat, Hello, Ping, Result, Shutdown
from areal_py.wire.protocol.trainer_messages import Batch, TrainerDone, TrainerHello
from areal_py.wire.protocol.weight_messages import UpdateWeights, WeightsLoaded, WeightsReady

SCHEMA_VERSION = 1

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class ProtocolError(ValueError):
    """A message that cannot be accepted; `reason` is a short label for the metric."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


BODIES: dict[str, type[Body]] = {
    "hello": Hello, "heartbeat": Heartbeat, "generate": Generate, "result": Result,
    "update_weights": UpdateWeights, "weights_loaded": WeightsLoaded, "shutdown": Shutdown, "ping": Ping,
    "trainer_hello": TrainerHello, "weights_ready": WeightsReady, "trainer_done": TrainerDone,
    "batch": Batch,
}
_TYPE_OF = {cls: name for name, cls in BODIES.items()}


@dataclass
class Message:
    type: str
    body: Any
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def encode(body: Body, tensors: dict[str, torch.Tensor] | None = None) -> list[bytes | memoryview]:
    """Frames for one message; tensors go out as raw contiguous bytes, never copied into msgpack."""
    metas, frames = [], []
    for name, t in (tensors or {}).items():
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name}: dtype {t.dtype} not sendable; allowed {sorted(DTYPES)}")
        t = t.detach().contiguous().cpu()
        metas.append({"name": name, "dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape)})
        frames.append(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
    header = {"type": _TYPE_OF[type(body)], "schema": SCHEMA_VERSION, "body": body.model_dump(), "tensors": metas}
    return [msgpack.packb(header, use_bin_type=True), *frames]


def decode(frames: list[Any]) -> Message:
    """Parse and validate one message; every failure is a ProtocolError with a reason label."""
    if not frames:
        raise ProtocolError("empty", "no frames")
    try:
        header = msgpack.unpackb(bytes(frames[0]), raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001 - msgpack raises several unrelated types on garbage
        raise ProtocolError("bad_msgpack", str(e)[:200]) from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", "header is not a map")
    if header.get("schema") != SCHEMA_VERSION:
        raise ProtocolError("bad_schema", f"schema {header.get('schema')!r}, expected {SCHEMA_VERSION}")
    mtype = header.get("type")
    cls = BODIES.get(mtype) if isinstance(mtype, str) else None
    if cls is None:
        raise ProtocolError("unknown_type", f"type {mtype!r}; known {sorted(BODIES)}")
    try:
        body = cls.model_validate(header.get("body"))
    except ValidationError as e:
        raise ProtocolError("invalid_body", f"{mtype}: {e.errors()[0]['loc']} {e.errors()[0]['msg']}") from None
    tensors = _decode_tensors(header.get("tensors") or [], frames[1:])
    return Message(mtype, body, tensors)


def _decode_tensors(metas: list, frames: list[Any]) -> dict[str, torch.Tensor]:
    if not isinstance(metas, list) or len(metas) != len(frames):
        raise ProtocolError("bad_tensors", f"{len(frames)} tensor frames for {metas if not isinstance(metas, list) else len(metas)} descriptions")
    out: dict[str, torch.Tensor] = {}
    for meta, frame in zip(metas, frames):
        try:
            name, dtype, shape = meta["name"], DTYPES[meta["dtype"]], [int(s) for s in meta["shape"]]
        except Exception:  # noqa: BLE001 - any malformed description is one protocol error
            raise ProtocolError("bad_tensors", f"bad tensor description {meta!r}") from None
        buf = frame.buffer if hasattr(frame, "buffer") else frame
        numel = 1
        for s in shape:
            numel *= s
        if numel * dtype.itemsize != len(buf) or any(s < 0 for s in shape):
            raise ProtocolError("bad_tensors", f"tensor {name}: {len(buf)} bytes for shape {shape} {meta['dtype']}")
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        with warnings.catch_warnings():  # zero-copy view of a read-only frame; receivers only read it
            warnings.simplefilter("ignore", UserWarning)
            out[name] = torch.frombuffer(buf, dtype=dtype).reshape(shape)
    return out
