"""The rollout server over a backend written only against `rollout_server.backend.Backend`: it needs
nothing of either real engine (no model, no sglang), and every protocol call has its wire effect."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict

import pytest
import torch
import zmq
from conftest import net_overrides

from areal_py.config import load_config
from areal_py.telemetry.metrics import rejected_count
from areal_py.wire import protocol as P
from areal_py.wire.transport import make_socket, recv, send
from areal_py.wire.weight_files import sha256_file
from areal_py.wire.weights import save_weights
from rollout_server.backend import Backend, Finished, Trajectory, WeightSource
from rollout_server.sampling import SamplingParams
from rollout_server.server import RolloutServer

MAX_PROMPT = 8


class ScriptedBackend:
    """A Backend by the protocol's letter. Each step admits waiting requests (FIFO, up to max_running)
    and gives every running one token 100 + its output length, logprob -1, tagged with `version`."""

    def __init__(self, max_running: int = 4) -> None:
        self.version = 0
        self.max_running = max_running
        self.waiting: OrderedDict[str, Trajectory] = OrderedDict()
        self.running: dict[str, Trajectory] = {}
        self.updates: list[tuple[WeightSource, int]] = []
        self.closed = False
        self.fail_update = False

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def kv_usage(self) -> float:
        return len(self.running) / self.max_running

    def add(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if rid in self.waiting or rid in self.running:
            raise ValueError(f"duplicate request id {rid!r}")
        if not 0 < len(prompt_ids) <= MAX_PROMPT:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens")
        self.waiting[rid] = Trajectory(rid, list(prompt_ids), params)

    def add_group(self, rids: list[str], prompt_ids: list[int], params: SamplingParams) -> None:
        if not 0 < len(prompt_ids) <= MAX_PROMPT:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens")
        for rid in rids:
            self.add(rid, prompt_ids, params)

    def abort(self, rid: str) -> Finished | None:
        t = self.waiting.pop(rid, None) or self.running.pop(rid, None)
        return None if t is None else t.result("abort")

    def requests_older_than(self, min_version: int) -> list[str]:
        return [rid for rid, t in self.running.items() if t.versions and t.versions[0] < min_version]

    def update_weights(self, weights: WeightSource, version: int) -> None:
        if self.fail_update:
            raise RuntimeError("the engine failed to load it")
        self.updates.append((weights, version))
        self.version = version

    def step(self) -> list[Finished]:
        while self.waiting and len(self.running) < self.max_running:
            rid, t = self.waiting.popitem(last=False)
            self.running[rid] = t
        done = []
        for rid, t in list(self.running.items()):
            t.output_ids.append(100 + len(t.output_ids))
            t.logprobs.append(-1.0)
            t.versions.append(self.version)
            if len(t.output_ids) >= t.params.max_new_tokens:
                done.append(self.running.pop(rid).result("length"))
        return done

    def close(self) -> None:
        self.closed = True


def sampling(n: int) -> P.SamplingBody:
    return P.SamplingBody(max_new_tokens=n, temperature=1.0, top_p=1.0)


def results(router, count: int, seen: list) -> list[P.Result]:
    out = []
    while len(out) < count:
        _, m = recv(router, "test", timeout_s=10, waiting_for="results", routed=True)
        seen.append(m.body)
        if isinstance(m.body, P.Result):
            out.append(m.body)
    return sorted(out, key=lambda r: (r.gid, r.idx))


def wait_for(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture
def cfg(tmp_path):
    return load_config(None, [f"run.output_dir={tmp_path}", "run.name=b", *net_overrides()])


def test_the_fake_is_a_backend() -> None:
    assert isinstance(ScriptedBackend(), Backend)


def test_build_engine_gives_the_configured_torch_engine(cfg, monkeypatch, tmp_path) -> None:
    from tiny_models import tiny_model

    from areal_py.models import build_char_tokenizer
    from rollout_server import server
    from rollout_server.torch_engine.engine import Engine

    monkeypatch.setattr(server, "model_path", lambda c: tmp_path)
    monkeypatch.setattr(server, "load_model_and_tokenizer",
                        lambda path, dtype: (tiny_model(0), build_char_tokenizer()))
    cfg.rollout.max_running = 3
    eng = server.build_engine(cfg, seed=1)
    assert isinstance(eng, Engine) and isinstance(eng, Backend)
    assert eng.max_running == 3 and eng.interrupt_mode == cfg.rollout.interrupt_mode
    assert eng.eos_token_id == build_char_tokenizer().eos_token_id


def test_server_drives_any_backend_through_the_protocol(cfg, tmp_path):
    ctx = zmq.Context.instance()
    router = make_socket(ctx, zmq.ROUTER, cfg.net.addr(cfg.net.rollout_port, bind=True), bind=True)
    pub = make_socket(ctx, zmq.PUB, cfg.net.addr(cfg.net.weights_port, bind=True), bind=True)
    backend = ScriptedBackend(max_running=4)
    server = RolloutServer(cfg, "fake", engine=backend)
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    seen: list = []
    try:
        _, hello = recv(router, "test", timeout_s=10, waiting_for="hello", routed=True)
        assert hello.body.version == 0
        time.sleep(0.3)  # PUB drops messages until the server's SUB subscription has arrived

        # a group: add_group, then step until both samples come back
        send(router, P.Generate(gid=1, attempt=0, prompt_ids=[1, 2], n=2, sampling=sampling(3)), to=b"fake")
        r = results(router, 2, seen)
        assert [(x.gid, x.idx, x.output_ids, x.versions, x.finish_reason) for x in r] == \
               [(1, i, [100, 101, 102], [0, 0, 0], "length") for i in range(2)]
        beats = [b for b in seen if isinstance(b, P.Heartbeat)]
        assert beats and beats[-1].max_running == 4 and beats[-1].running == 0  # went idle before the results

        # add_group refuses: every sample is answered as aborted, nothing left queued
        before = rejected_count("rollout")
        send(router, P.Generate(gid=2, attempt=0, prompt_ids=list(range(MAX_PROMPT + 1)), n=2,
                                sampling=sampling(3)), to=b"fake")
        r = results(router, 2, seen)
        assert [(x.gid, x.output_ids, x.finish_reason) for x in r] == [(2, [], "abort")] * 2
        assert rejected_count("rollout") - before == 1 and not backend.has_work()

        # a weight update by path reaches the backend as the path; then the stale floor aborts the old group
        send(router, P.Generate(gid=3, attempt=0, prompt_ids=[5], n=2, sampling=sampling(10**6)), to=b"fake")
        wait_for(lambda: backend.num_running == 2 and all(x.output_ids for x in backend.running.values()))
        file = save_weights({"w": torch.zeros(2)}, cfg.weights_dir(), 1)
        weights = str(file.resolve())
        send(pub, P.UpdateWeights(version=1, path=weights, min_token_version=1, sha256=sha256_file(file)))
        r = results(router, 2, seen)
        assert {(x.gid, x.finish_reason) for x in r} == {(3, "stale")} and all(x.versions[0] == 0 for x in r)
        assert any(isinstance(b, P.WeightsLoaded) and b.version == 1 for b in seen)
        assert backend.updates == [(weights, 1)] and backend.version == 1 and not backend.has_work()

        # a failing update is rejected and leaves the version as it was: a path out of the weights dir, the
        # right file with a wrong hash, and a backend that raises on a checked file
        before, by_reason = rejected_count("rollout"), [rejected_count("rollout", r) for r in ("weights_path",
                                                                                             "weights_hash")]
        file2 = save_weights({"w": torch.ones(2)}, cfg.weights_dir(), 2)
        send(pub, P.UpdateWeights(version=2, path="unreadable", sha256=sha256_file(file2)))
        send(pub, P.UpdateWeights(version=2, path=str(file2), sha256="0" * 64))
        wait_for(lambda: rejected_count("rollout") - before == 2)
        assert [rejected_count("rollout", r) for r in ("weights_path", "weights_hash")] == [n + 1 for n in by_reason]
        backend.fail_update = True
        send(pub, P.UpdateWeights(version=2, path=str(file2), sha256=sha256_file(file2)))
        wait_for(lambda: rejected_count("rollout") - before == 3)
        assert backend.version == 1 and backend.updates == [(weights, 1)]
    finally:
        server.running = False
        t.join(5)
        router.close()
        pub.close()
    assert not t.is_alive() and backend.closed
