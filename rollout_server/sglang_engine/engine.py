"""SGLang as a second generation backend: `rollout_server.backend.Backend` over an sglang server.

NOT YET RUN AGAINST REAL SGLANG: it needs a CUDA GPU. Everything below that does not talk to
sglang (request/response translation, version tagging, weight staging, the engine's bookkeeping
driven by a fake backend, the HTTP client against a loopback stand-in) is covered by
`tests/integration/test_sglang_engine.py`; the sglang facts it relies on are listed at the end of this
docstring with where they were read.

Which sglang interface, and why
-------------------------------
We talk to sglang's **HTTP server** (`python -m sglang.launch_server`), not the in-process
`sglang.Engine`:

- our rollout server is one synchronous thread (ZeroMQ poll -> `step()` -> send); the in-process
  engine's generation API is asyncio-based and runs its tokenizer manager on an event loop in
  the calling process, which would need a second loop thread inside our process;
- the HTTP server documents exactly the RL controls we need (`/generate`, `/pause_generation`,
  `/continue_generation`, `/update_weights_from_disk`, `/abort_request`);
- the GPU process is isolated from ours (a CUDA/NCCL crash does not take the ZeroMQ loop with
  it), and `base_url=` can point at a server started separately (another container, TP over
  several GPUs), in which case sglang need not even be importable here.

With `base_url=None` the engine launches the server itself as a subprocess (that is where sglang
is required; the import is lazy, in `_require_sglang`). One sglang server per rollout server:
a weight update pauses (and aborts) *everything* on that sglang server.

Requests are plain non-streaming `POST /generate` calls, one daemon thread each (at most
`max_running` at a time); the final response of an attempt is the unit we consume.

Per-token versions: abort-and-resubmit
--------------------------------------
sglang does not know our policy versions, so they are kept here (`RequestState`). The rule that
makes the tags exact rather than "version at receipt time": every submission to sglang (an
*attempt*) runs under one weight version from start to end. `update_weights`:

1. stages the new weights as a Hugging Face directory (`wire.stage_weights`, whose module says how);
2. `POST /pause_generation {"mode": "abort"}`: sglang aborts every queued/running request and
   answers each one with the tokens (and logprobs) generated so far;
3. waits for the final response of every in-flight attempt (a barrier; `drain_timeout_s`): those
   tokens were produced by the old weights and are tagged with the old version. Requests that
   finished naturally meanwhile are kept as finished. An attempt that does not answer in time is
   given up (its late answer is ignored), keeping the prefix recorded before it;
4. `POST /update_weights_from_disk` (KV/prefix cache flushed), then `POST /continue_generation`;
5. resubmits every interrupted request with `input_ids = prompt + tokens so far` and the
   remaining token budget, under the new version.

So a trajectory can span versions exactly as with the built-in engine's default `recompute`
mode (prefix re-prefilled under the new weights). sglang's in-place pause (continue on the old
KV cache, the `keep` mode) is not used.

Behaviour logprobs
------------------
Our engine reports log_softmax(logits / T) of the sampled token, before top-p truncation (greedy:
plain logits). sglang reports, in the sampler version read, log(top-p-renormalized
softmax(logits / T)) (greedy: log_softmax(logits)); with `SGLANG_RETURN_ORIGINAL_LOGPROB=1` it
reports pre-temperature logprobs instead. So the numbers agree when top_p == 1 and that variable
is off: the launcher sets it to false, and every sampling knob sglang would otherwise take from
the model's generation_config.json (top_k, min_p, penalties) is sent explicitly as neutral.
With top_p < 1 the behaviour logprobs differ from the built-in engine's definition.

Other differences from `Engine`
-------------------------------
- `abort(rid)` of a running request returns the tokens recorded from *previous* attempts only
  (the current attempt's tokens are in sglang's answer, which is not waited for).
- `kv_usage()` is the fraction of our `max_running` concurrency in use, not sglang's KV pool
  (querying it would cost an HTTP call per heartbeat).
- `add_group` is the protocol's fallback, one `add` per sample (sglang's radix cache may still
  share the prompt's prefill); `requests_older_than` is the fallback [] (stale requests run to
  the end and the controller drops them).
- Sampling randomness comes from sglang (`--random-seed` at launch), not our `torch.Generator`.

sglang facts relied on (read, not run), with sources (github sgl-project/sglang unless noted)
--------------------------------------------------------------------------------------------
- `/generate` body: `input_ids`, `rid`, `sampling_params`, `return_logprob`, `logprob_start_len`
  (-1 = output tokens only), `top_logprobs_num`, `return_text_in_logprobs`, `stream`; sampling
  params `max_new_tokens`, `temperature` (0 = greedy), `top_p`, `top_k`, `min_p`, `stop_token_ids`,
  `ignore_eos`, penalties, `n`; and that defaults come from generation_config.json unless the
  server runs with `--sampling-defaults openai`: docs/basic_usage/sampling_params.md.
- Response: `{"output_ids": [...], "meta_info": {"id", "finish_reason", "prompt_tokens",
  "completion_tokens", "weight_version", "output_token_logprobs", ...}}`; `output_token_logprobs`
  is a list of `(logprob, token_id, text_or_None)` built by `detokenize_logprob_tokens` and is
  the request's whole list so far (state lists are extended, then emitted in full); with
  `--skip-tokenizer-init` there is `output_ids` and no `text`: TokenizerManager
  `_handle_batch_output` / `convert_logprob_style` / `add_logprob_to_meta_info` in
  python/sglang/srt/managers/tokenizer_manager.py.
- Aborted requests answer normally with `finish_reason = {"type": "abort", "message": ...}`,
  `completion_tokens` and the logprobs so far (`_handle_abort_req`, same file); aborts carrying
  status 500/503 turn into an HTTP error for non-streaming calls (`_wait_one_response`).
  `finish_reason["type"]` in {"stop", "length", "abort"} and `output_token_logprobs[i][0/1]` =
  logprob/token are also how AReaL parses it (github areal-project/AReaL,
  areal/engine/sglang_remote.py, `parse_generation_response`).
- `/pause_generation {"mode": "abort" | "retract" | "in_place"}` ("abort" = abort all, the
  default), `/continue_generation`, "pause_generation --- update weights --- continue_generation
  is the correct execution flow", and `/update_weights_from_disk` body `model_path`,
  `load_format`, `abort_all_requests`, `weight_version`, `flush_cache` (default true) answered by
  `{"success", "message", "num_paused_requests"}`: docs/advanced_features/sglang_for_rl.md.
  The pause/continue endpoints arrived around v0.4.9.post2 (AReaL PR #196 switched to them
  then); if `/pause_generation` answers 404 we abort our requests one by one instead.
- `/abort_request {"rid": ...}`, `/health`: python/sglang/srt/entrypoints/http_server.py.
- Logprob definition: `Sampler.forward` in python/sglang/srt/layers/sampler.py (an older
  version) and the `SGLANG_RETURN_ORIGINAL_LOGPROB` switch mentioned in later code.
- Launch flags `--model-path --host --port --skip-tokenizer-init --tp-size
  --mem-fraction-static --max-running-requests --random-seed --dtype --context-length
  --weight-version`, and `--sampling-defaults` (default "model" = generation_config.json):
  docs/advanced_features/server_arguments.md. API keys (`--api-key`, `--admin-api-key`) are not
  supported by this client.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from rollout_server.backend import Finished, WeightSource
from rollout_server.sampling import SamplingParams
from rollout_server.sglang_engine.http import (
    HTTPBackend,
    SGLangBackend,
    _free_port,
    launch_sglang_server,
    sglang_launch_command,
)
from rollout_server.sglang_engine.wire import (
    RequestState,
    _require_sglang,
    build_generate_request,
    finish_reason,
    new_tokens,
    response_error,
    stage_weights,
)

__all__ = ["SGLangEngine"]

log = logging.getLogger("rollout.sglang")


# --- the engine --------------------------------------------------------------------------------------
class SGLangEngine:
    """`rollout_server.backend.Backend` over an sglang server. See the module docstring for the
    design and its limits.

    model_path: HF model directory sglang serves (and whose config files go with staged weights).
    base_url: an sglang server already running (e.g. "http://10.0.0.7:30000"); None = launch one here.
    max_running: attempts in flight at once (also sglang's --max-running-requests when launched here).
    max_seq_len: prompt + output cap, as `Engine`; None = leave it to sglang's context length.
    staging_dir: where versioned weight directories are built (a temp dir if None).
    backend: inject an `SGLangBackend` (tests); overrides base_url and launching.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        eos_token_id: int,
        base_url: str | None = None,
        max_running: int = 128,
        max_seq_len: int | None = None,
        version: int = 0,
        seed: int = 0,
        tp_size: int = 1,
        mem_fraction_static: float = 0.85,
        dtype: str = "auto",
        staging_dir: str | os.PathLike | None = None,
        server_args: Sequence[str] = (),
        launch_timeout_s: float = 900.0,
        drain_timeout_s: float = 120.0,
        poll_timeout_s: float = 0.002,
        request_timeout_s: float = 3600.0,
        backend: SGLangBackend | None = None,
    ) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        if max_seq_len is not None and max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        self.model_path = Path(model_path)
        self.eos_token_id = int(eos_token_id)
        self.max_running = max_running
        self.max_seq_len = max_seq_len
        self.version = int(version)
        self.drain_timeout_s = drain_timeout_s
        self.poll_timeout_s = poll_timeout_s
        if backend is None:
            if base_url is None:
                _require_sglang()
                host = "127.0.0.1"
                port = _free_port(host)
                cmd = sglang_launch_command(self.model_path, port=port, host=host, tp_size=tp_size,
                                            mem_fraction_static=mem_fraction_static, max_running=max_running,
                                            seed=seed, dtype=dtype, context_length=max_seq_len,
                                            weight_version=version, extra_args=server_args)
                backend = launch_sglang_server(cmd, f"http://{host}:{port}", timeout_s=launch_timeout_s)
                backend.request_timeout_s = request_timeout_s
            else:
                backend = HTTPBackend(base_url, request_timeout_s=request_timeout_s)
        self.backend = backend
        self._own_staging = staging_dir is None
        self._staging = Path(staging_dir) if staging_dir is not None else Path(
            tempfile.mkdtemp(prefix="areal-sglang-weights-"))
        self._tag = uuid.uuid4().hex[:8]  # keeps our sglang rids unique across engines and restarts
        self._waiting: OrderedDict[str, RequestState] = OrderedDict()
        self._active: dict[str, RequestState] = {}  # rid -> state with an attempt in flight
        self._by_key: dict[str, str] = {}  # sglang rid of a live attempt -> our rid
        self._done: list[Finished] = []  # finished, not yet returned by step()

    # --- the Backend protocol ----------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._active)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._waiting or self._active or self._done)

    def kv_usage(self) -> float:
        """Fraction of our `max_running` in flight (sglang's own KV pool is not queried)."""
        return len(self._active) / self.max_running

    def add(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; it is submitted at the next step with room under `max_running`."""
        if self._holds(rid):
            raise ValueError(f"duplicate request id {rid!r}")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError(f"request {rid!r}: empty prompt")
        if self.max_seq_len is not None and len(prompt) >= self.max_seq_len:
            raise ValueError(f"request {rid!r}: prompt has {len(prompt)} tokens but max_seq_len is "
                             f"{self.max_seq_len} (room is needed for at least one new token)")
        if any(t < 0 for t in prompt):
            raise ValueError(f"request {rid!r}: negative token ids")
        params.validate()
        self._waiting[rid] = RequestState(rid, prompt, params)

    def add_group(self, rids: list[str], prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue n samples of one prompt: validated as a whole, then one `add` each (the fallback)."""
        if len(set(rids)) != len(rids):
            raise ValueError("duplicate request ids in group")
        for rid in rids:
            if self._holds(rid):
                raise ValueError(f"duplicate request id {rid!r}")
        self.add(rids[0], prompt_ids, params)  # checks prompt and params, which the others share
        for rid in rids[1:]:
            self.add(rid, prompt_ids, params)

    def abort(self, rid: str) -> Finished | None:
        """Drop a request; its tokens so far (previous attempts only, if one is in flight). None if unknown."""
        state = self._waiting.pop(rid, None)
        if state is None:
            state = self._active.pop(rid, None)
            if state is None:
                for i, f in enumerate(self._done):
                    if f.rid == rid:  # finished but not delivered yet: deliver it as aborted, once
                        return replace(self._done.pop(i), finish_reason="abort")
                return None
            key = state.key
            self._by_key.pop(key, None)
            state.end_attempt()
            self.backend.abort(key)
        return state.result("abort")

    def requests_older_than(self, min_version: int) -> list[str]:
        """Always [] (the protocol's fallback): stale requests here run to the end and the controller
        drops them when it builds batches."""
        return []

    def step(self) -> list[Finished]:
        """Submit what fits, collect the attempts that ended (waiting up to `poll_timeout_s`), refill."""
        self._fill()
        for key, resp in self.backend.poll(self.poll_timeout_s if self._active else 0.0):
            self._on_response(key, resp, interrupted=None)
        self._fill()
        out, self._done = self._done, []
        return out

    def update_weights(self, weights: WeightSource, version: int) -> None:
        """Pause (abort) generation, collect every in-flight attempt, load new weights, resume.

        `weights`: the trainer's safetensors path (preferred: linked, not re-written) or name -> tensor.
        Interrupted requests continue from their prefix under `version`. Raises ValueError if sglang
        rejects the weights (then they continue under the old version) and OSError if it is unreachable.
        """
        version = int(version)
        model_dir = stage_weights(weights, version, staging_dir=self._staging, model_dir=self.model_path)
        interrupted: list[RequestState] = []
        start = time.perf_counter()
        self.backend.pause()
        try:
            self._drain(interrupted)
            ok, message = self.backend.update_weights_from_disk(str(model_dir), version)
        finally:
            try:
                self.backend.resume()
            finally:
                for s in reversed(interrupted):  # back to the head of the queue, in their original order
                    self._waiting[s.rid] = s
                    self._waiting.move_to_end(s.rid, last=False)
        if ok:
            self.version = version
        log.info("sglang weights v%d %s in %.2fs; %d requests resume from their prefix", version,
                 "loaded" if ok else "REJECTED", time.perf_counter() - start, len(interrupted))
        self._fill()
        if not ok:
            raise ValueError(f"sglang rejected weights v{version} from {model_dir}: {message}")

    def close(self) -> None:
        self.backend.close()
        if self._own_staging:
            shutil.rmtree(self._staging, ignore_errors=True)

    def __enter__(self) -> SGLangEngine:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------------------
    def _holds(self, rid: str) -> bool:
        return rid in self._waiting or rid in self._active or any(f.rid == rid for f in self._done)

    def _fill(self) -> None:
        while self._waiting and len(self._active) < self.max_running:
            _, state = self._waiting.popitem(last=False)
            self._submit(state)

    def _submit(self, state: RequestState) -> None:
        budget = state.budget(self.max_seq_len)
        if budget <= 0:
            self._done.append(state.result("length"))
            return
        key = f"{self._tag}-{state.rid}-{state.attempts + 1}"
        state.begin_attempt(self.version, key)
        payload = build_generate_request(key, state.tokens, state.params, eos_token_id=self.eos_token_id,
                                         max_new_tokens=budget)
        self._by_key[key] = state.rid
        self._active[state.rid] = state
        self.backend.submit(key, payload)

    def _on_response(self, key: str, resp: Any, interrupted: list[RequestState] | None) -> None:
        """Record one attempt's answer. `interrupted` is given while draining for a weight update:
        aborted/failed attempts then go there (to be resubmitted) instead of finishing as "abort"."""
        rid = self._by_key.pop(key, None)
        if rid is None:
            return  # an attempt we gave up on (aborted or drain timeout): ignore its late answer
        state = self._active.pop(rid)
        error = response_error(resp)
        reason = None
        if error is None:
            try:
                ids, lps = new_tokens(resp, state.attempt_received)
            except ValueError as e:
                error = str(e)
            else:
                state.record(ids, lps)
                reason = finish_reason(resp)
                if reason is None:
                    error = "final response without a finish reason"
        state.end_attempt()
        if error is not None:
            log.warning("request %s attempt %d failed: %s", rid, state.attempts, error)
            reason = "abort"
        if reason == "abort" and interrupted is not None:
            interrupted.append(state)
        else:
            self._done.append(state.result(reason))

    def _drain(self, interrupted: list[RequestState]) -> None:
        """Wait for every in-flight attempt's final answer (the version barrier), up to drain_timeout_s."""
        deadline = time.monotonic() + self.drain_timeout_s
        while self._active:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, resp in self.backend.poll(min(0.05, left)):
                self._on_response(key, resp, interrupted)
        for rid in list(self._active):  # no answer in time: keep the recorded prefix, drop this attempt
            state = self._active.pop(rid)
            key = state.key
            self._by_key.pop(key, None)
            state.end_attempt()
            log.warning("request %s: no answer to the pause within %.0fs; resubmitting from %d tokens",
                        rid, self.drain_timeout_s, len(state.output_ids))
            self.backend.abort(key)
            interrupted.append(state)
