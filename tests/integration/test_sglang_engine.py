"""The SGLang backend without sglang: translation, version tagging, the engine over fake servers.

Nothing here imports sglang or needs a GPU. `FakeModel` stands in for an sglang server: it
answers the calls `SGLangEngine` makes with responses shaped like sglang's (meta_info with
cumulative `output_token_logprobs` (logprob, token_id, None) tuples, finish_reason dicts, abort
answers carrying the tokens so far). Its "model" makes every token visibly traceable:
next token = previous token + 1 (so a resumed request must continue from its prefix), and
logprob = -(version of the loaded weights + 1) (so a token's tag can be checked against the
weights that really produced it).
"""
from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rollout_server.backend import Finished
from rollout_server.sampling import SamplingParams
from rollout_server.sglang_engine.engine import SGLangEngine
from rollout_server.sglang_engine.http import HTTPBackend, sglang_launch_command
from rollout_server.sglang_engine.wire import (
    SGLANG_MISSING,
    RequestState,
    build_generate_request,
    finish_reason,
    new_tokens,
    response_error,
    stage_weights,
)

VOCAB, EOS = 1000, 3


# --- a fake sglang ---------------------------------------------------------------------------------
def sglang_response(key: str, prompt_len: int, out: list[int], lps: list[float], finish: dict | None,
                    weight_version: str = "default") -> dict:
    """Shaped like sglang's answer with --skip-tokenizer-init and return_logprob=True."""
    return {"output_ids": list(out),
            "meta_info": {"id": key, "finish_reason": finish, "prompt_tokens": prompt_len,
                          "completion_tokens": len(out), "cached_tokens": 0, "weight_version": weight_version,
                          "output_token_logprobs": [(lp, t, None) for lp, t in zip(lps, out)]}}


class FakeModel:
    """Thread-safe core of a fake sglang server (shared by the in-memory and the HTTP fakes)."""

    def __init__(self, *, fail_update: bool = False, deaf: tuple[str, ...] = ()) -> None:
        self.lock = threading.RLock()
        self.reqs: dict[str, dict] = {}
        self.finished: list[tuple[str, dict]] = []
        self.weights_version = 0
        self.paused = False
        self.fail_update = fail_update
        self.deaf = deaf  # rid substrings whose attempts ignore a pause (to exercise the drain timeout)
        self.calls: list[tuple] = []
        self.submitted: list[tuple[str, dict]] = []

    def start(self, key: str, payload: dict) -> threading.Event:
        with self.lock:
            assert not self.paused, "a request was submitted while generation was paused"
            assert key not in self.reqs, f"sglang rid {key} reused"
            self.submitted.append((key, payload))
            ev = threading.Event()
            self.reqs[key] = {"payload": payload, "out": [], "lps": [], "event": ev, "response": None}
            return ev

    def _finish(self, key: str, finish: dict) -> None:
        r = self.reqs.pop(key)
        r["response"] = sglang_response(key, len(r["payload"]["input_ids"]), r["out"], r["lps"], finish,
                                        str(self.weights_version))
        self.finished.append((key, r["response"]))
        r["event"].set()

    def tick(self) -> None:
        """One decode step for every running request."""
        with self.lock:
            if self.paused:
                return
            for key in list(self.reqs):
                r = self.reqs[key]
                sp = r["payload"]["sampling_params"]
                last = (r["payload"]["input_ids"] + r["out"])[-1]
                tok = (last + 1) % VOCAB
                r["out"].append(tok)
                r["lps"].append(-float(self.weights_version + 1))
                if not sp["ignore_eos"] and tok in sp.get("stop_token_ids", []):
                    self._finish(key, {"type": "stop", "matched": tok})
                elif len(r["out"]) >= sp["max_new_tokens"]:
                    self._finish(key, {"type": "length", "length": sp["max_new_tokens"]})

    def abort(self, key: str) -> None:
        with self.lock:
            self.calls.append(("abort", key))
            if key in self.reqs:
                self._finish(key, {"type": "abort", "message": "Abort requested"})

    def pause(self) -> None:
        with self.lock:
            self.calls.append(("pause",))
            self.paused = True
            for key in list(self.reqs):
                if not any(d in key for d in self.deaf):
                    self._finish(key, {"type": "abort", "message": "Abort in running batch"})

    def resume(self) -> None:
        with self.lock:
            self.calls.append(("resume",))
            self.paused = False

    def load(self, model_dir: str, version: int) -> tuple[bool, str]:
        with self.lock:
            self.calls.append(("update", model_dir, version))
            assert not self.reqs or all(any(d in k for d in self.deaf) for k in self.reqs), \
                "weights loaded while our requests were still generating"
            if not (Path(model_dir) / "model.safetensors").is_file():
                return False, "no weights in directory"
            if self.fail_update:
                return False, "Failed to load weights: shape mismatch"
            self.weights_version = version
            return True, "Succeeded to update model weights."

    def take_finished(self) -> list[tuple[str, dict]]:
        with self.lock:
            out, self.finished = self.finished, []
            return out


