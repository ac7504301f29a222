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
from typing import Annotated, Any, Literal

import msgpack
import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    ValidationError,
    model_serializer,
    model_validator,
)

SCHEMA_VERSION = 1
MAX_COUNT = 2**62  # bound of every counter on the wire: far above any run, far below msgpack's int64
MAX_HELD_ATTEMPTS = 2**16  # bound of Heartbeat.held: far above any server's groups in flight

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


Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingBody(_Body):
    max_new_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)


# --- controller <-> rollout server -------------------------------------------------------------
EnginePath = Literal["fast", "generic", "external"]
"""How a server generates: the torch engine's fast runner, its generic Hugging Face forward fallback, or an
engine of its own (SGLang). rollout_server/kernel_report.py says why."""


class Hello(_Body):
    """A server joins (the only message that registers one). `rejoin`: said again because the controller
    restarted (a new `Ping.session`); its `version` may then be one the restarted controller never
    published (the run rolled back past it), and such a server is registered as holding no usable weights."""
    server_id: str
    version: int = Field(ge=0)
    engine_path: EnginePath | None = None  # None: the server did not say
    rejoin: bool = False


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
    # the attempts (gid, attempt) the server holds requests of: the controller's evidence that each is alive
    # (controller/progress.py); None: not said (an older sender), so only results show an attempt's progress
    held: list[tuple[Count, Count]] | None = Field(None, max_length=MAX_HELD_ATTEMPTS)


Session = Annotated[str, StringConstraints(max_length=64)]
"""A controller process's random id (`Ping.session`); on a controller's message to a server, whose it is."""


class Generate(_Body):
    """One prompt's group: the server runs `n` samples and streams each back as it finishes."""
    gid: int = Field(ge=0)
    attempt: int = Field(ge=0)
    prompt_ids: list[int] = Field(min_length=1)
    n: int = Field(ge=1)
    sampling: SamplingBody
    session: Session | None = None  # the sending controller's (None: not said)


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


MAX_DIST_TENSORS = 2**16  # tensors one dist broadcast may announce: far above any model's parameter count
DtypeName = Literal["float32", "float16", "bfloat16", "int64", "int32", "uint8"]


class DistTensor(_Body):
    """One tensor's place in a dist bucket: `offset` bytes into the bucket, `numel * itemsize` bytes long."""
    name: str = Field(max_length=1024)
    dtype: DtypeName
    shape: list[Annotated[int, Field(ge=0, le=MAX_COUNT)]] = Field(max_length=8)
    offset: Count = 0


class DistBucket(_Body):
    nbytes: Count
    tensors: list[DistTensor] = Field(min_length=1, max_length=MAX_DIST_TENSORS)


class DistLayout(_Body):
    """What a `weights.transfer=dist` broadcast carries, bucket by bucket in broadcast order; the bytes
    themselves go over the torch.distributed weight group (areal_py/wire/dist_weights.py), not this socket.
    Receivers check it against their own model before the first byte arrives."""
    bucket_bytes: int = Field(ge=1, le=MAX_COUNT)
    buckets: list[DistBucket] = Field(min_length=1, max_length=MAX_DIST_TENSORS)


class UpdateWeights(_Body):
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


class WeightsLoaded(_Body):
    server_id: str
    version: int = Field(ge=0)
    seconds: float = Field(ge=0)


class Shutdown(_Body):
    reason: str = ""
    session: Session | None = None  # the sending controller's (None: not said)


class Ping(_Body):
    """Controller -> every server (on the weights PUB), every `rollout.heartbeat_s`: the controller lives.

    A server hearing nothing from the controller (ping or any other message) for
    `rollout.controller_timeout_s` stops with an error instead of waiting forever. The trainer, while it
    waits for a batch, sends one to the controller every `rollout.heartbeat_s` and the controller answers
    it with one on the batch link; `trainer.controller_timeout_s` without an answer stops the trainer.

    `session`: drawn at random by each controller process (None in the trainer's probes). A peer that hears a
    session other than the one it knew learns that the controller restarted, and rejoins it
    (docs/operations.md, reconnecting to a restarted controller).
    """
    session: Session | None = None


# --- controller <-> trainer --------------------------------------------------------------------
MAX_SERVERS = 4096  # per-server entries a batch's stats may carry
ServerId = Annotated[str, StringConstraints(max_length=255)]  # a ZeroMQ routing id is at most 255 bytes


