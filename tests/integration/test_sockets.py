"""Each role's sockets, driven by a test playing its peer: malformed input is rejected, counted,
and the role keeps serving; a weight update interrupts in-flight generation at a step boundary."""
from __future__ import annotations

import threading
import time

import msgpack
import pytest
import torch
import zmq
from conftest import net_overrides
from tiny_models import tiny_model as _tiny_model
from transformers import LlamaForCausalLM

from areal_py.config import load_config
from areal_py.models import build_char_tokenizer
from areal_py.tasks.arith import ArithTask
from areal_py.telemetry.metrics import rejected_count
from areal_py.wire import protocol as P
from areal_py.wire.transport import make_socket, recv, send, try_send
from areal_py.wire.weights import named_weights
from controller.controller import Controller
from rollout_server.server import RolloutServer
from rollout_server.torch_engine.engine import Engine

GARBAGE = [[b"\x00\x01not msgpack"], [msgpack.packb({"type": "generate", "schema": 1, "body": {"gid": -1}})],
           [msgpack.packb({"type": "nope", "schema": 1, "body": {}})]]


def tiny_model(seed: int) -> LlamaForCausalLM:
    return _tiny_model(seed, vocab_size=48, max_positions=128).eval()


@pytest.fixture
def cfg(tmp_path):
    return load_config(None, [f"run.output_dir={tmp_path}", "run.name=s", *net_overrides(),
                              "controller.batch_size=2", "controller.group_size=2"])


@pytest.fixture
def ctx():
    return zmq.Context.instance()


def test_rollout_server_rejects_garbage_and_keeps_serving(cfg, ctx):
    router = make_socket(ctx, zmq.ROUTER, cfg.net.addr(cfg.net.rollout_port, bind=True), bind=True)
    pub = make_socket(ctx, zmq.PUB, cfg.net.addr(cfg.net.weights_port, bind=True), bind=True)
    server = RolloutServer(cfg, "srv", engine=Engine(tiny_model(0), eos_token_id=47, max_running=8))
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    try:
        sender, msg = recv(router, "test", timeout_s=10, waiting_for="hello", routed=True)
        assert msg.type == "hello" and sender == b"srv"
        time.sleep(0.3)  # PUB drops messages until the server's SUB subscription has arrived
        before = rejected_count("rollout")
        for frames in GARBAGE:
            router.send_multipart([b"srv", *frames])
        pub.send_multipart(GARBAGE[0])
        send(router, P.Hello(server_id="x", version=0), to=b"srv")  # valid, but not for a server
        send(router, P.Generate(gid=7, attempt=0, prompt_ids=[1, 2, 3], n=2,
                                sampling=P.SamplingBody(max_new_tokens=4, temperature=1.0, top_p=1.0)), to=b"srv")
        results = []
        while len(results) < 2:
            _, m = recv(router, "test", timeout_s=10, waiting_for="results", routed=True)
            if m.type == "result":
                results.append(m.body)
        assert sorted(r.idx for r in results) == [0, 1] and all(r.gid == 7 for r in results)
        assert rejected_count("rollout") - before == len(GARBAGE) + 2
    finally:
        server.running = False
        t.join(5)
        router.close()
        pub.close()


