"""The controller against hostile or broken peers (issue 20): each forged message is rejected and counted
by reason and the controller keeps going; only the trainer ends the run or gets batches; a server that
does not load new weights in time is evicted and its work re-dispatched."""
from __future__ import annotations

import math
import time

import pytest
import torch
import zmq
from conftest import net_overrides

from areal_py.config import load_config
from areal_py.models import build_char_tokenizer
from areal_py.tasks.arith import ArithTask
from areal_py.telemetry.metrics import rejected_count
from areal_py.wire import protocol as P
from areal_py.wire.trainer_link import connect_trainer
from areal_py.wire.transport import make_socket, recv, send
from controller.controller import Controller

N = 2  # group size


@pytest.fixture
def setup(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=m", *net_overrides(), "run.dashboard_port=0",
                             "controller.batch_size=2", f"controller.group_size={N}", "rollout.max_new_tokens=8",
                             "controller.weight_sync_timeout_s=0.5", "trainer.total_steps=5",
                             "controller.max_concurrent=1"])  # one group in flight: the one each test follows
    ctx = zmq.Context.instance()
    ctrl = Controller(cfg, task=ArithTask(), tokenizer=build_char_tokenizer())
    to_ctrl, batches = connect_trainer(ctx, cfg.net)
    socks = [to_ctrl, batches]

    def dealer(name: str, port: int) -> zmq.Socket:
        s = make_socket(ctx, zmq.DEALER, cfg.net.addr(port), bind=False, identity=name)
        socks.append(s)
        return s

    send(to_ctrl, P.TrainerHello(version=0))
    ctrl.start()
    try:
        yield cfg, ctrl, to_ctrl, batches, dealer
    finally:
        ctrl.close()
        for s in socks:
            s.close()


