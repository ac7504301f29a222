"""CURVE between the roles: key files, the controller's per-socket allow-lists, every refused handshake
counted by reason, and no socket off loopback without keys."""
from __future__ import annotations

import os
import stat
import time

import pytest
import zmq
from conftest import free_ports

from areal_py.telemetry.metrics import rejected_count
from areal_py.wire import protocol as P
from areal_py.wire.curve import (
    CurveClient,
    Gatekeeper,
    KeyDir,
    KeyFileError,
    KeyPair,
    client_curve,
    generate_keys,
    handshake_reason,
)
from areal_py.wire.netaddr import is_local_host, tcp_host
from areal_py.wire.transport import InsecureSocket, make_socket, recv, send


def _wait_for(cond, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_keys_are_written_private_and_never_replaced(tmp_path) -> None:
    d = tmp_path / "keys"
    assert generate_keys(d, servers=2) == ["controller", "trainer", "rollout-0", "rollout-1"]
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in ("controller", "trainer", "rollout-0", "rollout-1"):
        assert stat.S_IMODE((d / f"{name}.key_secret").stat().st_mode) == 0o600
        assert stat.S_IMODE((d / f"{name}.key").stat().st_mode) == 0o644
    keys = KeyDir(d)
    pair = keys.pair("trainer")
    assert len(pair.public) == len(pair.secret) == 40 and keys.public("trainer") == pair.public
    assert zmq.curve_public(pair.secret) == pair.public  # the file's pair belongs together
    assert "secret-key" not in (d / "trainer.key").read_text()  # the public file gives nothing away
    assert set(keys.role_keys("rollout").values()) == {"rollout-0", "rollout-1"}
    with pytest.raises(KeyFileError, match="already holds keys"):
        generate_keys(d, servers=2)
    os.chmod(d / "trainer.key_secret", 0o640)
    with pytest.raises(KeyFileError, match=r"readable by others \(mode 640\).*chmod 600"):
        keys.pair("trainer")
    with pytest.raises(KeyFileError, match="no key pair .*nobody.key_secret.*areal-py keys"):
        keys.pair("nobody")


def test_a_server_uses_its_own_pair_or_the_shared_rollout_one(tmp_path) -> None:
    generate_keys(tmp_path / "per", servers=1)
    generate_keys(tmp_path / "shared")
    own = client_curve(str(tmp_path / "per"), "rollout-0")
    shared = client_curve(str(tmp_path / "shared"), "rollout-7")
    assert own.pair == KeyDir(tmp_path / "per").pair("rollout-0")
    assert shared.pair == KeyDir(tmp_path / "shared").pair("rollout")
    assert own.server_public == KeyDir(tmp_path / "per").public("controller")
    assert client_curve("", "trainer") is None
    with pytest.raises(KeyFileError, match="rollout.key_secret"):  # per-server keys, an unknown server id
        client_curve(str(tmp_path / "per"), "rollout-9")


def test_loopback_is_told_from_every_other_address() -> None:
    assert is_local_host("127.0.0.1") and is_local_host("127.0.1.1") and is_local_host("localhost")
    assert is_local_host("::1") and is_local_host("[::1]")
    for host in ("0.0.0.0", "*", "::", "10.1.2.3", "192.168.0.7", "no-such-host.invalid"):
        assert not is_local_host(host), host
    assert tcp_host("tcp://10.0.0.5:45501") == "10.0.0.5" and tcp_host("ipc:///tmp/x") is None


def test_no_socket_off_loopback_without_keys() -> None:
    ctx = zmq.Context.instance()
    with pytest.raises(InsecureSocket, match=r"refusing to listen on tcp://0.0.0.0:1 without CURVE keys.*areal-py keys"):
        make_socket(ctx, zmq.ROUTER, "tcp://0.0.0.0:1", bind=True)
    with pytest.raises(InsecureSocket, match="refusing to connect to tcp://10.9.8.7:1"):
        make_socket(ctx, zmq.DEALER, "tcp://10.9.8.7:1", bind=False)


def test_handshake_failures_are_named() -> None:
    assert handshake_reason(zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400) == "unknown_key"
    assert handshake_reason(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                            zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH) == "no_curve"
    assert handshake_reason(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                            zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC) == "handshake_failed"


@pytest.fixture
def gate(tmp_path):
    """A gatekeeper on a context of its own (ZAP is one handler per context) over fresh keys."""
    generate_keys(tmp_path / "keys")
    ctx = zmq.Context()
    g = Gatekeeper(KeyDir(tmp_path / "keys"), ctx, role="t-curve")
    yield g, ctx, KeyDir(tmp_path / "keys")
    g.stop()
    ctx.destroy(linger=0)


def test_each_socket_admits_only_its_role_and_every_refusal_is_counted(gate) -> None:
    g, ctx, keys = gate
    rollout_port, trainer_port, weights_port = free_ports(3)
    router = make_socket(ctx, zmq.ROUTER, f"tcp://0.0.0.0:{rollout_port}", bind=True, curve=g.server("rollout"))
    from_trainer = make_socket(ctx, zmq.ROUTER, f"tcp://0.0.0.0:{trainer_port}", bind=True, curve=g.server("trainer"))
    pub = make_socket(ctx, zmq.PUB, f"tcp://0.0.0.0:{weights_port}", bind=True, curve=g.server("weights"))
    ctrl = keys.public("controller")
    as_rollout = CurveClient(keys.pair("rollout"), ctrl)
    as_trainer = CurveClient(keys.pair("trainer"), ctrl)
    public, secret = zmq.curve_keypair()
    stranger = CurveClient(KeyPair(public, secret), ctrl)
    before = {r: rejected_count("t-curve", r) for r in ("unknown_key", "no_curve", "handshake_failed")}

    def dealer(port: int, curve: CurveClient | None, name: str) -> zmq.Socket:
        return make_socket(ctx, zmq.DEALER, f"tcp://127.0.0.1:{port}", bind=False, identity=name, curve=curve)

    good = dealer(rollout_port, as_rollout, "good")
    trainer = dealer(trainer_port, as_trainer, "trainer")
    rollout_as_trainer = dealer(trainer_port, as_rollout, "impostor")  # a rollout key on the trainer's socket
    plain = dealer(rollout_port, None, "plain")  # no keys at all
    unknown = dealer(rollout_port, stranger, "stranger")  # CURVE, but a key nobody listed
    wrong_server = dealer(rollout_port, CurveClient(keys.pair("rollout"), zmq.curve_keypair()[0]), "mitm")
    for s in (good, trainer, rollout_as_trainer, plain, unknown, wrong_server):
        send(s, P.Ping())
    spy = make_socket(ctx, zmq.SUB, f"tcp://127.0.0.1:{weights_port}", bind=False, curve=stranger)
    listener = make_socket(ctx, zmq.SUB, f"tcp://127.0.0.1:{weights_port}", bind=False, curve=as_rollout)

    sender, msg = recv(router, "t-curve", timeout_s=20, waiting_for="the listed server", routed=True)
    assert sender == b"good" and isinstance(msg.body, P.Ping)
    sender, msg = recv(from_trainer, "t-curve", timeout_s=20, waiting_for="the trainer", routed=True)
    assert sender == b"trainer" and isinstance(msg.body, P.Ping)
    assert _wait_for(lambda: all(rejected_count("t-curve", r) > before[r] for r in before)), \
        {r: rejected_count("t-curve", r) - before[r] for r in before}
    # the weights PUB reaches the listed server, never the unlisted SUB
    assert _wait_for(lambda: (send(pub, P.Ping()), listener.poll(100))[1] != 0)
    assert listener.recv_multipart() and not spy.poll(300)
    assert not router.poll(300) and not from_trainer.poll(0)  # nothing else got through


def test_a_servers_own_key_speaks_only_under_its_own_id(tmp_path) -> None:
    """With one pair per server, rollout-0's key sending as rollout-1 is dropped and counted (wrong_key);
    under its own id it passes, and the shared rollout key may speak as any server."""
    generate_keys(tmp_path / "per", servers=2)
    keys = KeyDir(tmp_path / "per")
    generate_keys(tmp_path / "shared")  # and a shared rollout pair beside the per-server ones
    for f in ("rollout.key", "rollout.key_secret"):
        (tmp_path / "per" / f).write_bytes((tmp_path / "shared" / f).read_bytes())
    (tmp_path / "per" / "rollout.key_secret").chmod(0o600)
    ctx = zmq.Context()
    g = Gatekeeper(keys, ctx, role="t-curve-id")
    try:
        (port,) = free_ports(1)
        router = make_socket(ctx, zmq.ROUTER, f"tcp://127.0.0.1:{port}", bind=True, curve=g.server("rollout"))
        ctrl = keys.public("controller")
        honest = make_socket(ctx, zmq.DEALER, f"tcp://127.0.0.1:{port}", bind=False, identity="rollout-0",
                             curve=CurveClient(keys.pair("rollout-0"), ctrl))
        impostor = make_socket(ctx, zmq.DEALER, f"tcp://127.0.0.1:{port}", bind=False, identity="rollout-1",
                               curve=CurveClient(keys.pair("rollout-0"), ctrl))
        shared = make_socket(ctx, zmq.DEALER, f"tcp://127.0.0.1:{port}", bind=False, identity="rollout-5",
                             curve=CurveClient(keys.pair("rollout"), ctrl))
        before = rejected_count("t-curve-id", "wrong_key")
        verdicts = {}
        for s in (honest, impostor, shared):
            send(s, P.Ping())
            assert router.poll(20_000)
            frames = router.recv_multipart(copy=False)
            verdicts[bytes(frames[0])] = g.sender_fits(bytes(frames[0]), frames)
        assert verdicts == {b"rollout-0": True, b"rollout-1": False, b"rollout-5": True}
        assert rejected_count("t-curve-id", "wrong_key") - before == 1
    finally:
        g.stop()
        ctx.destroy(linger=0)