class FakeBackend:
    """In-memory `SGLangBackend`: each poll() runs `ticks` decode steps, then returns ended attempts."""

    def __init__(self, model: FakeModel | None = None, ticks: int = 1) -> None:
        self.model = model or FakeModel()
        self.ticks = ticks
        self.closed = False

    def submit(self, key, payload):
        self.model.start(key, payload)

    def poll(self, timeout):
        for _ in range(self.ticks):
            self.model.tick()
        return self.model.take_finished()

    def abort(self, key):
        self.model.abort(key)

    def pause(self):
        self.model.pause()

    def resume(self):
        self.model.resume()

    def update_weights_from_disk(self, model_dir, version):
        return self.model.load(model_dir, version)

    def close(self):
        self.closed = True


def run(engine: SGLangEngine, max_steps: int = 10_000) -> dict[str, Finished]:
    done: dict[str, Finished] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            return done
        for f in engine.step():
            assert f.rid not in done, f"{f.rid} finished twice"
            done[f.rid] = f
    raise AssertionError("engine did not drain")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "base-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": VOCAB}))
    (d / "generation_config.json").write_text(json.dumps({"top_k": 20}))
    (d / "model.safetensors.index.json").write_text("{}")  # must NOT follow staged weights
    return d


@pytest.fixture
def weights_file(tmp_path: Path):
    def make(version: int) -> Path:
        p = tmp_path / "weights" / f"v{version:06d}.safetensors"
        p.parent.mkdir(exist_ok=True)
        save_file({"model.embed_tokens.weight": torch.full((4, 2), float(version))}, str(p))
        return p
    return make


def make_engine(model_dir: Path, tmp_path: Path, backend=None, **kw) -> SGLangEngine:
    return SGLangEngine(model_dir, eos_token_id=EOS, backend=backend or FakeBackend(),
                        staging_dir=tmp_path / "staging", **kw)


# --- request translation ----------------------------------------------------------------------------
def test_request_translation_sends_every_sampling_knob() -> None:
    req = build_generate_request("k1", [5, 6, 7], SamplingParams(max_new_tokens=99, temperature=0.7, top_p=0.9),
                                 eos_token_id=EOS, max_new_tokens=40)
    assert req["rid"] == "k1" and req["input_ids"] == [5, 6, 7]
    assert req["return_logprob"] is True and req["stream"] is False
    assert req["logprob_start_len"] == -1 and req["top_logprobs_num"] == 0 and req["return_text_in_logprobs"] is False
    assert "text" not in req
    # the attempt's budget, not the request's
    assert req["sampling_params"] == {
        "max_new_tokens": 40, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "min_p": 0.0,
        "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "min_new_tokens": 0,
        "ignore_eos": False, "n": 1, "stop_token_ids": [EOS]}
    json.dumps(req)  # plain JSON


def test_request_translation_greedy_and_ignore_eos() -> None:
    sp = build_generate_request("k", [1], SamplingParams(temperature=0.0, ignore_eos=True), eos_token_id=EOS,
                                max_new_tokens=8)["sampling_params"]
    assert sp["temperature"] == 0.0  # sglang: 0 = greedy
    assert sp["ignore_eos"] is True and "stop_token_ids" not in sp
    with pytest.raises(ValueError, match="max_new_tokens"):
        build_generate_request("k", [1], SamplingParams(), eos_token_id=EOS, max_new_tokens=0)


