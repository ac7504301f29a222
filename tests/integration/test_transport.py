"""Rejected messages: logged as a bounded, rate-limited summary while counted exactly; oversized
messages dropped by ZeroMQ itself (ZMQ_MAXMSGSIZE) without stopping the receiving role."""
from __future__ import annotations

import logging
import time

import msgpack
import pytest
import zmq
from conftest import free_ports, net_overrides

from areal_py.config import load_config
from areal_py.models import build_char_tokenizer
from areal_py.tasks.arith import ArithTask
from areal_py.telemetry.metrics import rejected_count
from areal_py.wire import protocol as P
from areal_py.wire import transport
from areal_py.wire.transport import RateLimitedLog, make_socket, parse, reject, send

BIG = 5 * 2**20


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    """A rejection log of our own on a clock the test moves, so rate limiting is exact, not timed."""
    c = FakeClock()
    monkeypatch.setattr(transport, "REJECT_LOG", RateLimitedLog(transport.log, every_s=10.0, clock=c))
    return c


def huge_unknown_type() -> list[bytes]:
    return [msgpack.packb({"type": "x" * BIG, "schema": 1, "body": {}})]


def test_a_huge_bad_message_logs_a_bounded_line(caplog, clock) -> None:
    before = rejected_count("t-huge")
    with caplog.at_level(logging.WARNING, logger="areal_py.wire.transport"):
        assert parse(huge_unknown_type(), "t-huge") == (None, None)
        reject("t-huge", "odd", "y" * BIG)
    assert rejected_count("t-huge") - before == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all(len(line) < 1000 for line in lines), [len(line) for line in lines]
    assert "unknown_type" in lines[0] and str(len(huge_unknown_type()[0])) in lines[0]  # reason and size
    assert str(BIG) in lines[1]


def test_repeated_rejections_are_rate_limited_but_counted_exactly(caplog, clock) -> None:
    before = rejected_count("t-flood", "bad_msgpack")
    with caplog.at_level(logging.WARNING, logger="areal_py.wire.transport"):
        for _ in range(50):
            parse([b"\x00\x01not msgpack"], "t-flood")
        reject("t-flood", "other_reason", "a different reason has its own allowance")
        assert len(caplog.records) == 2
        clock.now += 10.5
        parse([b"\x00\x01not msgpack"], "t-flood")
    assert rejected_count("t-flood", "bad_msgpack") - before == 51
    assert len(caplog.records) == 3
    assert "49 more" in caplog.records[2].getMessage()


def test_max_message_size_applies_per_frame_and_the_sender_reconnects(clock) -> None:
    """libzmq checks ZMQ_MAXMSGSIZE per frame: a multipart message of small frames passes even when its
    total is over the limit; a frame over it drops the connection, and the peer's next message arrives."""
    ctx = zmq.Context.instance()
    (port,) = free_ports(1)
    router = make_socket(ctx, zmq.ROUTER, f"tcp://127.0.0.1:{port}", bind=True, max_message_bytes=1000)
    dealer = make_socket(ctx, zmq.DEALER, f"tcp://127.0.0.1:{port}", bind=False, identity="d")
    try:
        dealer.send_multipart([b"a" * 600, b"b" * 600])
        assert router.poll(10_000)
        assert [len(f) for f in router.recv_multipart()] == [1, 600, 600]
        dealer.send_multipart([b"c" * 2000])
        got = None
        deadline = time.monotonic() + 20
        while got is None and time.monotonic() < deadline:  # resend: one may die with the old connection
            dealer.send_multipart([b"after"])
            if router.poll(200):
                got = router.recv_multipart()
        assert got == [b"d", b"after"]
        while router.poll(200):  # resent copies only: the oversized frame never arrives
            assert router.recv_multipart() == [b"d", b"after"]
    finally:
        router.close()
        dealer.close()


def test_controller_drops_a_message_over_the_size_limit_and_keeps_serving(tmp_path, clock) -> None:
    from controller.controller import Controller

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=s", *net_overrides(), "net.max_message_bytes=100000",
                             "controller.batch_size=2", "controller.group_size=2"])
    ctx = zmq.Context.instance()
    ctrl = Controller(cfg, task=ArithTask(), tokenizer=build_char_tokenizer())
    push = make_socket(ctx, zmq.DEALER, cfg.net.addr(cfg.net.trainer_port), bind=False, identity="trainer")
    big = make_socket(ctx, zmq.DEALER, cfg.net.addr(cfg.net.rollout_port), bind=False, identity="big")
    small = make_socket(ctx, zmq.DEALER, cfg.net.addr(cfg.net.rollout_port), bind=False, identity="small")
    try:
        send(push, P.TrainerHello(version=0))
        ctrl.start()
        send(big, P.Hello(server_id="b" * 200_000, version=0))  # schema-valid, but over the limit
        send(small, P.Hello(server_id="small", version=0))
        deadline = time.monotonic() + 20
        while "small" not in ctrl.registry.servers and time.monotonic() < deadline:
            ctrl.step(50)
        for _ in range(5):
            ctrl.step(50)
        assert "small" in ctrl.registry.servers and "big" not in ctrl.registry.servers
    finally:
        ctrl.close()
        for s in (push, big, small):
            s.close()
