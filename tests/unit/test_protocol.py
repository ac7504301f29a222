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


# --- controller <-> trainer: the batch's stats and state, the resume state -------------------------
TODAY_STATE = {"data_position": 40, "accepted": 12, "running": 3, "dropped_stale": 1, "dropped_uniform": 2,
               "reward_timeouts": 0, "reward_errors": 1, "generated_tokens": 900, "skipped_too_long": 4,
               "dropped_aborted": 0}  # the map every batch carried, and checkpoints hold, before it was typed


def batch_body(**kw):
    group = {"gid": 0, "prompt_index": 0, "prompt_ids": [1], "samples": [
        {"output_ids": [2], "logprobs": [-0.1], "versions": [0], "finish_reason": "stop", "reward": 1.0}]}
    return {"version": 0, "groups": [group], "state": TODAY_STATE, **kw}


def test_batch_state_and_stats_are_typed_and_travel_as_the_flat_maps_they_were():
    stats = P.BatchStats(servers_live=2, gen_busy_s=1.5, rollout_slot_occupancy=0.25, scored_reward_mean=-0.5,
                         gen_tokens={"rollout-0": 30, "rollout-1": 12})
    b = P.Batch(version=0, groups=[P.Group.model_validate(batch_body()["groups"][0])],
                state=P.ControllerState(**TODAY_STATE), stats=stats)
    frames = [bytes(f) for f in P.encode(b)]
    body = msgpack.unpackb(frames[0])["body"]
    assert body["state"] == {**TODAY_STATE, "skipped_bad_lines": 0}  # a counter added since: 0 when absent
    assert body["stats"] == {"servers_live": 2, "gen_busy_s": 1.5, "rollout_slot_occupancy": 0.25,
                             "scored_reward_mean": -0.5, "gen_tokens/rollout-0": 30, "gen_tokens/rollout-1": 12}
    m = P.decode(frames)
    assert m.body == b and m.body.stats.gen_tokens == {"rollout-0": 30, "rollout-1": 12}
    # absent optional values are absent keys, as before
    assert P.BatchStats(servers_live=1).model_dump() == {"servers_live": 1, "gen_busy_s": 0.0}


def test_batch_stats_as_older_senders_wrote_them_still_validate():
    flat = {"servers_live": 1.0, "gen_busy_s": 2, "gen_tokens/s": 7.0}  # numbers as floats, no optional keys
    m = P.decode([header(type="batch", body=batch_body(stats=flat))])
    assert m.body.stats == P.BatchStats(servers_live=1, gen_busy_s=2.0, gen_tokens={"s": 7})
    assert m.body.stats.scored_reward_mean is None and m.body.stats.rollout_slot_occupancy is None
    assert P.decode([header(type="batch", body={k: v for k, v in batch_body().items()})]).body.stats == P.BatchStats()


@pytest.mark.parametrize("stats", [
    {"gen_busy_s": float("nan")},
    {"gen_busy_s": float("inf")},
    {"gen_busy_s": -1.0},
    {"scored_reward_mean": float("-inf")},
    {"rollout_slot_occupancy": -0.5},
    {"servers_live": -1},
    {"servers_live": 1.5},
    {"servers_live": 2**64 - 1},
    {"servers_live": "many"},
    {"unknown": 1.0},
    {"gen_tokens/s": -3},
    {"gen_tokens/s": float("nan")},
    {"gen_tokens/" + "x" * 256: 1},
    {f"gen_tokens/s{i}": 1 for i in range(P.MAX_SERVERS + 1)},
    {"gen_tokens": {"s": 1}, "gen_tokens/t": 2},
    [1, 2],
])
def test_malformed_batch_stats_are_rejected_with_a_reason(stats):
    with pytest.raises(P.ProtocolError) as e:
        P.decode([header(type="batch", body=batch_body(stats=stats))])
    assert e.value.reason == "invalid_body" and "stats" in str(e.value)


@pytest.mark.parametrize("state", [
    {**TODAY_STATE, "accepted": -1},
    {**TODAY_STATE, "generated_tokens": 2**63},
    {**TODAY_STATE, "data_position": 1.5},
    {**TODAY_STATE, "data_position": "forty"},
    {**TODAY_STATE, "dropped_stale": None},
    {**TODAY_STATE, "new_counter": 1},
    [40],
])
def test_malformed_controller_state_is_rejected_in_a_batch_and_in_the_trainer_hello(state):
    with pytest.raises(P.ProtocolError) as e:
        P.decode([header(type="batch", body=batch_body(state=state))])
    assert e.value.reason == "invalid_body" and "state" in str(e.value)
    with pytest.raises(P.ProtocolError) as e:
        P.decode([header(type="trainer_hello", body={"version": 3, "resume_state": state})])
    assert e.value.reason == "invalid_body" and "resume_state" in str(e.value)


def test_resume_state_of_today_and_of_older_runs_loads():
    m = P.decode([header(type="trainer_hello", body={"version": 3, "resume_state": TODAY_STATE})])
    assert m.body.resume_state == P.ControllerState(**TODAY_STATE)
    older = P.ControllerState.model_validate({"data_position": 40})  # a counter it lacks starts from 0
    assert older.data_position == 40 and older.dropped_aborted == older.skipped_too_long == 0
    fresh = P.TrainerHello(version=0)
    assert roundtrip(fresh).body == fresh and fresh.resume_state is None


def test_a_malformed_batch_is_counted_and_skipped_by_the_receiver():
    from areal_py.telemetry.metrics import rejected_count
    from areal_py.wire.transport import parse

    before = rejected_count("trainer")
    bad = header(type="batch", body=batch_body(stats={"gen_busy_s": float("nan")}))
    assert parse([bad], "trainer") == (None, None)
    assert rejected_count("trainer") == before + 1
    good = [bytes(f) for f in P.encode(P.Batch.model_validate(batch_body()))]
    assert parse(good, "trainer")[1].body.state.data_position == 40
