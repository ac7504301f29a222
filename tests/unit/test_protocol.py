import msgpack
import pytest
import torch

from areal_py.wire import protocol as P


def roundtrip(body, tensors=None):
    frames = [bytes(f) for f in P.encode(body, tensors)]
    return P.decode(frames)


def test_result_roundtrip():
    r = P.Result(gid=3, attempt=1, idx=2, output_ids=[5, 6], logprobs=[-0.1, -0.2], versions=[0, 1],
                 finish_reason="stop")
    m = roundtrip(r)
    assert m.type == "result" and m.body == r


def test_tensors_travel_as_raw_frames():
    t = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16),
         "empty": torch.zeros(0, 3)}
    frames = P.encode(P.UpdateWeights(version=2), t)
    assert len(frames) == 4  # header + one frame per tensor, no tensor inside msgpack
    assert len(bytes(frames[1])) == 6 * 4
    m = P.decode([bytes(f) for f in frames])
    for k, v in t.items():
        assert torch.equal(m.tensors[k], v) and m.tensors[k].dtype == v.dtype


def header(**kw):
    base = {"type": "hello", "schema": P.SCHEMA_VERSION, "body": {"server_id": "s", "version": 0}, "tensors": []}
    base.update(kw)
    return msgpack.packb(base)


@pytest.mark.parametrize("frames,reason", [
    ([], "empty"),
    ([b"\xc1garbage"], "bad_msgpack"),
    ([msgpack.packb([1, 2])], "bad_header"),
    ([header(schema=99)], "bad_schema"),
    ([header(type="nope")], "unknown_type"),
    ([header(body={"server_id": "s", "version": -1})], "invalid_body"),
    ([header(body={"server_id": "s", "version": 0, "extra": 1})], "invalid_body"),
    ([header(tensors=[{"name": "x", "dtype": "float32", "shape": [2]}])], "bad_tensors"),
    ([header(tensors=[{"name": "x", "dtype": "float32", "shape": [2]}]), b"123"], "bad_tensors"),
    ([header(tensors=[{"name": "x", "dtype": "object", "shape": [1]}]), b"1234"], "bad_tensors"),
])
def test_malformed_messages_are_protocol_errors(frames, reason):
    with pytest.raises(P.ProtocolError) as e:
        P.decode(frames)
    assert e.value.reason == reason


def test_result_lengths_must_agree():
    bad = msgpack.packb({"type": "result", "schema": P.SCHEMA_VERSION, "tensors": [], "body": {
        "gid": 0, "attempt": 0, "idx": 0, "output_ids": [1, 2], "logprobs": [0.0], "versions": [0, 0],
        "finish_reason": "stop"}})
    with pytest.raises(P.ProtocolError, match="same length"):
        P.decode([bad])


def test_heartbeat_activity_fields_are_optional_and_bounded():
    old = {"server_id": "s", "version": 1, "running": 0, "waiting": 0, "generated_tokens": 5}  # older sender
    m = P.decode([header(type="heartbeat", body=old)])
    assert m.body.spans == [] and m.body.slot_seconds == 0.0 and m.body.started == m.body.at == 0.0
    new = P.Heartbeat(**old, busy_s=1.5, slot_seconds=3.0, max_running=8, started=10.0, at=12.0, spans=[(10.5, 12.0)])
    assert roundtrip(new).body == new
    with pytest.raises(P.ProtocolError) as e:
        P.decode([header(type="heartbeat", body={**old, "spans": [[i, i + 0.5] for i in range(257)]})])
    assert e.value.reason == "invalid_body"
