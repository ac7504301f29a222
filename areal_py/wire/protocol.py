"""The wire format every process speaks: msgpack for structure, raw frames for tensors.

A message is a ZeroMQ multipart: frame 0 is a msgpack map `{"type", "schema", "body", "tensors"}`,
frames 1.. are the raw bytes of the tensors listed in `tensors` (name, dtype, shape), in order.
Bodies are validated by pydantic per type, so a malformed or unknown message becomes one
`ProtocolError` with a reason; the receiver logs it, counts it and keeps serving. Nothing here
ever unpickles: a socket is an input from outside.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class ProtocolError(ValueError):
    """A message that cannot be accepted; `reason` is a short label for the metric."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingBody(_Body):
    max_new_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)


# --- controller <-> rollout server -------------------------------------------------------------
class Hello(_Body):
    server_id: str
    version: int = Field(ge=0)


class Heartbeat(_Body):
    server_id: str
    version: int = Field(ge=0)
    running: int = Field(ge=0)
    waiting: int = Field(ge=0)
    generated_tokens: int = Field(ge=0)
    # activity (areal_py.telemetry.gen_activity), defaulted so older senders still validate: cumulative busy seconds
    # and slot-seconds since `started` (epoch seconds; a new value = counters restarted), taken at `at`,
    # the slot count, and the wall-clock busy spans since the previous heartbeat
    busy_s: float = Field(0.0, ge=0)
    slot_seconds: float = Field(0.0, ge=0)
    max_running: int = Field(0, ge=0)
    started: float = Field(0.0, ge=0)
    at: float = Field(0.0, ge=0)
    spans: list[tuple[float, float]] = Field(default_factory=list, max_length=256)


class Generate(_Body):
    """One prompt's group: the server runs `n` samples and streams each back as it finishes."""
    gid: int = Field(ge=0)
    attempt: int = Field(ge=0)
    prompt_ids: list[int] = Field(min_length=1)
    n: int = Field(ge=1)
    sampling: SamplingBody


class Result(_Body):
    gid: int = Field(ge=0)
    attempt: int = Field(ge=0)
    idx: int = Field(ge=0)
    output_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    # "stale": aborted because its oldest token became too old for any batch still to come
    finish_reason: Literal["stop", "length", "abort", "stale"]

    @model_validator(mode="after")
    def _same_lengths(self) -> Result:
        if not (len(self.output_ids) == len(self.logprobs) == len(self.versions)):
            raise ValueError("output_ids, logprobs and versions must have the same length")
        return self


class UpdateWeights(_Body):
    """New weights: `path` to a safetensors file (disk transfer) or the tensors in the frames (stream).

    `min_token_version`: tokens older than this can no longer be trained (every batch still to come
    would drop them), so servers abort sequences holding them instead of finishing doomed work.
    """
    version: int = Field(ge=0)
    path: str | None = None
    min_token_version: int = Field(0, ge=0)


class WeightsLoaded(_Body):
    server_id: str
    version: int = Field(ge=0)
    seconds: float = Field(ge=0)


class Shutdown(_Body):
    reason: str = ""


class Ping(_Body):
    """Controller -> every server (on the weights PUB), every `rollout.heartbeat_s`: the controller lives.

    A server hearing nothing from the controller (ping or any other message) for
    `rollout.controller_timeout_s` stops with an error instead of waiting forever.
    """


# --- controller <-> trainer --------------------------------------------------------------------
class TrainerHello(_Body):
    version: int = Field(ge=0)
    resume_state: dict[str, int] | None = None


class WeightsReady(UpdateWeights):
    pass


class TrainerDone(_Body):
    version: int = Field(ge=0)


class Sample(_Body):
    output_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: Literal["stop", "length", "abort"]
    reward: float


class Group(_Body):
    gid: int = Field(ge=0)
    prompt_index: int = Field(ge=0)
    prompt_ids: list[int] = Field(min_length=1)
    samples: list[Sample] = Field(min_length=1)


class Batch(_Body):
    """`version` is the trainer version that will train on it: batches are numbered by it."""
    version: int = Field(ge=0)
    groups: list[Group] = Field(min_length=1)
    state: dict[str, int]
    stats: dict[str, float] = Field(default_factory=dict)
    # when any server was generating since the previous batch: [start, end] in epoch seconds
    gen_spans: list[tuple[float, float]] = Field(default_factory=list, max_length=256)


BODIES: dict[str, type[_Body]] = {
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


def encode(body: _Body, tensors: dict[str, torch.Tensor] | None = None) -> list[bytes | memoryview]:
    """Frames for one message; tensors go out as raw contiguous bytes, never copied into msgpack."""
    metas, frames = [], []
    for name, t in (tensors or {}).items():
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name}: dtype {t.dtype} not sendable; allowed {sorted(_DTYPES)}")
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
            name, dtype, shape = meta["name"], _DTYPES[meta["dtype"]], [int(s) for s in meta["shape"]]
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
