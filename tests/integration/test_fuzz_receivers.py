"""Property-based fuzzing of every receiver over its real socket: hostile messages (tests/fuzz_messages.py) never
end a role, every one the decoder refuses is counted under its reason, every message of a type the socket does
not take is counted too, and the role still answers a valid message afterwards.

Sockets: the rollout server's DEALER (from the controller) and SUB (weight notices), the controller's rollout
ROUTER and trainer ROUTER (from a process that is not the trainer), and the trainer's batch DEALER. The default
suite sends about 1,000 messages per socket type; `-m slow` sends 10,000.
"""
from __future__ import annotations

import time
from collections import Counter

import pytest
import zmq
from conftest import net_overrides, on_thread
from fuzz_messages import EXEMPLARS, expected, message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model

from areal_py.config import load_config
from areal_py.models import build_char_tokenizer
from areal_py.tasks.arith import ArithTask
from areal_py.telemetry.metrics import rejected_count
from areal_py.wire import protocol as P
from areal_py.wire.trainer_link import connect_trainer
from areal_py.wire.transport import make_socket, recv, send
from areal_py.wire.weights import named_weights
from controller.controller import Controller
from rollout_server.server import RolloutServer
from rollout_server.torch_engine.engine import Engine

PER_EXAMPLE = 25
ROLLOUT_TYPES = ("hello", "heartbeat", "weights_loaded", "result")  # what the controller takes from a server
ALL = tuple(EXEMPLARS)
DECODE_REASONS = ("empty", "bad_msgpack", "bad_header", "bad_schema", "unknown_type", "invalid_body", "bad_tensors")
SIZES = [pytest.param(1_000, id="1k"), pytest.param(10_000, id="10k", marks=pytest.mark.slow)]


def fuzz(n: int, types: tuple[str, ...]):
    """Decorator: run the test body on n messages in examples of PER_EXAMPLE."""
    return lambda f: settings(max_examples=n // PER_EXAMPLE, deadline=None, database=None, derandomize=True,
                              suppress_health_check=list(HealthCheck))(
        given(st.lists(message(types), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))(f))


