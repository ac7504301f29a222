"""Hypothesis strategies for hostile wire messages, and what `decode` makes of each.

A fuzzed message is one of: raw random frames; a msgpack header of random structure; or a valid message of a
type the receiver may see with its body mutated (a field replaced by any msgpack value, dropped, or an unknown
one added; absurd but schema-valid numbers included), the header's type or schema sometimes swapped, and random
tensor descriptions and frames attached. `expected(frames)` is the decoder's verdict, so a test can tell the
rejections that must be counted from the messages the receiver must act on.
"""
from __future__ import annotations

import msgpack
from hypothesis import strategies as st

from areal_py.wire import protocol as P

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
SCALARS = st.one_of(st.none(), st.booleans(), INT64, st.sampled_from([0, 1, 10**6, 2**62, -1]),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.binary(max_size=20))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)

SAMPLING = P.SamplingBody(max_new_tokens=4, temperature=1.0, top_p=1.0)
EXEMPLARS: dict[str, P.Body] = {
    "hello": P.Hello(server_id="fz", version=0, engine_path="fast"),
    "heartbeat": P.Heartbeat(server_id="fz", version=0, running=0, waiting=0, generated_tokens=0),
    "generate": P.Generate(gid=1, attempt=0, prompt_ids=[1, 2, 3], n=2, sampling=SAMPLING),
    "result": P.Result(gid=0, attempt=0, idx=0, output_ids=[1, 2], logprobs=[-0.5, -0.5], versions=[0, 0],
                       finish_reason="stop"),
    "update_weights": P.UpdateWeights(version=1, path="/w/v000001.safetensors", sha256="0" * 64),
    "weights_loaded": P.WeightsLoaded(server_id="fz", version=1, seconds=0.1),
    "shutdown": P.Shutdown(reason="fuzz"),
    "ping": P.Ping(),
    "trainer_hello": P.TrainerHello(version=0),
    "weights_ready": P.WeightsReady(version=1, path="/w/v000001.safetensors", sha256="0" * 64),
    "trainer_done": P.TrainerDone(version=1),
    "batch": P.Batch(version=0, state=P.ControllerState(), groups=[P.Group(
        gid=0, prompt_index=0, prompt_ids=[1, 2], samples=[P.Sample(
            output_ids=[3], logprobs=[-0.5], versions=[0], finish_reason="stop", reward=1.0)])]),
}
assert set(EXEMPLARS) == set(P.BODIES), "a new message type needs an exemplar here"


@st.composite
def mutated_body(draw, body: dict) -> dict:
    body = dict(body)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["replace", "drop", "add"]))
        if op == "add" or not body:
            body[draw(st.text(max_size=8))] = draw(VALUES)
        elif op == "drop":
            body.pop(draw(st.sampled_from(sorted(body))))
        else:
            key = draw(st.sampled_from(sorted(body)))
            value = body[key]
            if isinstance(value, list) and value and draw(st.booleans()):  # one element of a list
                value = list(value)
                value[draw(st.integers(0, len(value) - 1))] = draw(VALUES)
                body[key] = value
            else:
                body[key] = draw(VALUES)
    return body


@st.composite
def tensor_part(draw) -> tuple[list, list[bytes]]:
    """(tensor descriptions, frames): mostly consistent random tensors, sometimes not."""
    metas, frames = [], []
    for i in range(draw(st.integers(0, 2))):
        dtype = draw(st.sampled_from(["float32", "int64", "uint8", "float64", "bogus"]))
        shape = draw(st.lists(st.integers(-2, 4), max_size=3))
        metas.append(draw(st.one_of(st.just({"name": f"t{i}", "dtype": dtype, "shape": shape}), VALUES)))
        frames.append(draw(st.binary(max_size=64)))
    if draw(st.booleans()) and frames:
        frames.pop()
    return metas, frames


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@st.composite
def message(draw, types: tuple[str, ...]) -> list[bytes]:
    """The frames of one hostile message (at least one frame: ZeroMQ sends no empty multipart)."""
    kind = draw(st.sampled_from(["raw", "header", "mutated", "mutated", "mutated", "valid"]))
    if kind == "raw":
        return draw(st.lists(st.binary(max_size=64), min_size=1, max_size=3))
    if kind == "header":
        return [pack(draw(VALUES))]
    mtype = draw(st.sampled_from(types))
    body = EXEMPLARS[mtype].model_dump()
    if kind == "mutated":
        body = draw(mutated_body(body))
    header = {"type": mtype, "schema": P.SCHEMA_VERSION, "body": body, "tensors": []}
    frames: list[bytes] = []
    if kind == "mutated" and draw(st.integers(0, 9)) == 0:
        header[draw(st.sampled_from(["type", "schema", "tensors"]))] = draw(VALUES)
    if kind == "mutated" and draw(st.integers(0, 3)) == 0:
        header["tensors"], frames = draw(tensor_part())
    return [pack(header), *frames]


def expected(frames: list[bytes]) -> tuple[str, str]:
    """("rejected", reason) when `decode` refuses the frames, else ("decoded", message type)."""
    try:
        return "decoded", P.decode(frames).type
    except P.ProtocolError as e:
        return "rejected", e.reason
