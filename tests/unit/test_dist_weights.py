"""weights.transfer=dist, the pure parts: bucket layout, packing, the receiver's checks, server ranks, the
controller relaying a dist notice. Layouts below are worked by hand: ALIGN is 64 bytes."""
from __future__ import annotations

import msgpack
import pytest
import torch
import zmq

from areal_py.config import ConfigError, load_config
from areal_py.wire import dist_weights as D
from areal_py.wire import protocol as P
from controller.run_state import RunCounters
from controller.servers import ServerRegistry
from controller.weight_sync import WeightSync

SPECS = [("a", torch.float32, (3,)), ("b", torch.bfloat16, (5,)), ("c", torch.int64, (2, 2)),
         ("d", torch.float32, (40,))]


def _weights() -> dict[str, torch.Tensor]:
    return {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.arange(5).to(torch.bfloat16),
            "c": torch.tensor([[1, -2], [3, 2**40]]), "d": torch.linspace(-1, 1, 40)}


def _expected() -> dict[str, D.Spec]:
    return {n: (dt, s) for n, dt, s in SPECS}


def _summary(layout: P.DistLayout) -> list[tuple[int, list[tuple[str, int]]]]:
    return [(b.nbytes, [(t.name, t.offset) for t in b.tensors]) for b in layout.buckets]


def test_plan_by_hand():
    # a: 12 bytes at 0; b: 10 bytes at the next 64-byte boundary (64), ends at 74; c (32 bytes) would start at
    # 128 and end at 160 > 128: new bucket, at 0; d (160 bytes) would start at 64: new bucket, alone (larger
    # than a bucket). A bucket's size is the end of its last tensor.
    layout = D.plan_layout(SPECS, bucket_bytes=128)
    assert _summary(layout) == [(74, [("a", 0), ("b", 64)]), (32, [("c", 0)]), (160, [("d", 0)])]
    assert D.total_bytes(layout) == 74 + 32 + 160
    assert layout.buckets[0].tensors[1].dtype == "bfloat16" and layout.buckets[1].tensors[0].shape == [2, 2]
    # one large bucket holds all four: c at align(74) = 128, d at align(160) = 192, ends at 352
    assert _summary(D.plan_layout(SPECS, bucket_bytes=1 << 20)) == [(352, [("a", 0), ("b", 64), ("c", 128),
                                                                         ("d", 192)])]
    assert D.layout_for(_weights(), 128) == layout


def test_plan_refuses_bad_input():
    with pytest.raises(ValueError, match="bucket size"):
        D.plan_layout(SPECS, 0)
    with pytest.raises(ValueError, match="no tensors"):
        D.plan_layout([], 128)
    with pytest.raises(ValueError, match="cannot be broadcast"):
        D.plan_layout([("x", torch.float64, (1,))], 128)


def test_pack_bytes_by_hand_and_unpack_round_trip():
    w = _weights()
    layout = D.plan_layout(SPECS, 128)
    buf = D.pack_bucket(w, layout.buckets[0])
    assert buf.dtype == torch.uint8 and buf.numel() == 74
    assert buf[0:4].tolist() == [0, 0, 128, 63]  # 1.0f = 0x3F800000, little-endian
    assert buf[4:8].tolist() == [0, 0, 0, 64]  # 2.0f = 0x40000000
    assert buf[12:64].tolist() == [0] * 52  # alignment gap
    assert buf[64:68].tolist() == [0, 0, 128, 63]  # bf16 0.0 = 0x0000, then 1.0 = 0x3F80
    out = {}
    for b in layout.buckets:
        packed = D.pack_bucket(w, b)
        views = D.unpack_bucket(packed, b)
        for v in views.values():  # zero-copy: every tensor lies inside its bucket
            assert packed.data_ptr() <= v.data_ptr() < packed.data_ptr() + packed.numel()
        out.update(views)
    assert out.keys() == w.keys()
    for k in w:
        assert out[k].dtype == w[k].dtype and torch.equal(out[k], w[k])


def test_unpack_refuses_a_buffer_of_the_wrong_size():
    b = D.plan_layout(SPECS, 128).buckets[0]
    with pytest.raises(ValueError, match="expected uint8"):
        D.unpack_bucket(torch.zeros(73, dtype=torch.uint8), b)


def test_check_layout_accepts_the_plan_in_any_order():
    D.check_layout(D.plan_layout(SPECS, 128), _expected())
    D.check_layout(D.plan_layout(list(reversed(SPECS)), 100), _expected())


def _tampered(change) -> P.DistLayout:
    d = D.plan_layout(SPECS, 128).model_dump()
    change(d)
    return P.DistLayout.model_validate(d)


@pytest.mark.parametrize(("reason", "change"), [
    ("names", lambda d: d["buckets"][1]["tensors"].__setitem__(0, {**d["buckets"][1]["tensors"][0], "name": "a"})),
    ("names", lambda d: d["buckets"][1]["tensors"][0].__setitem__("name", "zz")),
    ("names", lambda d: d["buckets"].pop()),
    ("dtype", lambda d: d["buckets"][0]["tensors"][0].__setitem__("dtype", "float16")),
    ("shape", lambda d: d["buckets"][1]["tensors"][0].__setitem__("shape", [4])),
    ("size", lambda d: d["buckets"][0]["tensors"][1].__setitem__("offset", 12)),
    ("size", lambda d: d["buckets"][2].__setitem__("nbytes", 10**12)),
    ("size", lambda d: d.__setitem__("bucket_bytes", 4096)),
])
def test_check_layout_rejects_by_reason(reason, change):
    with pytest.raises(D.DistRejected) as e:
        D.check_layout(_tampered(change), _expected())
    assert e.value.reason == reason