class ControllerState(_Body):
    """The controller's counters as of one batch; the trainer checkpoints the last trained batch's and
    hands it back in `TrainerHello.resume_state`, so a resumed controller goes on from them.

    Every field defaults to 0, so a state written before a counter existed still loads (the counter
    starts from 0). The JSON of `model_dump()` is what a checkpoint's state.json holds.
    """
    data_position: Count = 0     # prompts taken from the task, skipped ones included
    accepted: Count = 0          # groups scored and kept: in the buffer or already trained
    running: Count = 0           # groups admitted and not yet scored
    dropped_stale: Count = 0     # groups too stale for any batch to come
    dropped_uniform: Count = 0   # groups dynamic sampling dropped (one reward for every sample)
    reward_timeouts: Count = 0   # samples scored 0 because a reward function timed out...
    reward_errors: Count = 0     # ...or raised
    generated_tokens: Count = 0  # every token the servers returned for an awaited result
    skipped_too_long: Count = 0  # prompts longer than the model's context, never dispatched
    dropped_aborted: Count = 0   # groups a server refused (finish_reason abort)
    skipped_bad_lines: Count = 0  # data lines the task left out at load (malformed); a property of the data


MAX_BUFFERED_GROUPS = 2**20  # groups a controller buffer may hold: far above any run's in-flight work


class PendingGroup(_Body):
    """An admitted group not yet scored (undispatched, generating or being scored), with the samples of it
    that have finished: `done[i]` is one sample's Result, its `idx` the sample's place in the group."""
    gid: int = Field(ge=0)
    prompt_index: int = Field(ge=0)
    prompt_ids: list[int] = Field(min_length=1)
    done: list[Result] = Field(default_factory=list)


class ControllerBuffer(_Body):
    """The controller's work as of one batch, what makes resume lossless: every admitted group neither
    trained (in this or an earlier batch) nor dropped. `ready`: scored and waiting for a batch; `pending`:
    admitted and not yet scored, with their finished samples (per-token versions and logprobs kept, so
    the staleness rule still applies to them after a resume). The trainer checkpoints it with the
    batch's `ControllerState` and hands both back in its hello."""
    ready: list[Group] = Field(default_factory=list, max_length=MAX_BUFFERED_GROUPS)
    pending: list[PendingGroup] = Field(default_factory=list, max_length=MAX_BUFFERED_GROUPS)
    next_gid: Count = 0  # gids below it are taken: a resumed controller numbers new groups from here


class TrainerHello(_Body):
    version: int = Field(ge=0)
    resume_state: ControllerState | None = None
    resume_buffer: ControllerBuffer | None = None  # None: a fresh run, or a checkpoint written without one


class WeightsReady(UpdateWeights):
    pass


class TrainerDone(_Body):
    version: int = Field(ge=0)