def step_until(ctrl: Controller, cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        ctrl.step(20)
    assert cond()


def work(sock: zmq.Socket, timeout_s: float = 5.0) -> P.Generate:
    while True:
        _, msg = recv(sock, "test", timeout_s=timeout_s, waiting_for="work")
        if isinstance(msg.body, P.Generate):
            return msg.body


def answer(sock, g: P.Generate, *, attempt: int | None = None, **over) -> None:
    for idx in range(g.n):
        body = dict(gid=g.gid, attempt=g.attempt if attempt is None else attempt, idx=idx, output_ids=[5, 6],
                    logprobs=[-0.5, -0.25], versions=[0, 0], finish_reason="stop")
        send(sock, P.Result(**{**body, **over}))


def test_forged_results_are_rejected_and_the_run_goes_on(setup):
    cfg, ctrl, _, _, dealer = setup
    a = dealer("a", cfg.net.rollout_port)
    send(a, P.Hello(server_id="a", version=0))
    step_until(ctrl, lambda: a.poll(0))
    g = work(a)
    # the cases: an absurd version, a NaN logprob, an id past the vocabulary, from the server that holds it
    for over, why in [({"versions": [0, 1_000_000]}, "bad_version"), ({"logprobs": [-0.5, math.nan]},
                      "nonfinite_logprob"), ({"output_ids": [5, 10_000]}, "bad_token")]:
        before = rejected_count("controller", why)
        answer(a, g, **over)
        step_until(ctrl, lambda why=why, before=before, n=g.n: rejected_count("controller", why) - before == n)
        g2 = work(a)  # the group comes back under a new attempt (a is the only server), nothing kept from it
        assert (g2.gid, g2.attempt) == (g.gid, g.attempt + 1)
        g = g2
    assert not ctrl.rollouts.ready and not ctrl.rollouts.scoring  # nothing of the bad answers kept
    # results for gids nobody asked for, from an id that never said hello: never a member
    before = rejected_count("controller", "unknown_server")
    ghost = dealer("ghost", cfg.net.rollout_port)
    for gid in range(13):
        send(ghost, P.Result(gid=1000 + gid, attempt=0, idx=0, output_ids=[5], logprobs=[-1.0], versions=[0],
                             finish_reason="stop"))
    send(ghost, P.WeightsLoaded(server_id="ghost", version=0, seconds=0.1))
    step_until(ctrl, lambda: rejected_count("controller", "unknown_server") - before == 14)
    assert "ghost" not in ctrl.registry.servers
    # a hello claiming a version nobody published does not register either
    before = rejected_count("controller", "bad_version")
    send(dealer("liar", cfg.net.rollout_port), P.Hello(server_id="liar", version=1_000_000))
    step_until(ctrl, lambda: rejected_count("controller", "bad_version") - before == 1)
    assert "liar" not in ctrl.registry.servers
    # a good answer is taken: the group is scored and ready
    answer(a, g)
    step_until(ctrl, lambda: len(ctrl.rollouts.ready) == 1)
    assert [s.versions for s in ctrl.rollouts.ready[0].samples] == [[0, 0]] * N


def test_only_the_trainer_ends_the_run_and_gets_batches(setup):
    cfg, ctrl, to_ctrl, batches, dealer = setup
    rogue = dealer("trainer-0000000000000000", cfg.net.trainer_port)
    rogue_batches = dealer("trainer-0000000000000000", cfg.net.batch_port)
    before = rejected_count("controller", "not_trainer")
    send(rogue, P.TrainerDone(version=0))
    send(rogue, P.WeightsReady(version=1, path=None), {"w": torch.zeros(2)})
    step_until(ctrl, lambda: rejected_count("controller", "not_trainer") - before == 2)
    assert not ctrl.trainer_done and ctrl.weights.latest is None
    sample = P.Sample(output_ids=[5], logprobs=[-1.0], versions=[0], finish_reason="stop", reward=1.0)
    group = P.Group(gid=0, prompt_index=0, prompt_ids=[1], samples=[sample] * N)
    ctrl.rollouts.ready.extend([group.model_copy(update={"gid": i}) for i in range(4)])
    ctrl.counts.accepted = 4
    ctrl.assemble_batches()  # batches 0 and 1, two groups each; a rogue connected under a trainer-like id
    got = []
    while batches.poll(2000):
        got.append(recv(batches, "test", timeout_s=1, waiting_for="batch")[1].body.version)
        if len(got) == 2:
            break
    assert got == [0, 1] and not rogue_batches.poll(200)
    send(to_ctrl, P.TrainerDone(version=2))
    step_until(ctrl, lambda: ctrl.trainer_done)


def test_a_server_that_does_not_load_new_weights_is_evicted_and_its_work_moves(setup):
    cfg, ctrl, to_ctrl, _, dealer = setup
    a, b = dealer("a", cfg.net.rollout_port), dealer("b", cfg.net.rollout_port)
    send(a, P.Hello(server_id="a", version=0))
    step_until(ctrl, lambda: a.poll(0))
    held = work(a)  # a holds this group
    send(b, P.Hello(server_id="b", version=0))
    step_until(ctrl, lambda: "b" in ctrl.registry.servers)
    send(to_ctrl, P.WeightsReady(version=1, path=None), {"w": torch.zeros(2)})
    step_until(ctrl, lambda: ctrl.weights.latest is not None)
    send(b, P.WeightsLoaded(server_id="b", version=1, seconds=0.1))  # b loads; a keeps beating at version 0
    moved = {}
    deadline = time.monotonic() + 5
    while held.gid not in moved and time.monotonic() < deadline:
        send(a, P.Heartbeat(server_id="a", version=0, running=1, waiting=0, generated_tokens=0))
        send(b, P.Heartbeat(server_id="b", version=1, running=0, waiting=0, generated_tokens=0))
        ctrl.step(20)
        while b.poll(0):
            _, msg = recv(b, "test", timeout_s=1, waiting_for="work")
            if isinstance(msg.body, P.Generate):
                moved[msg.body.gid] = msg.body
    sa = ctrl.registry.servers["a"]
    assert not sa.alive and sa.evicted_until == 1 and not sa.inflight
    assert moved[held.gid].attempt == held.attempt + 1  # re-dispatched to b, not waited for
    assert ctrl.rollouts.version == 1  # admission counts on b alone now
    send(a, P.WeightsLoaded(server_id="a", version=1, seconds=9.0))  # a catches up: it rejoins
    step_until(ctrl, lambda: sa.alive)