# --- response parsing -------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ({"type": "stop", "matched": EOS}, "stop"),
    ({"type": "stop", "matched": "</s>"}, "stop"),
    ({"type": "length", "length": 16}, "length"),
    ({"type": "abort", "message": "Abort in waiting queue"}, "abort"),
    ("length", "length"),
    (None, None),
    ({"type": "something_new"}, "abort"),
])
def test_finish_reason_mapping(raw, expected) -> None:
    assert finish_reason(sglang_response("k", 3, [], [], raw)) == expected


def test_logprob_extraction_cumulative_and_incremental() -> None:
    resp = sglang_response("k", 3, [11, 12, EOS], [-0.5, -1.25, -0.01], {"type": "stop", "matched": EOS})
    assert new_tokens(resp, 0) == ([11, 12, EOS], [-0.5, -1.25, -0.01])
    assert new_tokens(resp, 2) == ([EOS], [-0.01])  # cumulative list: skip what was recorded
    assert new_tokens([resp], 0)[0] == [11, 12, EOS]  # one-element batch answer
    incremental = {"meta_info": {"completion_tokens": 3, "output_token_logprobs": [[-0.01, EOS, None]],
                                 "finish_reason": None}}
    assert new_tokens(incremental, 2) == ([EOS], [-0.01])
    empty_abort = {"meta_info": {"finish_reason": {"type": "abort"}, "completion_tokens": 0}}
    assert new_tokens(empty_abort, 0) == ([], [])


def test_response_parsing_rejects_what_it_cannot_trust() -> None:
    resp = sglang_response("k", 3, [11, 12], [-0.5, -1.0], {"type": "length"})
    with pytest.raises(ValueError, match="already recorded"):
        new_tokens(resp, 5)
    bad = sglang_response("k", 3, [11, 12], [-0.5, -1.0], {"type": "length"})
    bad["output_ids"] = [11, 99]
    with pytest.raises(ValueError, match="disagree"):
        new_tokens(bad, 0)
    misaligned = {"meta_info": {"completion_tokens": 7, "output_token_logprobs": [[-1.0, 4, None]] * 3}}
    with pytest.raises(ValueError, match="cannot align"):
        new_tokens(misaligned, 0)
    with pytest.raises(ValueError, match="no meta_info.output_token_logprobs"):
        new_tokens({"meta_info": {"completion_tokens": 2}}, 0)


def test_response_errors() -> None:
    assert response_error(sglang_response("k", 1, [], [], None)) is None
    assert response_error({"error": {"message": "Input is too long"}}) == "Input is too long"
    assert response_error({"error": "HTTP 503: busy"}) == "HTTP 503: busy"
    assert response_error({"object": "error", "message": "bad", "code": 400}) == "bad"
    assert "no meta_info" in response_error({"text": "x"})
    assert "malformed" in response_error("oops")


# --- version tagging across a pause (pure state) -----------------------------------------------------
def test_request_state_tags_tokens_with_their_attempts_version() -> None:
    s = RequestState("r", [1, 2], SamplingParams(max_new_tokens=6))
    s.begin_attempt(4, "k-1")
    s.record([3, 4, 5], [-0.1, -0.2, -0.3])
    s.end_attempt()  # paused for a weight update
    assert s.tokens == [1, 2, 3, 4, 5] and s.budget() == 3
    assert s.budget(max_seq_len=6) == 1
    s.begin_attempt(5, "k-2")
    with pytest.raises(RuntimeError, match="already has an attempt"):
        s.begin_attempt(5, "k-3")
    s.record([6, 7], [-0.4, -0.5])
    s.end_attempt()
    f = s.result("length")
    assert f.output_ids == [3, 4, 5, 6, 7] and f.versions == [4, 4, 4, 5, 5]
    assert f.logprobs == [-0.1, -0.2, -0.3, -0.4, -0.5] and f.prompt_ids == [1, 2] and s.attempts == 2
    with pytest.raises(RuntimeError, match="no attempt in flight"):
        s.record([8], [-0.6])