def test_drain_limit_bounds_what_a_rejecting_receiver_takes_in():
    assert D.drain_limit(_expected()) == (12 + 10 + 32 + 160) + 4 * D.ALIGN
    assert D.total_bytes(D.plan_layout(SPECS, 1)) <= D.drain_limit(_expected())


@pytest.mark.parametrize("bad", [
    {"name": "a", "dtype": "float64", "shape": [1]},
    {"name": "a", "dtype": "float32", "shape": [-1]},
    {"name": "a", "dtype": "float32", "shape": [1] * 9},
    {"name": "a", "dtype": "float32", "shape": [1], "offset": -64},
])
def test_hostile_layout_fails_the_schema(bad):
    body = P.UpdateWeights(version=1).model_dump()
    body["dist"] = {"bucket_bytes": 64, "buckets": [{"nbytes": 4, "tensors": [bad]}]}
    frames = P.encode(P.UpdateWeights(version=1))
    header = msgpack.unpackb(frames[0])
    header["body"] = body
    with pytest.raises(P.ProtocolError) as e:
        P.decode([msgpack.packb(header)])
    assert e.value.reason == "invalid_body"


def test_server_rank():
    assert D.server_rank("rollout-0", 2) == 1
    assert D.server_rank("rollout-1", 2) == 2
    with pytest.raises(ValueError, match="rollout.num_servers=2"):
        D.server_rank("rollout-2", 2)
    with pytest.raises(ValueError, match="does not end with its index"):
        D.server_rank("gpu-box", 2)


def test_config_dist_timeout_below_the_sync_timeout():
    cfg = load_config(None, ["weights.transfer=dist", "weights.dist_timeout_s=5"])
    assert cfg.weights.transfer == "dist" and cfg.weights.dist_bucket_mb > 0
    with pytest.raises(ConfigError, match="dist_timeout_s"):
        load_config(None, ["weights.transfer=dist", "weights.dist_timeout_s=60",
                           "controller.weight_sync_timeout_s=60"])


def test_controller_relays_the_layout_and_never_sends_a_dist_version_directly():
    """A dist notice goes out on the PUB with its layout and no frames; a server behind it is not sent an
    empty update (it waits for a version with tensors: the trainer's fallback)."""
    ctx = zmq.Context.instance()
    pub, sub = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    pub.bind("inproc://dist-relay")
    sub.connect("inproc://dist-relay")
    registry = ServerRegistry(timeout_s=60)
    server, _ = registry.seen("rollout-0", 0)
    direct = []
    sync = WeightSync(pub, registry, RunCounters(), lambda s, body, tensors: direct.append((s, body, tensors)),
                      max_token_staleness=1, sync_timeout_s=60)
    layout = D.plan_layout(SPECS, 128)
    try:
        sync.publish(P.WeightsReady(version=3, dist=layout), {})
        assert sub.poll(5000), "timed out after 5s waiting for the relayed dist notice"
        msg = P.decode(sub.recv_multipart())
        assert msg.body.version == 3 and msg.body.dist == layout and msg.body.path is None and not msg.tensors
        sync.catch_up(server, force=True)
        assert direct == []
        sync.publish(P.WeightsReady(version=3), {"a": torch.ones(3)})  # the trainer's stream fallback
        sync.catch_up(server, force=True)
        assert len(direct) == 1 and direct[0][1].version == 3 and direct[0][1].dist is None
    finally:
        pub.close(linger=0)
        sub.close(linger=0)


class _FailingGroup:
    broken = None

    def send(self, weights, version, layout):
        self.broken = "peer gone"
        raise D.DistWeightsError("weights.transfer=dist: bucket 1/1 of version 4 failed on rank 0 of 3: peer gone")


@pytest.mark.parametrize("on_failure", ["stream", "stop"])
def test_trainer_after_a_failed_broadcast_falls_back_or_stops(on_failure):
    """The notice goes to the controller first (the servers join on it); then a failed broadcast either returns
    False (the caller sends the version as stream frames) or raises the named error (the run stops)."""
    from trainer.trainer import Trainer

    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind(f"inproc://trainer-dist-{on_failure}")
    b.connect(f"inproc://trainer-dist-{on_failure}")
    cfg = load_config(None, ["weights.transfer=dist", "weights.dist_bucket_mb=1",
                             f"weights.dist_on_failure={on_failure}"])
    fake = type("T", (), {"cfg": cfg, "version": 4, "link": type("L", (), {"to_ctrl": a})(), "weight_group": _FailingGroup()})()
    try:
        if on_failure == "stream":
            assert Trainer.publish_dist(fake, _weights()) is False
        else:
            with pytest.raises(D.DistWeightsError, match="bucket 1/1 of version 4"):
                Trainer.publish_dist(fake, _weights())
        assert b.poll(5000), "timed out after 5s waiting for the trainer's dist notice"
        msg = P.decode(b.recv_multipart())
        assert msg.body.version == 4 and msg.body.dist == D.layout_for(_weights(), 2**20)
        assert Trainer.publish_dist(fake, _weights()) is False  # a broken group is never used again
    finally:
        a.close(linger=0)
        b.close(linger=0)
