"""Each role started on its own notices a dead peer within a configured time and exits with an error
naming what it waited for, instead of idling forever: the controller without a live rollout server,
a rollout server without word from the controller, the trainer without a batch or, while it waits for one,
without the controller's answer to its probes."""
from __future__ import annotations

import threading
import time

import pytest
import zmq
from conftest import net_overrides, on_thread
from test_sockets import tiny_model

from areal_py.config import load_config
from areal_py.models import build_char_tokenizer
from areal_py.tasks.arith import ArithTask
from areal_py.wire import protocol as P
from areal_py.wire.trainer_link import connect_trainer
from areal_py.wire.transport import ControllerLost, WaitTimeout, make_socket, recv, send
from controller.controller import Controller
from rollout_server.server import RolloutServer
from rollout_server.torch_engine.engine import Engine


def config(tmp_path, *extra: str):
    return load_config(None, [f"run.output_dir={tmp_path}", "run.name=s", *net_overrides(),
                              "controller.batch_size=2", "controller.group_size=2", *extra])


@pytest.fixture
def ctx():
    return zmq.Context.instance()


def test_controller_stops_when_its_last_server_stays_silent(tmp_path, ctx):
    cfg = config(tmp_path, "controller.server_timeout_s=0.3", "controller.no_server_timeout_s=1")
    ctrl = Controller(cfg, task=ArithTask(), tokenizer=build_char_tokenizer())
    push = make_socket(ctx, zmq.DEALER, cfg.net.addr(cfg.net.trainer_port), bind=False, identity="trainer")
    srv = make_socket(ctx, zmq.DEALER, cfg.net.addr(cfg.net.rollout_port), bind=False, identity="rollout-7")
    try:
        send(push, P.TrainerHello(version=0))
        ctrl.start()
        send(srv, P.Hello(server_id="rollout-7", version=0))
        deadline = time.monotonic() + 20
        while "rollout-7" not in ctrl.registry.servers and time.monotonic() < deadline:
            ctrl.step(20)
        assert ctrl.registry.live()
        with pytest.raises(WaitTimeout, match=r"waiting for a live rollout server.*rollout-7"):
            while time.monotonic() < deadline + 10:  # the server says nothing more
                ctrl.step(20)
    finally:
        ctrl.close()
        push.close()
        srv.close()


def test_controller_pings_servers_even_while_waiting_for_the_trainer(tmp_path, ctx):
    """The ping rides the weights PUB, so a server hears it before the controller knows of the server,
    and the controller sends it from every wait of its own, the trainer's hello included."""
    cfg = config(tmp_path, "rollout.heartbeat_s=0.05")
    ctrl = Controller(cfg, task=ArithTask(), tokenizer=build_char_tokenizer())
    sub = make_socket(ctx, zmq.SUB, cfg.net.addr(cfg.net.weights_port), bind=False)
    push = make_socket(ctx, zmq.DEALER, cfg.net.addr(cfg.net.trainer_port), bind=False, identity="trainer")
    started = threading.Thread(target=ctrl.start, daemon=True)
    started.start()
    try:
        _, msg = recv(sub, "test", timeout_s=20, waiting_for="a ping while the controller waits for the trainer")
        assert msg.type == "ping"
        send(push, P.TrainerHello(version=0))
        started.join(20)
        assert not started.is_alive()
        while sub.poll(0):
            sub.recv_multipart()
        deadline = time.monotonic() + 20
        while not sub.poll(0) and time.monotonic() < deadline:
            ctrl.step(20)
        _, msg = recv(sub, "test", timeout_s=1, waiting_for="a ping from the serving loop")
        assert msg.type == "ping"
    finally:
        started.join(20)
        ctrl.close()
        sub.close()
        push.close()


def test_server_exits_when_the_controller_stays_silent(tmp_path, ctx):
    cfg = config(tmp_path, "rollout.controller_timeout_s=1", "controller.startup_timeout_s=1")
    router = make_socket(ctx, zmq.ROUTER, cfg.net.addr(cfg.net.rollout_port, bind=True), bind=True)
    server = RolloutServer(cfg, "srv", engine=Engine(tiny_model(0), eos_token_id=47, max_running=8))
    errors: list[BaseException] = []
    t = on_thread(server.serve, errors)
    try:
        recv(router, "test", timeout_s=10, waiting_for="hello", routed=True)  # then silence
        t.join(30)
        assert not t.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], ControllerLost), errors
        assert "srv" in str(errors[0]) and "the controller" in str(errors[0])
        assert "rollout.controller_timeout_s" in str(errors[0]) and "--resume" in str(errors[0])
        assert cfg.net.addr(cfg.net.rollout_port) in str(errors[0])
    finally:
        server.running = False
        t.join(5)
        router.close()