# --- the engine end to end over the in-memory fake ----------------------------------------------------
def test_engine_generates_like_the_builtin_interface(model_dir, tmp_path) -> None:
    backend = FakeBackend()
    eng = make_engine(model_dir, tmp_path, backend, version=2)
    eng.add("a", [10], SamplingParams(max_new_tokens=4))
    eng.add("b", [EOS - 2], SamplingParams(max_new_tokens=10))  # emits EOS as its 2nd token
    eng.add("c", [EOS - 1], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert eng.num_waiting == 3 and eng.num_running == 0 and eng.has_work()
    done = run(eng)
    assert done["a"] == Finished("a", [10], [11, 12, 13, 14], [-1.0] * 4, [2] * 4, "length")
    assert done["b"].output_ids == [EOS - 1, EOS] and done["b"].finish_reason == "stop"  # EOS included
    assert done["c"].output_ids == [EOS, EOS + 1, EOS + 2] and done["c"].finish_reason == "length"
    assert not eng.has_work() and eng.kv_usage() == 0.0
    _, payload = backend.model.submitted[0]
    assert payload["input_ids"] == [10] and payload["sampling_params"]["max_new_tokens"] == 4
    eng.close()
    assert backend.closed


def test_engine_respects_max_running_and_validates(model_dir, tmp_path) -> None:
    eng = make_engine(model_dir, tmp_path, max_running=2, max_seq_len=8)
    for i in range(5):
        eng.add(f"r{i}", [100 * (i + 1)], SamplingParams(max_new_tokens=20))
    eng.step()
    assert eng.num_running == 2 and eng.num_waiting == 3 and eng.kv_usage() == 1.0
    with pytest.raises(ValueError, match="duplicate"):
        eng.add("r0", [1], SamplingParams())
    with pytest.raises(ValueError, match="max_seq_len"):
        eng.add("long", list(range(8)), SamplingParams())
    with pytest.raises(ValueError, match="empty prompt"):
        eng.add("e", [], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        eng.add("p", [1], SamplingParams(top_p=0.0))
    done = run(eng)
    assert all(len(f.output_ids) == 7 and f.finish_reason == "length" for f in done.values())  # 1 + 7 = max_seq_len


def test_abort_waiting_running_and_late_answers(model_dir, tmp_path) -> None:
    backend = FakeBackend()
    eng = make_engine(model_dir, tmp_path, backend, max_running=1)
    eng.add("run", [10], SamplingParams(max_new_tokens=50))
    eng.add("wait", [20], SamplingParams(max_new_tokens=50))
    eng.step()
    assert eng.abort("wait") == Finished("wait", [20], [], [], [], "abort")
    f = eng.abort("run")
    assert f.finish_reason == "abort" and f.rid == "run"
    assert ("abort", backend.model.submitted[0][0]) in backend.model.calls
    assert eng.abort("run") is None and eng.abort("nobody") is None
    assert eng.step() == [] and not eng.has_work()  # the aborted attempt's answer is ignored


def test_update_weights_tags_tokens_before_and_after_the_pause(model_dir, tmp_path, weights_file) -> None:
    backend = FakeBackend()
    eng = make_engine(model_dir, tmp_path, backend, version=0)
    eng.add("long", [100], SamplingParams(max_new_tokens=10))
    eng.add("short", [200], SamplingParams(max_new_tokens=2))
    eng.add("queued", [300], SamplingParams(max_new_tokens=3))
    done: dict[str, Finished] = {}
    for _ in range(3):  # 3 tokens for "long", "short" finishes after 2 under v0
        done.update({f.rid: f for f in eng.step()})
    eng.update_weights(weights_file(1), 1)
    assert eng.version == 1
    assert [c[0] for c in backend.model.calls] == ["pause", "update", "resume"]
    done.update(run(eng))

    long = done["long"]
    assert long.output_ids == list(range(101, 111))  # continued from its prefix: no gap, no repeat
    n0 = long.versions.count(0)
    assert n0 >= 1 and long.versions == [0] * n0 + [1] * (10 - n0)
    assert long.logprobs == [-1.0] * n0 + [-2.0] * (10 - n0)  # tags == the weights that made each token
    assert done["short"].versions == [0, 0] and done["short"].finish_reason == "length"
    assert all(f.finish_reason == "length" for f in done.values())
    for f in done.values():
        assert f.logprobs == [-(v + 1.0) for v in f.versions]

    # the resubmission: same request, prompt + prefix, remaining budget, a fresh sglang rid
    attempts = [(k, p) for k, p in backend.model.submitted if p["input_ids"][0] == 100]
    assert len(attempts) == 2 and attempts[0][0] != attempts[1][0]
    assert attempts[1][1]["input_ids"] == [100] + long.output_ids[:n0]
    assert attempts[1][1]["sampling_params"]["max_new_tokens"] == 10 - n0

    staged = Path(backend.model.calls[1][1])
    assert staged.parent == tmp_path / "staging" and (staged / "config.json").is_file()


def test_update_weights_from_tensors_and_rejected_update(model_dir, tmp_path) -> None:
    backend = FakeBackend(FakeModel(fail_update=True))
    eng = make_engine(model_dir, tmp_path, backend, version=0)
    eng.add("r", [100], SamplingParams(max_new_tokens=6))
    eng.step()
    eng.step()
    with pytest.raises(ValueError, match="rejected weights v1.*shape mismatch"):
        eng.update_weights({"model.embed_tokens.weight": torch.ones(4, 2)}, 1)
    assert eng.version == 0
    assert [c[0] for c in backend.model.calls] == ["pause", "update", "resume"]  # resumed even on failure
    staged = Path(backend.model.calls[1][1]) / "model.safetensors"
    assert torch.equal(load_file(str(staged))["model.embed_tokens.weight"], torch.ones(4, 2))
    f = run(eng)["r"]
    assert f.output_ids == list(range(101, 107)) and f.versions == [0] * 6  # continued under the old weights


def test_bad_weights_fail_before_touching_sglang(model_dir, tmp_path) -> None:
    backend = FakeBackend()
    eng = make_engine(model_dir, tmp_path, backend)
    eng.add("r", [10], SamplingParams(max_new_tokens=3))
    eng.step()
    with pytest.raises(FileNotFoundError):
        eng.update_weights(tmp_path / "missing.safetensors", 1)
    with pytest.raises(ValueError, match="not a torch.Tensor"):
        eng.update_weights({"w": [1.0, 2.0]}, 1)
    assert backend.model.calls == [] and eng.version == 0
    assert run(eng)["r"].output_ids == [11, 12, 13]


def test_drain_timeout_resubmits_from_the_recorded_prefix(model_dir, tmp_path, weights_file) -> None:
    backend = FakeBackend(FakeModel(deaf=("-deaf-",)))  # this request's attempt never answers the pause
    eng = make_engine(model_dir, tmp_path, backend, drain_timeout_s=0.05)
    eng.add("deaf", [100], SamplingParams(max_new_tokens=6))
    eng.add("ok", [200], SamplingParams(max_new_tokens=6))
    eng.step()
    eng.step()
    eng.update_weights(weights_file(1), 1)
    old_key = backend.model.submitted[0][0]
    assert ("abort", old_key) in backend.model.calls  # given up on, and told so
    done = run(eng)
    # the deaf attempt's 2 tokens were never received: its request restarts from the prompt, all v1
    assert done["deaf"].output_ids == list(range(101, 107)) and done["deaf"].versions == [1] * 6
    assert done["ok"].versions == [0, 0, 1, 1, 1, 1]


def test_abort_of_a_finished_but_undelivered_request(model_dir, tmp_path, weights_file) -> None:
    backend = FakeBackend()
    eng = make_engine(model_dir, tmp_path, backend)
    eng.add("r", [1], SamplingParams(max_new_tokens=2))
    eng.add("s", [5], SamplingParams(max_new_tokens=9))
    eng.step()
    backend.model.tick()  # sglang finishes "r" before the pause; its answer is collected by the drain
    eng.update_weights(weights_file(1), 1)
    f = eng.abort("r")  # finished, not yet delivered by step(): delivered once, as aborted
    assert f.output_ids == [2, 3] and f.versions == [0, 0] and f.finish_reason == "abort"
    assert "r" not in run(eng)


# --- weights staging -----------------------------------------------------------------------------------
def test_stage_weights_builds_a_hf_directory_and_prunes(model_dir, tmp_path, weights_file) -> None:
    staging = tmp_path / "staging"
    files = {v: weights_file(v) for v in (1, 2, 3)}
    paths = [stage_weights(files[v], v, staging_dir=staging, model_dir=model_dir) for v in (1, 2, 3)]
    assert sorted(p.name for p in staging.iterdir()) == ["v000002", "v000003"]  # keep=2, no temp leftovers
    d = paths[-1]
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    t = load_file(str(d / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(t, torch.full((4, 2), 3.0))
    assert (d / "model.safetensors").samefile(files[3])  # hard-linked here (same filesystem), not copied
    again = stage_weights({"a.weight": torch.arange(6.0).view(2, 3).t()}, 3, staging_dir=staging,
                          model_dir=model_dir)  # non-contiguous tensor, same version re-staged
    assert torch.equal(load_file(str(again / "model.safetensors"))["a.weight"], torch.arange(6.0).view(2, 3).t())
    for bad, err in [(tmp_path / "nope.safetensors", FileNotFoundError), (model_dir / "config.json", ValueError),
                     ({}, ValueError), (42, ValueError)]:
        with pytest.raises(err):
            stage_weights(bad, 9, staging_dir=staging, model_dir=model_dir)
    assert sorted(p.name for p in staging.iterdir()) == ["v000002", "v000003"]


# --- sglang missing / launching ----------------------------------------------------------------------
def test_clear_import_error_when_sglang_is_missing(monkeypatch, model_dir) -> None:
    monkeypatch.setitem(sys.modules, "sglang", None)  # "import sglang" now raises ImportError
    with pytest.raises(ImportError) as e:
        SGLangEngine(model_dir, eos_token_id=EOS)
    assert str(e.value) == SGLANG_MISSING and "pip install 'areal-py[sglang]'" in str(e.value)


def test_module_does_not_import_sglang() -> None:
    import rollout_server.sglang_engine.engine  # noqa: F401 - imported for what it loads into sys.modules
    assert sys.modules.get("sglang") is None


def test_launch_command() -> None:
    cmd = sglang_launch_command("/m", port=31000, tp_size=2, max_running=64, seed=7, context_length=4096,
                                weight_version=5, extra_args=["--log-level", "warning"])
    assert cmd[:3] == [sys.executable, "-m", "sglang.launch_server"]
    s = " ".join(cmd)
    for part in ["--model-path /m", "--port 31000", "--host 127.0.0.1", "--skip-tokenizer-init", "--tp-size 2",
                 "--max-running-requests 64", "--random-seed 7", "--context-length 4096", "--weight-version 5",
                 "--log-level warning"]:
        assert part in s


# --- the HTTP client against a loopback stand-in of sglang's HTTP server --------------------------------
class FakeHTTPServer:
    """sglang's endpoints over loopback HTTP, generation driven by a ticker thread."""

    def __init__(self, model: FakeModel, *, has_pause: bool = True) -> None:
        self.model = model
        self.has_pause = has_pause
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, status: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {}) if self.path == "/health" else self._send(404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                m = fake.model
                if self.path == "/generate":
                    if len(body["input_ids"]) > 50:
                        return self._send(400, {"error": {"message": "Input is too long"}})
                    ev = m.start(body["rid"], body)
                    ev.wait(10)
                    with m.lock:
                        resp = next(r for k, r in m.finished if k == body["rid"])
                    return self._send(200, resp)
                if self.path == "/pause_generation" and fake.has_pause:
                    assert body == {"mode": "abort"}
                    m.pause()
                    return self._send(200, {})
                if self.path == "/continue_generation" and fake.has_pause:
                    m.resume()
                    return self._send(200, {})
                if self.path == "/abort_request":
                    m.abort(body["rid"])
                    return self._send(200, {})
                if self.path == "/update_weights_from_disk":
                    assert body["flush_cache"] is True
                    ok, msg = m.load(body["model_path"], int(body["weight_version"]))
                    return self._send(200 if ok else 400, {"success": ok, "message": msg, "num_paused_requests": 0})
                self._send(404, {"detail": "Not Found"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self.httpd.serve_forever, daemon=True),
                         threading.Thread(target=self._tick, daemon=True)]
        for t in self._threads:
            t.start()

    def _tick(self) -> None:
        while not self._stop.wait(0.001):
            self.model.tick()

    def close(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_fake():
    servers = []

    def make(**kw) -> FakeHTTPServer:
        servers.append(FakeHTTPServer(FakeModel(), **kw))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


def poll_until(backend, n: int, timeout: float = 10.0) -> list:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += backend.poll(0.05)
    return got


def test_http_backend_calls_and_errors(http_fake, tmp_path) -> None:
    srv = http_fake()
    b = HTTPBackend(srv.url)
    assert b.healthy()
    payload = build_generate_request("k1", [10], SamplingParams(max_new_tokens=3), eos_token_id=EOS, max_new_tokens=3)
    b.submit("k1", payload)
    b.submit("k2", {**payload, "rid": "k2", "input_ids": list(range(60))})
    got = dict(poll_until(b, 2))
    assert new_tokens(got["k1"], 0) == ([11, 12, 13], [-1.0] * 3) and finish_reason(got["k1"]) == "length"
    assert response_error(got["k2"]).startswith("HTTP 400") and "too long" in response_error(got["k2"])
    ok, msg = b.update_weights_from_disk(str(tmp_path / "nothing-here"), 1)
    assert not ok and "no weights" in msg
    b.close()


def test_http_backend_pause_falls_back_to_per_request_abort(http_fake) -> None:
    srv = http_fake(has_pause=False)  # an sglang without /pause_generation
    b = HTTPBackend(srv.url)
    payload = build_generate_request("slow", [10], SamplingParams(max_new_tokens=10**6), eos_token_id=EOS,
                                     max_new_tokens=10**6)
    b.submit("slow", payload)
    deadline = time.monotonic() + 10
    while "slow" not in srv.model.reqs and time.monotonic() < deadline:
        time.sleep(0.01)
    b.pause()
    b.resume()  # 404 tolerated
    (key, resp), = poll_until(b, 1)
    assert key == "slow" and finish_reason(resp) == "abort" and ("abort", "slow") in srv.model.calls
    assert new_tokens(resp, 0)[0][:3] == [11, 12, 13]  # the abort answer carries the tokens so far


def test_engine_over_http_with_a_weight_update_mid_generation(http_fake, model_dir, tmp_path, weights_file) -> None:
    srv = http_fake()
    eng = SGLangEngine(model_dir, eos_token_id=EOS, base_url=srv.url, staging_dir=tmp_path / "staging",
                       max_running=4)
    for i in range(6):
        eng.add(f"r{i}", [50 * (i + 1)], SamplingParams(max_new_tokens=400))
    done: dict[str, Finished] = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until sglang is a few tokens into the first requests
        done.update({f.rid: f for f in eng.step()})
        with srv.model.lock:
            if any(len(r["out"]) >= 5 for r in srv.model.reqs.values()):
                break
    eng.update_weights(weights_file(1), 1)
    assert eng.version == 1
    deadline = time.monotonic() + 60
    while eng.has_work() and time.monotonic() < deadline:
        done.update({f.rid: f for f in eng.step()})
    eng.close()
    assert sorted(done) == [f"r{i}" for i in range(6)]
    spanned = 0
    for i, f in enumerate(done.values()):
        start = f.prompt_ids[0]
        assert f.output_ids == list(range(start + 1, start + 401)) and f.finish_reason == "length"
        n0 = f.versions.count(0)
        assert f.versions == [0] * n0 + [1] * (400 - n0)
        assert f.logprobs == [-(v + 1.0) for v in f.versions]  # each tag == the weights that made the token
        spanned += 0 < n0 < 400
    assert spanned >= 1  # at least one trajectory really crossed the update
