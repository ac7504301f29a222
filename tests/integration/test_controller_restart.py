"""Reconnecting to a restarted controller: a controller dies mid-run (its sockets gone, no word to anyone, as a
kill -9 leaves them) and a new one starts on the same ports, as `areal-py serve controller --resume` does. The
running trainer hears a new session in the answer to its probe, rolls back to its latest checkpoint in process
and says the hello of a resume; the running server hears it in a ping, drops its work for the dead controller
and says hello again. The run finishes, and every prompt taken is trained once or dropped with a reason.

In one process: real controllers, a real trainer and a real rollout server on the embedded model, each on a
thread of its own."""
from __future__ import annotations

import threading
import time

import torch
import zmq
from conftest import SMALL_RUN, net_overrides, on_thread

from areal_py.config import load_config
from areal_py.telemetry.ledger import read_run_ledger
from areal_py.telemetry.metrics import read_jsonl, rejected_count
from areal_py.wire import protocol as P
from controller.controller import Controller
from rollout_server.server import RolloutServer
from trainer.trainer import Trainer


def kill(ctrl: Controller) -> None:
    """What a kill -9 leaves of a controller: its sockets closed, no Shutdown sent to the servers."""
    ctrl.rewards.close()
    for sock in (ctrl.router, ctrl.pub, ctrl.from_trainer, ctrl.to_trainer):
        sock.close(linger=0)