def test_server_reports_going_idle_before_the_results_that_idle_it(cfg, ctx):
    """The heartbeat that closes a busy span leaves before the group's last result, so the controller
    always has a batch's generation when the batch completes."""
    cfg.controller.group_size = 3  # a server takes at most a group's samples
    router = make_socket(ctx, zmq.ROUTER, cfg.net.addr(cfg.net.rollout_port, bind=True), bind=True)
    server = RolloutServer(cfg, "srv", engine=Engine(tiny_model(0), eos_token_id=10_000, max_running=8))
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    try:
        recv(router, "test", timeout_s=10, waiting_for="hello", routed=True)
        send(router, P.Generate(gid=3, attempt=0, prompt_ids=[1, 2, 3], n=3,
                                sampling=P.SamplingBody(max_new_tokens=6, temperature=1.0, top_p=1.0)), to=b"srv")
        seen: list[P.Heartbeat | P.Result] = []
        while sum(isinstance(b, P.Result) for b in seen) < 3:
            _, m = recv(router, "test", timeout_s=10, waiting_for="results", routed=True)
            seen.append(m.body)
    finally:
        server.running = False
        t.join(5)
        router.close()
    last = max(i for i, b in enumerate(seen) if isinstance(b, P.Result))
    beat = [b for b in seen[:last] if isinstance(b, P.Heartbeat)][-1]
    assert beat.running == 0 and beat.waiting == 0 and beat.spans, seen
    assert beat.spans[-1][1] == beat.at and beat.started <= beat.spans[0][0]  # the span closed when it went idle
    assert beat.max_running == 8 and beat.busy_s > 0
    assert 0 < beat.slot_seconds <= 3 * beat.busy_s  # three requests at most held a slot while busy