def test_any_message_from_the_controller_keeps_the_server_going(tmp_path, ctx):
    cfg = config(tmp_path, "rollout.controller_timeout_s=5", "controller.startup_timeout_s=100")
    router = make_socket(ctx, zmq.ROUTER, cfg.net.addr(cfg.net.rollout_port, bind=True), bind=True)
    pub = make_socket(ctx, zmq.PUB, cfg.net.addr(cfg.net.weights_port, bind=True), bind=True)
    server = RolloutServer(cfg, "srv", engine=Engine(tiny_model(0), eos_token_id=47, max_running=8))
    try:
        recv(router, "test", timeout_s=10, waiting_for="hello", routed=True)
        server.last_heard -= 50  # before its first word the controller gets startup_timeout_s more
        server.check_controller()
        server.last_heard -= 100  # past both
        with pytest.raises(WaitTimeout, match="the controller"):
            server.check_controller()
        deadline = time.monotonic() + 20
        while server.last_heard < time.monotonic() - 50 and time.monotonic() < deadline:
            send(pub, P.Ping())  # the SUB subscription may not have arrived yet: repeat
            server.poll_once(100)
        server.check_controller()  # heard: no error
        server.last_heard -= 50  # once heard from, controller_timeout_s alone applies
        with pytest.raises(WaitTimeout, match="the controller"):
            server.check_controller()
        server.last_heard -= 100
        send(router, P.Shutdown(reason="x"), to=b"srv")  # the work socket counts too
        server.poll_once(5000)
        server.check_controller()
    finally:
        server.close()
        router.close()
        pub.close()


def test_trainer_batch_wait_is_bounded_and_named(tmp_path, ctx):
    from trainer.controller_link import ControllerLink

    cfg = config(tmp_path, "trainer.batch_timeout_s=0.5")
    pull = make_socket(ctx, zmq.DEALER, cfg.net.addr(cfg.net.batch_port), bind=False)
    probe = make_socket(ctx, zmq.DEALER, cfg.net.addr(cfg.net.trainer_port), bind=False)
    try:
        link = ControllerLink(cfg, probe, pull)
        with pytest.raises(WaitTimeout, match=r"batch 3 from the controller at tcp://127\.0\.0\.1:\d+"):
            link.next_batch(3)
    finally:
        pull.close()
        probe.close()


def test_trainer_notices_a_dead_controller_within_its_bound_and_says_how_to_resume(tmp_path, ctx):
    """A real controller answers the waiting trainer's probes, so a wait longer than trainer.controller_timeout_s
    goes on while it lives; once it is gone (its sockets closed, as a kill -9 leaves them) the wait ends with
    ControllerLost naming the bound, the latest checkpoint and the resume command."""
    from trainer.controller_link import ControllerLink

    cfg = config(tmp_path, "trainer.controller_timeout_s=2", "controller.startup_timeout_s=1",
                 "rollout.heartbeat_s=0.1", "trainer.batch_timeout_s=120")
    (cfg.run_dir() / "checkpoints" / "step_2").mkdir(parents=True)  # what the message names as kept
    ctrl = Controller(cfg, task=ArithTask(), tokenizer=build_char_tokenizer())
    to_ctrl, batches = connect_trainer(ctx, cfg.net)
    link = ControllerLink(cfg, to_ctrl, batches)
    alive, errors = threading.Event(), []
    alive.set()

    def controller() -> None:
        while alive.is_set():
            ctrl.step(20)  # no server: no batch ever comes, only the answers to the probes

    def trainer() -> None:
        try:
            link.next_batch(0)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    send(to_ctrl, P.TrainerHello(version=0))
    ctrl.start()
    loop, waiting = threading.Thread(target=controller, daemon=True), threading.Thread(target=trainer, daemon=True)
    loop.start()
    waiting.start()
    try:
        deadline = time.monotonic() + 30
        while not link.pulse.heard_once and time.monotonic() < deadline:
            time.sleep(0.05)
        assert link.pulse.heard_once, "the controller never answered the trainer's probe"
        waiting.join(3)  # longer than the bound: a live controller's answers keep the trainer waiting
        assert waiting.is_alive() and not errors, errors
    finally:
        alive.clear()
        loop.join(10)
        ctrl.close()  # the controller is gone
    waiting.join(30)
    try:
        assert not waiting.is_alive(), "the trainer did not notice the controller's death"
        assert len(errors) == 1 and isinstance(errors[0], ControllerLost), errors
        text = str(errors[0])
        assert "trainer.controller_timeout_s=2" in text and "waiting for batch 0" in text
        assert str(cfg.run_dir() / "checkpoints" / "step_2") in text
        assert "areal-py run --resume run.name=s" in text
    finally:
        to_ctrl.close()
        batches.close()
