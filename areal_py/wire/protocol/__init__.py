"""The wire format every process speaks: msgpack for structure, raw frames for tensors.

Every message a role sends or accepts is looked up here (`from areal_py.wire import protocol as P`); each
family lives in its own module:

- base.py: what every body shares (`Body`, strict: unknown fields are errors) and the bounded `Count`, `Session`;
- rollout_messages.py: controller <-> rollout server: Hello, Heartbeat, Generate, Result, Shutdown, and Ping
  (also the trainer's probe of the controller and its answer);
- weight_messages.py: WeightsReady (trainer -> controller), UpdateWeights (controller -> servers),
  WeightsLoaded, and the layout of a `weights.transfer=dist` broadcast;
- trainer_messages.py: controller <-> trainer: TrainerHello, Batch (its groups, samples and stats),
  TrainerDone, and the controller's state and buffer a checkpoint keeps;
- codec.py: a message to frames and back (`encode`, `decode`), and BODIES, the type names on the wire.

A message is a ZeroMQ multipart: frame 0 is a msgpack map `{"type", "schema", "body", "tensors"}`,
frames 1.. are the raw bytes of the tensors listed in `tensors` (name, dtype, shape), in order.
Bodies are validated by pydantic per type, so a malformed or unknown message becomes one
`ProtocolError` with a reason; the receiver logs it, counts it and keeps serving. Nothing here
ever unpickles: a socket is an input from outside.
"""
from __future__ import annotations

from areal_py.wire.protocol.base import MAX_COUNT, Body, Count, Session
from areal_py.wire.protocol.codec import BODIES, DTYPES, SCHEMA_VERSION, Message, ProtocolError, decode, encode
from areal_py.wire.protocol.rollout_messages import (
    MAX_HELD_ATTEMPTS,
    EnginePath,
    Generate,
    Heartbeat,
    Hello,
    Ping,
    Result,
    SamplingBody,
    Shutdown,
)
from areal_py.wire.protocol.trainer_messages import (
    GEN_TOKENS_PREFIX,
    MAX_BUFFERED_GROUPS,
    MAX_SERVERS,
    Batch,
    BatchStats,
    ControllerBuffer,
    ControllerState,
    Group,
    PendingGroup,
    Sample,
    ServerId,
    TrainerDone,
    TrainerHello,
)
from areal_py.wire.protocol.weight_messages import (
    MAX_DIST_TENSORS,
    DistBucket,
    DistLayout,
    DistTensor,
    DtypeName,
    UpdateWeights,
    WeightsLoaded,
    WeightsReady,
)

__all__ = [
    "BODIES", "DTYPES", "GEN_TOKENS_PREFIX", "MAX_BUFFERED_GROUPS", "MAX_COUNT", "MAX_DIST_TENSORS",
    "MAX_HELD_ATTEMPTS", "MAX_SERVERS", "SCHEMA_VERSION", "Batch", "BatchStats", "Body", "ControllerBuffer",
    "ControllerState", "Count", "DistBucket", "DistLayout", "DistTensor", "DtypeName", "EnginePath", "Generate",
    "Group", "Heartbeat", "Hello", "Message", "PendingGroup", "Ping", "ProtocolError", "Result", "Sample",
    "SamplingBody", "ServerId", "Session", "Shutdown", "TrainerDone", "TrainerHello", "UpdateWeights",
    "WeightsLoaded", "WeightsReady", "decode", "encode",
]