def test_interruption_through_the_wire(cfg, ctx):
    """Tokens before the swap carry version 0, after it version 1, and their behaviour logprobs
    equal a fresh forward pass of the new weights over the whole trajectory."""
    router = make_socket(ctx, zmq.ROUTER, cfg.net.addr(cfg.net.rollout_port, bind=True), bind=True)
    pub = make_socket(ctx, zmq.PUB, cfg.net.addr(cfg.net.weights_port, bind=True), bind=True)
    old, new = tiny_model(0), tiny_model(1)
    server = RolloutServer(cfg, "srv", engine=Engine(old, eos_token_id=10_000, max_running=8))
    try:
        recv(router, "test", timeout_s=10, waiting_for="hello", routed=True)
        time.sleep(0.3)  # let the SUB subscription reach the PUB before the broadcast
        send(router, P.Generate(gid=1, attempt=0, prompt_ids=[3, 4, 5], n=2,
                                sampling=P.SamplingBody(max_new_tokens=12, temperature=1.0, top_p=1.0)), to=b"srv")
        server.poll_once(2000)
        for _ in range(4):  # four decode steps under version 0
            assert not server.engine.step()
        send(pub, P.UpdateWeights(version=1), named_weights(new))
        server.poll_once(2000)  # the swap happens here, between two steps
        assert server.engine.version == 1
        finished = []
        while server.engine.has_work():
            finished += server.engine.step()
    finally:
        server.close()
        router.close()
        pub.close()
    spanning = [f for f in finished if 0 in f.versions and 1 in f.versions]
    assert spanning, [f.versions for f in finished]
    for f in spanning:
        ids = torch.tensor([f.prompt_ids + f.output_ids])
        with torch.no_grad():
            lp = torch.log_softmax(new(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        p = len(f.prompt_ids)
        for i, (v, got) in enumerate(zip(f.versions, f.logprobs)):
            if v == 1:
                assert abs(got - float(lp[p - 1 + i])) < 1e-4


def test_controller_rejects_garbage_on_both_sockets(cfg, ctx):
    ctrl = Controller(cfg, task=ArithTask(), tokenizer=build_char_tokenizer())
    dealer = make_socket(ctx, zmq.DEALER, cfg.net.addr(cfg.net.rollout_port), bind=False, identity="srv")
    push = make_socket(ctx, zmq.DEALER, cfg.net.addr(cfg.net.trainer_port), bind=False, identity="trainer")
    try:
        send(push, P.TrainerHello(version=0))
        ctrl.start()
        before = rejected_count("controller")
        for frames in GARBAGE:
            dealer.send_multipart(frames)
            push.send_multipart(frames)
        send(dealer, P.Batch(version=0, groups=[P.Group(gid=0, prompt_index=0, prompt_ids=[1], samples=[
            P.Sample(output_ids=[], logprobs=[], versions=[], finish_reason="stop", reward=0.0)])], state={}))
        send(dealer, P.Hello(server_id="srv", version=0))
        deadline = time.monotonic() + 10
        while rejected_count("controller") - before < 2 * len(GARBAGE) + 1 and time.monotonic() < deadline:
            ctrl.step(50)
        assert rejected_count("controller") - before == 2 * len(GARBAGE) + 1
        assert "srv" in ctrl.registry.servers  # still serving: the valid hello registered the server
        _, msg = recv(dealer, "test", timeout_s=10, waiting_for="work from the controller")
        assert msg.type == "generate"  # and it admits and dispatches work to it
    finally:
        ctrl.close()
        dealer.close()
        push.close()


def next_not_ping(sock: zmq.Socket, what: str) -> P.Message:
    while True:
        _, msg = recv(sock, "test", timeout_s=60, waiting_for=what, routed=True)
        if msg.type != "ping":
            return msg


def test_trainer_rejects_garbage_and_trains(tmp_path, model_cache, ctx):
    from trainer.trainer import Trainer

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=s", *net_overrides(), f"model.cache_dir={model_cache}",
                             "trainer.total_steps=1", "weights.transfer=stream"])
    pull = make_socket(ctx, zmq.ROUTER, cfg.net.addr(cfg.net.trainer_port, bind=True), bind=True)
    push = make_socket(ctx, zmq.ROUTER, cfg.net.addr(cfg.net.batch_port, bind=True), bind=True)
    push.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a batch to an unconnected trainer fails here, not silently
    trainer = Trainer(cfg)
    ids = trainer.tokenizer("3+4=").input_ids
    out = trainer.tokenizer("7", add_special_tokens=False).input_ids + [trainer.tokenizer.eos_token_id]
    group = P.Group(gid=0, prompt_index=0, prompt_ids=ids, samples=[
        P.Sample(output_ids=out, logprobs=[-1.0] * len(out), versions=[0] * len(out), finish_reason="stop", reward=r)
        for r in (1.0, 0.0)])
    t = threading.Thread(target=trainer.serve, daemon=True)
    t.start()
    try:
        while True:  # the trainer probes until the controller answers, then says hello
            trainer_id, hello = recv(pull, "test", timeout_s=30, waiting_for="trainer hello", routed=True)
            if hello.type != "ping":
                break
            try_send(push, P.Ping(session="fake"), to=trainer_id)
        assert hello.body == P.TrainerHello(version=0, resume_state=None)
        assert trainer_id.startswith(b"trainer-")  # its batch link has the same routing id
        before = rejected_count("trainer")
        for frames in GARBAGE:
            push.send_multipart([trainer_id, *frames])
        send(push, P.Batch(version=5, groups=[group], state={}), to=trainer_id)  # valid message, wrong version
        send(push, P.Batch(version=0, groups=[group], state={"data_position": 1}), to=trainer_id)
        w = next_not_ping(pull, "new weights")  # pings: the waiting trainer's probes, unanswered here
        assert w.type == "weights_ready" and w.body.version == 1 and w.tensors
        done = next_not_ping(pull, "trainer done")
        assert done.type == "trainer_done"
        assert rejected_count("trainer") - before == len(GARBAGE) + 1
        t.join(10)
        assert not t.is_alive()
    finally:
        pull.close()
        push.close()


