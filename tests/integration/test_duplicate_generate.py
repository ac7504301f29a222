"""A Generate the network delivered twice (tests/fault_proxy.py does): the rollout server refuses the copy alone,
counted as duplicate_request, and the running group still finishes. It used to answer the copy by aborting
every request of the group, the running ones included, so the controller dropped a group being generated."""
from __future__ import annotations

import threading

import zmq
from conftest import net_overrides
from tiny_models import tiny_model

from areal_py.config import load_config
from areal_py.telemetry.metrics import rejected_count
from areal_py.wire import protocol as P
from areal_py.wire.transport import make_socket, recv, send
from rollout_server.server import RolloutServer
from rollout_server.torch_engine.engine import Engine


def test_a_duplicated_generate_is_refused_and_the_group_finishes(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=d", *net_overrides(), "controller.group_size=2",
                             "rollout.controller_timeout_s=600"])
    ctx = zmq.Context.instance()
    router = make_socket(ctx, zmq.ROUTER, cfg.net.addr(cfg.net.rollout_port, bind=True), bind=True)
    pub = make_socket(ctx, zmq.PUB, cfg.net.addr(cfg.net.weights_port, bind=True), bind=True)
    model = tiny_model(0, vocab_size=48, max_positions=128).eval()
    server = RolloutServer(cfg, "srv", engine=Engine(model, eos_token_id=47, max_running=8))
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    try:
        recv(router, "test", timeout_s=10, waiting_for="hello", routed=True)
        before = rejected_count("rollout", "duplicate_request")
        g = P.Generate(gid=7, attempt=0, prompt_ids=[1, 2], n=2,
                       sampling=P.SamplingBody(max_new_tokens=6, temperature=1.0, top_p=1.0))
        send(router, g, to=b"srv")
        send(router, g, to=b"srv")
        results: list[P.Result] = []
        while len(results) < 2:
            _, m = recv(router, "test", timeout_s=30, waiting_for="the group's results", routed=True)
            if isinstance(m.body, P.Result):
                results.append(m.body)
        assert sorted(r.idx for r in results) == [0, 1]
        assert all(r.finish_reason in ("stop", "length") and r.output_ids for r in results), results
        assert rejected_count("rollout", "duplicate_request") - before == 1
    finally:
        server.running = False
        t.join(10)
        router.close()
        pub.close()
