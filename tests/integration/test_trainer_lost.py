"""A trainer killed under `areal-py serve` (issue 20): the controller, which no launcher watches, stops with
TrainerLost once the trainer has been silent past controller.trainer_timeout_s with its link down, and leaves the
rollout servers running to rejoin; a trainer silent but connected (a long step) is waited for."""
from __future__ import annotations

import time

import zmq
from conftest import net_overrides, on_thread

from areal_py.config import load_config
from areal_py.models import build_char_tokenizer
from areal_py.tasks.arith import ArithTask
from areal_py.wire import protocol as P
from areal_py.wire.trainer_link import connect_trainer
from areal_py.wire.transport import make_socket, parse, send
from controller.controller import Controller
from controller.trainer_watch import TrainerLost, TrainerWatch


def test_the_watch_asks_the_link_only_past_the_silence_bound_and_every_probe_interval():
    w = TrainerWatch(timeout_s=10, probe_s=1)
    asked = []

    def down() -> bool:
        asked.append(1)
        return False

    w.heard(5)
    assert not w.lost(15, down) and asked == []  # silent exactly the bound: not past it
    assert w.lost(15.5, down) and len(asked) == 1
    assert not w.lost(16, down) and len(asked) == 1  # the next probe is due at 16.5
    assert not w.lost(16.5, lambda: True)  # the link is up: a busy trainer, waited for
    w.heard(17)
    assert not w.lost(27, down) and len(asked) == 1


def test_a_dead_trainer_stops_the_controller_with_trainer_lost_and_the_servers_are_kept(tmp_path):
    ctx = zmq.Context.instance()
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=s", *net_overrides(), "run.dashboard_port=0",
                             "controller.batch_size=1", "controller.group_size=2", "controller.trainer_timeout_s=1",
                             "rollout.heartbeat_s=0.1", "controller.server_timeout_s=60"])
    ctrl = Controller(cfg, task=ArithTask(), tokenizer=build_char_tokenizer())
    to_ctrl, batches = connect_trainer(ctx, cfg.net)
    server = make_socket(ctx, zmq.DEALER, cfg.net.addr(cfg.net.rollout_port), bind=False, identity="a")
    errors: list[BaseException] = []
    try:
        send(to_ctrl, P.TrainerHello(version=0))
        send(server, P.Hello(server_id="a", version=0))
        loop = on_thread(ctrl.serve, errors)
        time.sleep(3)  # three times the bound: silent, but its link is up (a long step): waited for
        assert loop.is_alive() and not errors, errors
        to_ctrl.close()  # the trainer dies: the kernel closes its connections, as after a kill -9
        batches.close()
        loop.join(15)
        assert not loop.is_alive(), "the controller did not notice the dead trainer"
        assert len(errors) == 1 and isinstance(errors[0], TrainerLost), errors
        text = str(errors[0])
        assert "TrainerLost: no message from the trainer for" in text and "controller.trainer_timeout_s=1" in text
        assert str(tmp_path / "s" / "checkpoints") in text and "serve controller <config> --resume" in text
        got = []
        while server.poll(200):
            _, msg = parse(server.recv_multipart(copy=False), "test")
            got.append(msg.type)
        assert "shutdown" not in got and "generate" in got  # it was working, and is left to rejoin
    finally:
        for s in (to_ctrl, batches, server):
            s.close()