def test_dead_server_work_is_redispatched_and_never_counted_twice(cfg, ctx):
    cfg.controller.server_timeout_s = 0.5
    ctrl = Controller(cfg, task=ArithTask(), tokenizer=build_char_tokenizer())
    push = make_socket(ctx, zmq.DEALER, cfg.net.addr(cfg.net.trainer_port), bind=False, identity="trainer")
    a = make_socket(ctx, zmq.DEALER, cfg.net.addr(cfg.net.rollout_port), bind=False, identity="a")
    b = None
    try:
        send(push, P.TrainerHello(version=0))
        ctrl.start()
        send(a, P.Hello(server_id="a", version=0))
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:  # capacity (0+2+1)*2 = 6; take two groups
            ctrl.step(20)
            if a.poll(0):
                got.append(recv(a, "test", timeout_s=1, waiting_for="work")[1].body)
        assert ctrl.counts.running == 6 and ctrl.counts.accepted == 0
        first = got[0]
        # server a answers one sample of its first group, then dies
        send(a, P.Result(gid=first.gid, attempt=0, idx=0, output_ids=[2], logprobs=[-0.5], versions=[0],
                         finish_reason="stop"))
        b = make_socket(ctx, zmq.DEALER, cfg.net.addr(cfg.net.rollout_port), bind=False, identity="b")
        send(b, P.Hello(server_id="b", version=0))  # only a hello registers a server
        end = time.monotonic() + 3
        redispatched = {}
        while time.monotonic() < end:  # b keeps beating, a stays silent past the timeout
            send(b, P.Heartbeat(server_id="b", version=0, running=0, waiting=0, generated_tokens=0))
            ctrl.step(20)
            while b.poll(0):
                g = recv(b, "test", timeout_s=1, waiting_for="work")[1].body
                redispatched[g.gid] = g
        assert not ctrl.registry.servers["a"].alive
        assert first.gid in redispatched and redispatched[first.gid].attempt == 1
        assert ctrl.counts.running == 6  # moved, not re-admitted
        before = rejected_count("controller", "stale_result")
        # a's late answer for the old attempt is ignored
        send(a, P.Result(gid=first.gid, attempt=0, idx=1, output_ids=[2], logprobs=[-0.5], versions=[0],
                         finish_reason="stop"))
        for idx in range(cfg.controller.group_size):  # b completes the group
            send(b, P.Result(gid=first.gid, attempt=1, idx=idx, output_ids=[2], logprobs=[-0.5], versions=[0],
                             finish_reason="stop"))
        end = time.monotonic() + 5
        while ctrl.counts.accepted + len(ctrl.rollouts.ready) < 2 and time.monotonic() < end:
            ctrl.step(20)
        assert rejected_count("controller", "stale_result") - before == 1
        assert ctrl.counts.accepted == 1 and len(ctrl.rollouts.ready) == 1 and ctrl.counts.running == 5
        assert [s.output_ids for s in ctrl.rollouts.ready[0].samples] == [[2], [2]]
    finally:
        ctrl.close()
        for s in (push, a, b):
            if s is not None:
                s.close()


def test_server_aborts_sequences_too_stale_for_any_batch(cfg, ctx):
    """An update saying "tokens older than version 1 are useless" stops the in-flight group (started at
    version 0) and returns it as `stale`; a fresh group started after the update keeps going."""
    router = make_socket(ctx, zmq.ROUTER, cfg.net.addr(cfg.net.rollout_port, bind=True), bind=True)
    pub = make_socket(ctx, zmq.PUB, cfg.net.addr(cfg.net.weights_port, bind=True), bind=True)
    server = RolloutServer(cfg, "srv", engine=Engine(tiny_model(0), eos_token_id=10_000, max_running=8,
                                                     interrupt_mode="keep"))
    sampling = P.SamplingBody(max_new_tokens=40, temperature=1.0, top_p=1.0)
    try:
        recv(router, "test", timeout_s=10, waiting_for="hello", routed=True)
        time.sleep(0.3)  # let the SUB subscription reach the PUB before the broadcast
        send(router, P.Generate(gid=1, attempt=0, prompt_ids=[3, 4, 5], n=2, sampling=sampling), to=b"srv")
        server.poll_once(2000)
        for _ in range(3):
            assert not server.engine.step()
        send(pub, P.UpdateWeights(version=1, min_token_version=1), named_weights(tiny_model(1)))
        server.poll_once(2000)
        assert server.engine.version == 1 and server.engine.num_running == 0
        results = []
        while len(results) < 2:
            _, msg = recv(router, "test", timeout_s=5, waiting_for="stale results", routed=True)
            if isinstance(msg.body, P.Result):
                results.append(msg.body)
        assert {r.finish_reason for r in results} == {"stale"} and all(r.versions[0] == 0 for r in results)
        send(router, P.Generate(gid=2, attempt=0, prompt_ids=[3, 4], n=1, sampling=sampling), to=b"srv")
        server.poll_once(2000)
        server.engine.step()
        assert server.engine.requests_older_than(1) == [] and server.engine.num_running == 1
    finally:
        server.close()
        router.close()
        pub.close()


