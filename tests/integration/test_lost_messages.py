"""A Generate lost on the way (issue 20): the controller re-dispatches the group once its attempt has shown no
sign of life for controller.group_timeout_s, a late result of the lost attempt is rejected, and the group is
trained once. Fake servers and a fake trainer speak the wire protocol to a real controller."""
from __future__ import annotations

import time

import pytest
import zmq
from conftest import net_overrides
from prometheus_client import REGISTRY

from areal_py.config import load_config
from areal_py.models import build_char_tokenizer
from areal_py.tasks.arith import ArithTask
from areal_py.telemetry.metrics import rejected_count
from areal_py.wire import protocol as P
from areal_py.wire.trainer_link import bind_trainer, connect_trainer
from areal_py.wire.transport import make_socket, parse, send, try_send
from controller.controller import Controller


def redispatched(reason: str) -> float:
    return REGISTRY.get_sample_value("areal_controller_redispatched_groups_total", {"reason": reason}) or 0.0


def beat(sock: zmq.Socket, server_id: str, held: list[tuple[int, int]]) -> None:
    send(sock, P.Heartbeat(server_id=server_id, version=0, running=0, waiting=0, generated_tokens=0, held=held))


def result(gid: int, attempt: int, idx: int) -> P.Result:
    return P.Result(gid=gid, attempt=attempt, idx=idx, output_ids=[2], logprobs=[-0.5], versions=[0],
                    finish_reason="stop")


def generates(sock: zmq.Socket) -> list[P.Generate]:
    out = []
    while sock.poll(0):
        _, msg = parse(sock.recv_multipart(copy=False), "test")
        if msg is not None and isinstance(msg.body, P.Generate):
            out.append(msg.body)
    return out


@pytest.fixture
def ctx():
    return zmq.Context.instance()


def test_a_swallowed_generate_is_redispatched_after_the_timeout_and_trained_once(tmp_path, ctx):
    # one group in flight at a time (max_staleness 0, batch of 1), two samples, one step
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=s", *net_overrides(), "controller.batch_size=1",
                             "controller.group_size=2", "controller.max_staleness=0", "trainer.total_steps=1",
                             "controller.group_timeout_s=1", "controller.server_timeout_s=30"])
    ctrl = Controller(cfg, task=ArithTask(), tokenizer=build_char_tokenizer())
    to_ctrl, batches = connect_trainer(ctx, cfg.net)
    servers = {n: make_socket(ctx, zmq.DEALER, cfg.net.addr(cfg.net.rollout_port), bind=False, identity=n)
               for n in ("a", "b")}
    timeouts = redispatched("timeout")
    try:
        send(to_ctrl, P.TrainerHello(version=0))
        ctrl.start()
        send(servers["a"], P.Hello(server_id="a", version=0))  # a joins first: least loaded, it gets the group
        for _ in range(20):
            ctrl.step(10)
        send(servers["b"], P.Hello(server_id="b", version=0))
        got: dict[str, list[P.Generate]] = {"a": [], "b": []}

        def run(seconds: float, held_by_a: list[tuple[int, int]]) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                beat(servers["a"], "a", held_by_a)
                beat(servers["b"], "b", [(g.gid, g.attempt) for g in got["b"]])  # b holds what it got
                for _ in range(10):
                    ctrl.step(10)
                for n, s in servers.items():
                    got[n].extend(generates(s))

        run(0.5, [])
        assert [(g.gid, g.attempt) for g in got["a"]] == [(0, 0)] and got["b"] == []
        # a says it holds the attempt: twice the timeout passes, the group stays on a
        run(2.0, [(0, 0)])
        assert got["b"] == [] and redispatched("timeout") == timeouts
        # a no longer holds it (it swallowed the Generate): past the timeout the group goes to b as attempt 1
        run(2.0, [])
        assert [(g.gid, g.attempt, g.n) for g in got["b"]] == [(0, 1, 2)] and len(got["a"]) == 1
        assert redispatched("timeout") - timeouts == 1
        assert ctrl.counts.running == 1 and ctrl.counts.next_gid == 1  # moved, not re-admitted
        stale = rejected_count("controller", "stale_result")
        send(servers["a"], result(0, 0, 0))  # the lost attempt's late answer
        for idx in range(2):
            send(servers["b"], result(0, 1, idx))
        batch = None
        end = time.monotonic() + 10
        while batch is None and time.monotonic() < end:
            ctrl.step(10)
            if batches.poll(0):
                _, msg = parse(batches.recv_multipart(copy=False), "test")
                if msg is not None and isinstance(msg.body, P.Batch):
                    batch = msg.body
        assert rejected_count("controller", "stale_result") - stale == 1
        assert batch is not None and batch.version == 0
        assert [g.gid for g in batch.groups] == [0] and len(batch.groups[0].samples) == 2
        assert ctrl.counts.running == 0 and not ctrl.rollouts.inflight and not ctrl.rollouts.clocks.clocks
    finally:
        ctrl.close()
        for s in (to_ctrl, batches, *servers.values()):
            s.close()


def test_a_batch_that_overtakes_the_one_before_it_is_kept_for_its_turn(tmp_path, ctx):
    """The controller sends each batch once, so a reordering link must not cost the trainer one: a batch for a
    later version within max_staleness waits for its turn; a copy of it, or one further ahead, is rejected."""
    from trainer.controller_link import ControllerLink

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=s", *net_overrides(), "controller.max_staleness=2",
                             "rollout.heartbeat_s=0.1"])
    from_trainer, to_trainer = bind_trainer(ctx, cfg.net, send_timeout_s=5)
    to_ctrl, batches = connect_trainer(ctx, cfg.net, identity="trainer-x")
    me = ControllerLink(cfg, to_ctrl, batches)

    def batch(v: int, gid: int) -> P.Batch:
        return P.Batch(version=v, state=P.ControllerState(), groups=[P.Group(
            gid=gid, prompt_index=gid, prompt_ids=[1], samples=[P.Sample(
                output_ids=[2], logprobs=[-1.0], versions=[0], finish_reason="stop", reward=0.0)])])

    try:
        end = time.monotonic() + 10
        while not try_send(to_trainer, P.Ping(session="s"), to=b"trainer-x"):  # the batch link is up
            assert time.monotonic() < end, "the batch link never came up"
            time.sleep(0.05)
        rejected = rejected_count("trainer", "unexpected_type")
        for b in (batch(1, 11), batch(1, 99), batch(3, 33), batch(0, 10)):  # 1 overtook 0; its copy; 3 too far
            send(to_trainer, b, to=b"trainer-x")
        assert me.next_batch(0)[0] == batch(0, 10)
        assert me.next_batch(1)[0] == batch(1, 11)  # kept, the first copy
        assert rejected_count("trainer", "unexpected_type") - rejected == 2 and me.ahead == {}
    finally:
        for s in (from_trainer, to_trainer, to_ctrl, batches):
            s.close()
