"""The controller dying between the trainer's hello and its first answer (issue 20): the trainer, which heard the
controller before saying hello (it probes until answered), stops with ControllerLost within
trainer.controller_timeout_s, without the start-up grace; and a controller restarted in that window is taken as a
restart: the trainer, with no step trained since, says its hello again to the new one and trains its batch."""
from __future__ import annotations

import time
from types import SimpleNamespace

import zmq
from conftest import net_overrides, on_thread

from areal_py.config import load_config
from areal_py.wire import protocol as P
from areal_py.wire.trainer_link import bind_trainer, connect_trainer
from areal_py.wire.transport import ControllerLost, recv, send, try_send

BATCH = P.Batch(version=0, state=P.ControllerState(), groups=[P.Group(
    gid=0, prompt_index=0, prompt_ids=[1], samples=[P.Sample(output_ids=[2], logprobs=[-1.0], versions=[0],
                                                            finish_reason="stop", reward=0.0)])])


class FakeController:
    """The controller's two trainer sockets, answering probes under `session` until the trainer's hello."""

    def __init__(self, cfg, session: str) -> None:
        self.session = session
        # a restarted one binds the ports its predecessor closed a moment ago: ZeroMQ releases a closed
        # listener asynchronously, so the first binds may find the port still taken (EADDRINUSE)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.from_trainer, self.to_trainer = bind_trainer(zmq.Context.instance(), cfg.net, send_timeout_s=5)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def until_hello(self) -> tuple[bytes, P.TrainerHello]:
        while True:
            sender, msg = recv(self.from_trainer, "test", timeout_s=30, waiting_for="the hello", routed=True)
            if isinstance(msg.body, P.TrainerHello):
                return sender, msg.body
            try_send(self.to_trainer, P.Ping(session=self.session), to=sender)

    def close(self) -> None:  # as a kill -9 leaves them
        self.from_trainer.close()
        self.to_trainer.close()


def fake_trainer(tmp_path, *overrides: str):
    from trainer.controller_link import ControllerLink
    from trainer.trainer import Trainer

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=s", *net_overrides(), "rollout.heartbeat_s=0.1",
                             "trainer.controller_timeout_s=1", "controller.startup_timeout_s=120", *overrides])
    to_ctrl, batches = connect_trainer(zmq.Context.instance(), cfg.net)
    me = SimpleNamespace(cfg=cfg, link=ControllerLink(cfg, to_ctrl, batches), version=0, hello_version=-1,
                         resume_state=None, resume_buffer=None)
    me.hello = lambda: Trainer.hello(me)  # what rejoin calls
    return cfg, me


def test_a_controller_dying_right_after_the_hello_is_noticed_within_the_bound(tmp_path):
    from trainer.trainer import Trainer

    cfg, me = fake_trainer(tmp_path)
    ctrl = FakeController(cfg, "a")
    errors: list[BaseException] = []

    def trainer() -> None:
        Trainer.hello(me)
        me.link.next_batch(me.version)

    try:
        t = on_thread(trainer, errors)
        _, hello = ctrl.until_hello()
        assert hello.version == 0 and me.link.controller_session == "a"
        ctrl.close()  # dies before answering anything after the hello
        t.join(30)  # the start-up grace (120 s) would still be running
        assert not t.is_alive(), "the trainer still waits for a controller that died after its hello"
        assert len(errors) == 1 and isinstance(errors[0], ControllerLost), errors
        assert "trainer.controller_timeout_s=1" in str(errors[0]) and "waiting for batch 0" in str(errors[0])
    finally:
        me.link.to_ctrl.close()
        me.link.batches.close()


def test_a_controller_restarted_right_after_the_hello_gets_the_hello_again(tmp_path):
    from trainer.controller_link import ControllerRestarted
    from trainer.trainer import Trainer

    cfg, me = fake_trainer(tmp_path, "trainer.controller_timeout_s=30")
    first = FakeController(cfg, "a")
    got: list[P.Batch] = []
    errors: list[BaseException] = []

    def trainer() -> None:
        Trainer.hello(me)
        while True:
            try:
                got.append(me.link.next_batch(me.version)[0])
                return
            except ControllerRestarted as e:
                Trainer.rejoin(me, e.session)

    second = None
    try:
        t = on_thread(trainer, errors)
        first.until_hello()
        first.close()  # the hello went to a controller that died at once
        second = FakeController(cfg, "b")
        trainer_id, hello = second.until_hello()  # answered a probe under "b": a restart, so the hello again
        assert hello == P.TrainerHello(version=0) and me.link.controller_session == "b"
        send(second.to_trainer, BATCH, to=trainer_id)
        t.join(30)
        assert not t.is_alive() and not errors, errors
        assert got == [BATCH]
    finally:
        if second is not None:
            second.close()
        me.link.to_ctrl.close()
        me.link.batches.close()