def test_controller_counts_stale_aborts_and_tells_servers_the_floor(cfg, ctx):
    ctrl = Controller(cfg, task=ArithTask(), tokenizer=build_char_tokenizer())
    push = make_socket(ctx, zmq.DEALER, cfg.net.addr(cfg.net.trainer_port), bind=False, identity="trainer")
    a = make_socket(ctx, zmq.DEALER, cfg.net.addr(cfg.net.rollout_port), bind=False, identity="a")
    try:
        send(push, P.TrainerHello(version=0))
        ctrl.start()
        send(a, P.Hello(server_id="a", version=0))
        work = None
        deadline = time.monotonic() + 10
        while work is None and time.monotonic() < deadline:
            ctrl.step(20)
            if a.poll(0):
                work = recv(a, "test", timeout_s=1, waiting_for="work")[1].body
        running, admitted = ctrl.counts.running, ctrl.counts.next_gid
        for idx in range(cfg.controller.group_size):
            send(a, P.Result(gid=work.gid, attempt=0, idx=idx, output_ids=[2, 3], logprobs=[-0.5, -0.5],
                             versions=[0, 0], finish_reason="stale"))
        end = time.monotonic() + 5
        while ctrl.counts.dropped_stale == 0 and time.monotonic() < end:
            ctrl.step(20)
        # the doomed group leaves `running`, and the capacity it held admits a fresh prompt at once
        assert ctrl.counts.dropped_stale == 1 and ctrl.counts.accepted == 0
        assert ctrl.counts.running == running and ctrl.counts.next_gid == admitted + 1
        ctrl.counts.next_batch_version = 5  # five batches assembled: with max_staleness 2, tokens < 3 are doomed
        assert ctrl.weights.update_message(5, None).min_token_version == 3
        ctrl.counts.next_batch_version = 1
        assert ctrl.weights.update_message(1, None).min_token_version == 0
        ctrl.weights.max_token_staleness = 4  # a raised hard limit moves the floor, not the admission bound
        ctrl.counts.next_batch_version = 5
        assert ctrl.weights.update_message(5, None).min_token_version == 1
    finally:
        ctrl.close()
        push.close()
        a.close()


def test_batches_take_the_oldest_groups_first(cfg, monkeypatch):
    """A long response finishes late but old: it must get the next batch before fresh short ones, or it
    would miss its last admissible batch (max_staleness 2 here) and be wasted."""
    import controller.controller as ctrl_mod
    from controller import trainer_side

    ctrl = Controller(cfg, task=ArithTask(), tokenizer=build_char_tokenizer())
    sent = []
    for mod in (ctrl_mod, trainer_side):  # the rollout side sends from one, the batches go from the other
        monkeypatch.setattr(mod, "send", lambda sock, body, *a, **k: sent.append(body))
    try:
        def group(gid: int, version: int) -> P.Group:
            s = P.Sample(output_ids=[2], logprobs=[-0.1], versions=[version], finish_reason="stop", reward=1.0)
            return P.Group(gid=gid, prompt_index=gid, prompt_ids=[1, 2], samples=[s, s])

        ctrl.counts.next_batch_version = 3
        ctrl.rollouts.ready.extend([group(1, 3), group(2, 1), group(3, 2)])  # completion order: fresh one first
        ctrl.counts.accepted = 3
        ctrl.assemble_batches()
        assert [g.gid for g in sent[0].groups] == [2, 3] and sent[0].version == 3
        assert [g.gid for g in ctrl.rollouts.ready] == [1] and ctrl.counts.dropped_stale == 0
    finally:
        ctrl.close()