class Ledger:
    """The decoder's verdicts on what was sent, and the receiver's counted rejections since `start`."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.sent: Counter = Counter()
        self.tagged: Counter = Counter()  # (socket tag, verdict, reason or type)
        self.before = {r: rejected_count(role, r) for r in DECODE_REASONS}
        self.total_before = rejected_count(role)

    def add(self, frames: list[bytes], tag: str = "") -> tuple[str, str]:
        verdict = expected(frames)
        self.sent[verdict] += 1
        self.tagged[(tag, *verdict)] += 1
        return verdict

    def decode_rejections(self) -> dict[str, int]:
        return {r: int(rejected_count(self.role, r) - self.before[r]) for r in DECODE_REASONS}

    def expected_decode_rejections(self) -> dict[str, int]:
        return {r: self.sent[("rejected", r)] for r in DECODE_REASONS}

    def rejected(self) -> int:
        return int(rejected_count(self.role) - self.total_before)

    def decoded(self, types: tuple[str, ...] | None = None, tag: str | None = None) -> int:
        return sum(n for (g, kind, t), n in self.tagged.items()
                   if kind == "decoded" and (types is None or t in types) and tag in (None, g))


@pytest.fixture
def cfg(tmp_path):
    return load_config(None, [f"run.output_dir={tmp_path}", "run.name=f", *net_overrides(), "controller.batch_size=2",
                              "controller.group_size=2", "rollout.controller_timeout_s=600",
                              "trainer.batch_timeout_s=5"])


@pytest.mark.parametrize("n", SIZES)
def test_rollout_server_survives_and_counts_hostile_messages(cfg, n):
    ctx = zmq.Context.instance()
    router = make_socket(ctx, zmq.ROUTER, cfg.net.addr(cfg.net.rollout_port, bind=True), bind=True)
    pub = make_socket(ctx, zmq.PUB, cfg.net.addr(cfg.net.weights_port, bind=True), bind=True)
    model = tiny_model(0, vocab_size=48, max_positions=128).eval()
    weights = named_weights(tiny_model(1, vocab_size=48, max_positions=128))
    server = RolloutServer(cfg, "srv", engine=Engine(model, eos_token_id=47, max_running=8))
    crashed: list[BaseException] = []
    t = on_thread(server.serve, crashed)
    types = tuple(x for x in ALL if x != "shutdown")  # the controller's own stop command
    ledger = Ledger("rollout")
    state = {"probe": 10**9, "version": 0}
    try:
        recv(router, "test", timeout_s=10, waiting_for="hello", routed=True)
        time.sleep(0.3)  # PUB drops messages until the server's SUB subscription has arrived

        @fuzz(n, types)
        def run(batch: list[list[bytes]]) -> None:
            for i, frames in enumerate(batch):  # alternate the two sockets
                ledger.add(frames)
                if i % 2:
                    pub.send_multipart(frames)
                else:
                    router.send_multipart([b"srv", *frames])
            # probes: a weight update on the SUB and a group on the DEALER, each answered after what came before
            state["probe"] += 1
            state["version"] += 1
            send(pub, P.UpdateWeights(version=state["version"]), weights)
            send(router, P.Generate(gid=state["probe"], attempt=0, prompt_ids=[1, 2], n=1,
                                    sampling=P.SamplingBody(max_new_tokens=1, temperature=1.0, top_p=1.0)), to=b"srv")
            loaded = answered = False
            while not (loaded and answered):
                assert not crashed, crashed
                _, m = recv(router, "test", timeout_s=30, waiting_for="the probes' answers", routed=True)
                loaded |= isinstance(m.body, P.WeightsLoaded) and m.body.version == state["version"]
                answered |= isinstance(m.body, P.Result) and m.body.gid == state["probe"]

        run()
        assert not crashed and t.is_alive()
        assert server.engine.version == state["version"]  # no hostile update was loaded
        assert ledger.decode_rejections() == ledger.expected_decode_rejections()
        not_for_a_server = ledger.decoded(("hello", "heartbeat", "result", "weights_loaded", "trainer_hello",
                                           "weights_ready", "trainer_done", "batch"))
        assert ledger.rejected() >= sum(ledger.expected_decode_rejections().values()) + not_for_a_server
        assert sum(ledger.sent.values()) == n - n % PER_EXAMPLE
    finally:
        server.running = False
        t.join(10)
        router.close()
        pub.close()


def start_controller(cfg, ctx) -> tuple[Controller, zmq.Socket, zmq.Socket]:
    ctrl = Controller(cfg, task=ArithTask(), tokenizer=build_char_tokenizer())
    to_ctrl, batches = connect_trainer(ctx, cfg.net)
    send(to_ctrl, P.TrainerHello(version=0))
    ctrl.start()
    return ctrl, to_ctrl, batches


def pump(ctrl: Controller) -> None:
    """Step the controller until both its receiving sockets have stayed quiet for two polls in a row."""
    poller = zmq.Poller()
    poller.register(ctrl.router, zmq.POLLIN)
    poller.register(ctrl.from_trainer, zmq.POLLIN)
    quiet = 0
    while quiet < 2:
        ctrl.step(5)
        quiet = 0 if poller.poll(20) else quiet + 1


@pytest.mark.parametrize("n", SIZES)
def test_controller_survives_and_counts_hostile_messages_on_both_ports(cfg, n):
    ctx = zmq.Context.instance()
    ctrl, to_ctrl, batches = start_controller(cfg, ctx)
    rogue_server = make_socket(ctx, zmq.DEALER, cfg.net.addr(cfg.net.rollout_port), bind=False, identity="fz")
    stranger = make_socket(ctx, zmq.DEALER, cfg.net.addr(cfg.net.trainer_port), bind=False, identity="stranger")
    ledger = Ledger("controller")
    try:
        @fuzz(n, ALL)
        def run(batch: list[list[bytes]]) -> None:
            for i, frames in enumerate(batch):
                ledger.add(frames, "stranger" if i % 2 else "rollout")
                (stranger if i % 2 else rogue_server).send_multipart(frames)
            pump(ctrl)
            while rogue_server.poll(0):  # the work it was sent, unanswered
                rogue_server.recv_multipart()

        run()
        assert not ctrl.trainer_done  # no stranger's TrainerDone stopped it
        assert ledger.decode_rejections() == ledger.expected_decode_rejections()
        # every stranger's message on the trainer port is refused, and each wrong type on the rollout port
        assert ledger.rejected() >= (sum(ledger.expected_decode_rejections().values()) + ledger.decoded(tag="stranger")
                                     + ledger.decoded(tuple(t for t in ALL if t not in ROLLOUT_TYPES), "rollout"))
        # and it still serves: a real server is sent work
        srv = make_socket(ctx, zmq.DEALER, cfg.net.addr(cfg.net.rollout_port), bind=False, identity="real")
        try:
            send(srv, P.Hello(server_id="real", version=0))
            deadline = time.monotonic() + 10
            got = None
            while got is None and time.monotonic() < deadline:
                ctrl.step(20)
                if srv.poll(0):
                    got = recv(srv, "test", timeout_s=1, waiting_for="work")[1]
            assert got is not None and got.type in ("generate", "update_weights")
        finally:
            srv.close()
    finally:
        ctrl.close()
        for s in (to_ctrl, batches, rogue_server, stranger):
            s.close()


@pytest.mark.parametrize("n", SIZES)
def test_trainer_batch_receiver_counts_every_message(cfg, n):
    """ControllerLink.next_batch, the trainer's only receiver, on a fake self: each message is either the batch it
    waits for (returned) or counted as rejected, exactly. A ping under a new session ends the wait with
    ControllerRestarted, which the trainer's loop answers by rejoining (here: the session is taken on)."""
    from trainer.controller_link import ControllerLink, ControllerRestarted

    ctx = zmq.Context.instance()
    router = make_socket(ctx, zmq.ROUTER, cfg.net.addr(cfg.net.batch_port, bind=True), bind=True)
    to_ctrl, batches = connect_trainer(ctx, cfg.net, identity="trainer-fz")  # to_ctrl: its probes, unanswered
    me = ControllerLink(cfg, to_ctrl, batches)
    ledger = Ledger("trainer")
    accepted = 0

    def next_batch() -> tuple[P.Batch, float]:
        while True:
            try:
                return me.next_batch(0)
            except ControllerRestarted as e:
                me.controller_session = e.session

    probe = P.Batch(version=0, state=P.ControllerState(), groups=[P.Group(
        gid=10**9, prompt_index=0, prompt_ids=[1], samples=[P.Sample(output_ids=[2], logprobs=[-1.0], versions=[0],
                                                                      finish_reason="stop", reward=0.0)])])
    try:
        router.send_multipart([b"trainer-fz", *P.encode(probe)])  # the link is up once its first batch arrives
        deadline = time.monotonic() + 10
        while not batches.poll(100):
            assert time.monotonic() < deadline, "the batch link never came up"
            router.send_multipart([b"trainer-fz", *P.encode(probe)])
        while batches.poll(200):
            next_batch()

        @fuzz(n, ALL)
        def run(batch: list[list[bytes]]) -> None:
            nonlocal accepted
            for frames in batch:
                ledger.add(frames)
                router.send_multipart([b"trainer-fz", *frames])
            router.send_multipart([b"trainer-fz", *P.encode(probe)])
            while True:
                got, _ = next_batch()
                if got.groups[0].gid == 10**9 and got == probe:
                    break
                accepted += 1

        run()
        sent = sum(ledger.sent.values())
        assert ledger.decode_rejections() == ledger.expected_decode_rejections()
        pings = ledger.decoded(("ping",))  # the controller's answer to the trainer's probe: taken as its word
        # nothing vanished uncounted; a batch for a later version is kept for its turn (ControllerLink.next_batch)
        assert ledger.rejected() + accepted + pings + len(me.ahead) == sent
        assert accepted <= ledger.decoded(("batch",))
    finally:
        router.close()
        batches.close()
        to_ctrl.close()