class Sample(_Body):
    """One trained response. `loss_mask` (absent: every token is the model's, a single-turn response) marks
    which tokens the model generated (1: trained, with its behaviour logprob and version) and which it only
    saw (0: tool output and chat-template scaffolding of a multi-turn episode, areal_py/workflow: their
    logprob is 0 and their version the nearest model token's, so min(versions) is still the oldest model
    token's). Absent on the wire when None, so a single-turn batch is the bytes it always was."""
    output_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: Literal["stop", "length", "abort"]
    reward: float
    loss_mask: list[Annotated[int, Field(ge=0, le=1)]] | None = None

    @model_validator(mode="after")
    def _same_lengths(self) -> Sample:
        n = len(self.output_ids)
        if len(self.logprobs) != n or len(self.versions) != n or (self.loss_mask is not None and len(self.loss_mask) != n):
            raise ValueError(f"sample: {n} output_ids, {len(self.logprobs)} logprobs, {len(self.versions)} versions"
                             + ("" if self.loss_mask is None else f", {len(self.loss_mask)} loss_mask entries")
                             + "; they must be equal")
        return self

    @model_serializer(mode="wrap")
    def _without_absent_mask(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        d = handler(self)
        if d.get("loss_mask", 0) is None:
            del d["loss_mask"]
        return d

    def model_versions(self) -> list[int]:
        """The versions of the tokens the model generated (all of them without a loss mask)."""
        if self.loss_mask is None:
            return self.versions
        return [v for v, m in zip(self.versions, self.loss_mask) if m]


class Group(_Body):
    gid: int = Field(ge=0)
    prompt_index: int = Field(ge=0)
    prompt_ids: list[int] = Field(min_length=1)
    samples: list[Sample] = Field(min_length=1)


GEN_TOKENS_PREFIX = "gen_tokens/"


class BatchStats(_Body):
    """What the controller saw since the previous batch (rollout activity, scored reward) and the tokens
    each server generated since the controller started.

    On the wire this is one flat map of numbers: `gen_tokens` travels as one `gen_tokens/<server>` key
    per server and an absent optional field as no key, so receivers of the flat map read it unchanged.
    """
    servers_live: Count = 0
    gen_busy_s: float = Field(0.0, ge=0, allow_inf_nan=False)  # seconds any server spent generating
    # mean slot occupancy of the live servers that reported (None: none did)
    rollout_slot_occupancy: float | None = Field(None, ge=0, allow_inf_nan=False)
    # mean reward of every sample scored, dynamic sampling's drops included (None: none was scored)
    scored_reward_mean: float | None = Field(None, allow_inf_nan=False)
    # live servers running the generic Hugging Face forward, not the engine's fast path (None: no live server
    # said which path it runs)
    generic_engine_servers: Count | None = None
    gen_tokens: dict[ServerId, Count] = Field(default_factory=dict, max_length=MAX_SERVERS)
    # multi-turn runs (rollout.workflow other than single_turn; None otherwise), since the previous batch
    # (controller/episode_tally.py): episodes settled and their turns, tool calls and how many failed, timed
    # out or crashed, the mean call latency, the share of the settled episodes' response tokens that are not
    # the model's, and the episodes rewarded > 0, and those of them that called a tool
    episodes: Count | None = None
    episode_turns: Count | None = None
    tool_calls: Count | None = None
    tool_errors: Count | None = None
    tool_timeouts: Count | None = None
    tool_crashes: Count | None = None
    tool_latency_mean_s: float | None = Field(None, ge=0, allow_inf_nan=False)
    tool_token_share: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    episodes_succeeded: Count | None = None
    episodes_succeeded_with_tool: Count | None = None

    @model_validator(mode="before")
    @classmethod
    def _unflatten(cls, data: Any) -> Any:
        """Gather the wire's `gen_tokens/<server>` keys into `gen_tokens` (both forms at once: rejected)."""
        if not isinstance(data, dict) or not any(isinstance(k, str) and k.startswith(GEN_TOKENS_PREFIX) for k in data):
            return data
        if "gen_tokens" in data:
            raise ValueError("gen_tokens given both as a map and as gen_tokens/<server> keys")
        if len(data) > MAX_SERVERS + len(cls.model_fields):
            raise ValueError(f"more than {MAX_SERVERS} servers")
        out = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith(GEN_TOKENS_PREFIX))}
        out["gen_tokens"] = {k[len(GEN_TOKENS_PREFIX):]: v for k, v in data.items()
                             if isinstance(k, str) and k.startswith(GEN_TOKENS_PREFIX)}
        return out

    @model_serializer(mode="wrap")
    def _flatten(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        d = {k: v for k, v in handler(self).items() if v is not None}
        per_server = d.pop("gen_tokens")
        return {**d, **{f"{GEN_TOKENS_PREFIX}{k}": v for k, v in per_server.items()}}


class Batch(_Body):
    """`version` is the trainer version that will train on it: batches are numbered by it."""
    version: int = Field(ge=0)
    groups: list[Group] = Field(min_length=1)
    state: ControllerState
    stats: BatchStats = Field(default_factory=BatchStats)
    # when any server was generating since the previous batch: [start, end] in epoch seconds
    gen_spans: list[tuple[float, float]] = Field(default_factory=list, max_length=256)
    # prompts dropped (or skipped at admission) since the previous batch, by reason: the run's ledger
    dropped_prompts: dict[Annotated[str, StringConstraints(max_length=64)], list[Count]] = Field(
        default_factory=dict, max_length=64)
    # set on the batches whose state the trainer checkpoints (TrainerConfig.checkpoints_at); None on the others
    buffer: ControllerBuffer | None = None


ControllerBuffer.model_rebuild()  # it names Group, defined after it
TrainerHello.model_rebuild()


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