def test_a_raised_token_limit_keeps_long_responses_and_drops_only_past_it(tmp_path, monkeypatch):
    """max_staleness 1 admits; max_token_staleness 3 decides what is dropped at batching."""
    import controller.controller as ctrl_mod
    from controller import trainer_side

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=s", *net_overrides(), "controller.batch_size=2",
                             "controller.group_size=2", "controller.max_staleness=1",
                             "controller.max_token_staleness=3"])
    ctrl = Controller(cfg, task=ArithTask(), tokenizer=build_char_tokenizer())
    sent = []
    for mod in (ctrl_mod, trainer_side):  # the rollout side sends from one, the batches go from the other
        monkeypatch.setattr(mod, "send", lambda sock, body, *a, **k: sent.append(body))
    try:
        def group(gid: int, versions: list[int]) -> P.Group:
            s = P.Sample(output_ids=[2] * len(versions), logprobs=[-0.1] * len(versions), versions=versions,
                         finish_reason="stop", reward=1.0)
            return P.Group(gid=gid, prompt_index=gid, prompt_ids=[1, 2], samples=[s, s])

        ctrl.counts.next_batch_version = 5
        # ages at batch 5: 4 (spans versions 1..5: too old even for the raised limit), 3 (kept: over
        # max_staleness, within max_token_staleness), 0 and 1
        ctrl.rollouts.ready.extend([group(1, [5]), group(2, [1, 3, 5]), group(3, [2, 4, 5]), group(4, [4])])
        ctrl.counts.accepted = 4
        ctrl.assemble_batches()
        assert [g.gid for g in sent[0].groups] == [3, 4] and sent[0].version == 5
        assert ctrl.counts.dropped_stale == 1 and ctrl.counts.accepted == 3
        assert [g.gid for g in ctrl.rollouts.ready] == [1]
    finally:
        ctrl.close()


def test_scored_reward_counts_what_dynamic_sampling_drops(tmp_path, monkeypatch):
    """DAPO trains only mixed groups, so the batch reward is biased toward 0.5; the batch also carries the
    mean reward of everything scored since the previous batch: here groups [1, 1] (dropped) and [0, 1]."""
    import controller.controller as ctrl_mod
    from controller import trainer_side
    from controller.rollouts import InflightGroup

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=s", *net_overrides(), "controller.batch_size=1",
                             "controller.group_size=2", "controller.dynamic_sampling=true"])
    ctrl = Controller(cfg, task=ArithTask(), tokenizer=build_char_tokenizer())
    sent = []
    for mod in (ctrl_mod, trainer_side):  # the rollout side sends from one, the batches go from the other
        monkeypatch.setattr(mod, "send", lambda sock, body, *a, **k: sent.append(body))

    class Done:
        def __init__(self, rewards: list[float]) -> None:
            self.rewards = rewards

        def done(self) -> bool:
            return True

        def result(self) -> list[float]:
            return self.rewards

    try:
        task = ArithTask()
        for gid, rewards in ((0, [1.0, 1.0]), (1, [0.0, 1.0])):
            res = {i: P.Result(gid=gid, attempt=0, idx=i, output_ids=[2], logprobs=[-0.1], versions=[0],
                               finish_reason="stop") for i in range(2)}
            ctrl.rollouts.scoring.append((InflightGroup(gid, task.prompt(gid), [1, 2], results=res), Done(rewards)))
            ctrl.counts.running += 1
        ctrl.rollouts.harvest_rewards()
        ctrl.assemble_batches()
        assert ctrl.counts.dropped_uniform == 1 and [g.gid for g in sent[0].groups] == [1]
        assert sent[0].stats.scored_reward_mean == 0.75  # (1 + 1 + 0 + 1) / 4; the trained group's is 0.5
        ctrl.rollouts.ready.append(sent[0].groups[0])
        ctrl.assemble_batches()  # nothing scored since the last batch: no number rather than a stale one
        assert sent[1].stats.scored_reward_mean is None
    finally:
        ctrl.close()