def new_controller(cfg) -> Controller:
    """A controller on the dead one's ports, once the kernel has let them go."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return Controller(cfg)
        except (OSError, zmq.ZMQError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def steps_written(run_dir) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in read_jsonl(path)] if path.exists() else []


def test_trainer_and_server_rejoin_a_restarted_controller_and_the_ledger_holds(tmp_path, model_cache):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r", f"model.cache_dir={model_cache}", *SMALL_RUN,
                             *net_overrides(), "controller.batch_size=2", "controller.group_size=2",
                             "trainer.total_steps=8", "trainer.checkpoint_every=2", "weights.transfer=stream",
                             "reward.workers=0", "rollout.heartbeat_s=0.1", "rollout.max_new_tokens=8"])
    run_dir = cfg.run_dir()
    errors: list[BaseException] = []
    first = Controller(cfg)
    stop = threading.Event()

    def first_loop() -> None:
        first.start()
        while not stop.is_set():
            first.step()

    trainer = Trainer(cfg)
    server = RolloutServer(cfg, "rollout-0")
    loops = [on_thread(first_loop, errors), on_thread(trainer.serve, errors), on_thread(server.serve, errors)]
    deadline = time.monotonic() + 240
    while not (any(s >= 3 for s in steps_written(run_dir)) and (run_dir / "checkpoints" / "latest").is_file()):
        assert time.monotonic() < deadline and not errors, errors
        time.sleep(0.05)
    stop.set()
    loops[0].join(30)
    kill(first)  # past a checkpoint, with steps trained since it
    assert max(steps_written(run_dir)) < 8, "the run finished before the controller died"

    second = new_controller(cfg)  # as `areal-py serve controller --resume`: nothing read from disk
    loops.append(on_thread(second._serve, errors))
    for t in loops[1:]:
        t.join(240)
    assert not errors, errors
    assert not any(t.is_alive() for t in loops)

    # the trainer rolled back to its latest checkpoint, at or before the step it had reached, and rejoined
    assert trainer.link.controller_session == second.session != first.session
    resumed = second.counts.base_version
    assert resumed % 2 == 0 and resumed >= 2
    set_aside = [r["step"] for f in run_dir.glob("metrics.jsonl.dropped-*") for r in read_jsonl(f)]
    assert all(step > resumed for step in set_aside)  # the steps trained past it, trained again
    assert trainer.version == 8
    # the server rejoined by a hello
    assert server.session == second.session and "rollout-0" in second.registry.servers
    # every step once, every prompt taken trained once or dropped with a reason
    assert steps_written(run_dir) == list(range(1, 9))
    ledger = read_run_ledger(run_dir)
    assert ledger.problems() == []
    assert sum(ledger.trained.values()) == 8 * 2


def test_a_rejoining_server_ahead_of_the_restarted_controller_is_sent_its_weights(tmp_path):
    """A server whose weights came from steps the run rolled back (its version past the controller's
    newest) joins holding nothing usable: registered at version 0, sent the newest weights, no work before
    it loads them. A plain hello claiming such a version is still refused."""
    from areal_py.models import build_char_tokenizer
    from areal_py.tasks.arith import ArithTask
    from areal_py.wire.transport import make_socket, recv, send

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=s", *net_overrides(), "controller.batch_size=2",
                             "controller.group_size=2", "reward.workers=0"])
    ctrl = Controller(cfg, task=ArithTask(), tokenizer=build_char_tokenizer())
    ctx = zmq.Context.instance()
    srv = make_socket(ctx, zmq.DEALER, cfg.net.addr(cfg.net.rollout_port), bind=False, identity="rollout-3")
    try:
        ctrl.resume(P.TrainerHello(version=2))
        ctrl.weights.publish(P.WeightsReady(version=2, path=None), {"w": torch.zeros(2)})
        before = rejected_count("controller", "bad_version")
        send(srv, P.Hello(server_id="rollout-3", version=5))  # not a rejoin: an unpublished version, refused
        send(srv, P.Heartbeat(server_id="rollout-3", version=2, running=0, waiting=0, generated_tokens=0))
        deadline = time.monotonic() + 10
        while rejected_count("controller", "bad_version") == before and time.monotonic() < deadline:
            ctrl.step(20)
        ctrl.step(50)
        assert "rollout-3" not in ctrl.registry.servers  # a heartbeat never registers a server
        send(srv, P.Hello(server_id="rollout-3", version=5, rejoin=True))
        while "rollout-3" not in ctrl.registry.servers and time.monotonic() < deadline:
            ctrl.step(20)
        assert ctrl.registry.servers["rollout-3"].version == 0
        _, msg = recv(srv, "test", timeout_s=10, waiting_for="the newest weights")
        assert isinstance(msg.body, P.UpdateWeights) and msg.body.version == 2
        assert ctrl.rollouts.version is None  # no work before it runs version 2
    finally:
        ctrl.close()
        srv.close()


def test_a_server_drops_a_dead_controllers_work_and_rejoins_the_new_one(tmp_path):
    """Session A's group is in flight when session B speaks: the group is dropped without a result, the
    server says a rejoin hello, refuses what A sent afterwards (old_session), and loads B's weights although
    their version is older than its own."""
    from test_sockets import tiny_model

    from areal_py.wire.transport import make_socket, recv, send
    from areal_py.wire.weights import named_weights
    from rollout_server.torch_engine.engine import Engine

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=s", *net_overrides(), "controller.group_size=2"])
    ctx = zmq.Context.instance()
    router = make_socket(ctx, zmq.ROUTER, cfg.net.addr(cfg.net.rollout_port, bind=True), bind=True)
    server = RolloutServer(cfg, "srv", engine=Engine(tiny_model(0), eos_token_id=47, max_running=8))
    sampling = P.SamplingBody(max_new_tokens=64, temperature=1.0, top_p=1.0)
    weights = named_weights(tiny_model(1))
    try:
        recv(router, "test", timeout_s=10, waiting_for="hello", routed=True)
        send(router, P.UpdateWeights(version=5, session="a"), weights, to=b"srv")
        send(router, P.Generate(gid=1, attempt=0, prompt_ids=[1, 2], n=2, sampling=sampling, session="a"), to=b"srv")
        server.poll_once(5000)
        server.poll_once(1000)
        assert server.session == "a" and server.engine.version == 5 and server.held == {"1:0:0", "1:0:1"}
        assert recv(router, "test", timeout_s=10, waiting_for="the load report", routed=True)[1].type == "weights_loaded"
        send(router, P.Ping(session="b"), to=b"srv")
        server.poll_once(5000)
        assert server.held == set() and not server.engine.has_work()  # dropped, no result sent
        _, msg = recv(router, "test", timeout_s=10, waiting_for="the rejoin hello", routed=True)
        assert msg.body == P.Hello(server_id="srv", version=5, engine_path=server.engine_path, rejoin=True)
        before = rejected_count("rollout", "old_session")
        send(router, P.Generate(gid=2, attempt=0, prompt_ids=[1, 2], n=1, sampling=sampling, session="a"), to=b"srv")
        server.poll_once(5000)
        assert rejected_count("rollout", "old_session") == before + 1 and not server.engine.has_work()
        send(router, P.UpdateWeights(version=3, session="b"), weights, to=b"srv")  # the run rolled back to 3
        server.poll_once(5000)
        assert server.engine.version == 3
        _, msg = recv(router, "test", timeout_s=10, waiting_for="the load report", routed=True)
        assert msg.body.version == 3 and isinstance(msg.body, P.WeightsLoaded)
        assert not router.poll(200)  # nothing else: no result of the dropped group
    finally:
        server.close()
        router.close()
