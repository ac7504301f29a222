"""Pure translation between our engine interface and sglang's HTTP API: requests, responses,
per-request version tagging, and staging weight files as a directory sglang can load.

See `engine.py` for the sglang facts relied on and where they were read.

Weight files
------------
sglang reloads weights from a *directory* (`update_weights_from_disk(model_path=...)`); our
trainer publishes one safetensors file per version (`areal_py/wire/weights.py`, keys are the HF
`named_parameters()` names, tied weights once). `stage_weights` builds `<staging>/v000123/`
holding `model.safetensors` (a hard link to the published file, else a symlink, else a copy)
plus `config.json`/`generation_config.json` from the base model directory (never its
`*.index.json`, which would name shards we do not have), and keeps the two newest such
directories. For `weights.transfer=stream` the received tensors are written there instead (put
`staging_dir` on tmpfs, e.g. /dev/shm, to keep that cheap). `update_weights_from_tensor` was not
used: over HTTP it carries serialized CUDA-IPC handles, i.e. it needs sglang and the GPU in this
process. The staging directory must be readable by the sglang server (same host or shared disk).
Dense Llama/Qwen2/Mistral-style checkpoints only: transformers-v5 fused MoE parameter names are
not checkpoint names and sglang would not recognise them.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollout_server.backend import Trajectory
from rollout_server.sampling import SamplingParams

log = logging.getLogger("rollout.sglang")


SGLANG_MISSING = (
    "the SGLang backend was requested but sglang is not installed. Install the optional extra on a "
    "machine with a CUDA GPU: pip install 'areal-py[sglang]', or pass base_url=... to use an sglang "
    "server that is already running (then sglang is not needed in this process)."
)

_FINISH_TYPES = {"stop": "stop", "length": "length", "abort": "abort"}


def _require_sglang() -> None:
    """Import sglang only when we are about to launch it, with an actionable message if missing."""
    try:
        import sglang  # noqa: F401 - imported only to learn whether it is installed
    except ImportError as e:
        raise ImportError(SGLANG_MISSING) from e


# --- request translation (pure) ------------------------------------------------------------------
def sglang_sampling_params(params: SamplingParams, *, eos_token_id: int, max_new_tokens: int) -> dict[str, Any]:
    """Our SamplingParams -> sglang's `sampling_params`, every knob explicit.

    sglang would otherwise take top_k/min_p/penalties from generation_config.json, which would change
    both what is sampled and the logprob the trainer compares against.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sp: dict[str, Any] = {
        "max_new_tokens": int(max_new_tokens),
        "temperature": float(params.temperature),  # 0.0 = greedy in sglang too
        "top_p": float(params.top_p),
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "min_new_tokens": 0,
        "ignore_eos": bool(params.ignore_eos),
        "n": 1,
    }
    if not params.ignore_eos:  # our EOS, whatever the model config's eos ids are
        sp["stop_token_ids"] = [int(eos_token_id)]
    return sp


def build_generate_request(sglang_rid: str, input_ids: Sequence[int], params: SamplingParams, *,
                           eos_token_id: int, max_new_tokens: int) -> dict[str, Any]:
    """The JSON body of one non-streaming `POST /generate` for one attempt."""
    return {
        "rid": sglang_rid,
        "input_ids": [int(t) for t in input_ids],
        "sampling_params": sglang_sampling_params(params, eos_token_id=eos_token_id, max_new_tokens=max_new_tokens),
        "return_logprob": True,
        "logprob_start_len": -1,  # output tokens only, no prompt logprobs
        "top_logprobs_num": 0,
        "return_text_in_logprobs": False,
        "stream": False,
    }


# --- response parsing (pure) ---------------------------------------------------------------------
def _single(response: Any) -> Any:
    """A one-prompt /generate answers with a dict; tolerate a one-element batch list."""
    if isinstance(response, list) and len(response) == 1:
        return response[0]
    return response


def response_error(response: Any) -> str | None:
    """The error message of a failed call (HTTP error mapped by the backend, sglang error body), else None."""
    r = _single(response)
    if not isinstance(r, dict):
        return f"malformed response of type {type(r).__name__}"
    if "error" in r:
        err = r["error"]
        return str(err.get("message", err)) if isinstance(err, dict) else str(err)
    if r.get("object") == "error":
        return str(r.get("message", r))
    if not isinstance(r.get("meta_info"), dict):
        return "malformed response: no meta_info"
    return None


def finish_reason(response: Any) -> str | None:
    """sglang `meta_info.finish_reason` -> "stop" | "length" | "abort"; None while unfinished.

    sglang sends a dict whose "type" is "stop" (EOS/stop token, the token is in the output),
    "length" or "abort"; a plain string is accepted too. Anything else is reported as "abort".
    """
    fr = _single(response).get("meta_info", {}).get("finish_reason")
    if fr is None:
        return None
    kind = fr.get("type") if isinstance(fr, dict) else fr
    mapped = _FINISH_TYPES.get(str(kind))
    if mapped is None:
        log.warning("unknown sglang finish reason %r, reported as abort", fr)
        return "abort"
    return mapped


def new_tokens(response: Any, already: int) -> tuple[list[int], list[float]]:
    """Token ids and logprobs of this attempt that were not recorded yet.

    Reads `meta_info.output_token_logprobs` [(logprob, token_id, text|None), ...]. sglang sends the
    attempt's whole list so far; should a version send only the new entries, `completion_tokens`
    (total generated in this attempt) tells the two apart. `already` = entries recorded before.
    """
    mi = _single(response)["meta_info"]
    entries = mi.get("output_token_logprobs")
    total = mi.get("completion_tokens")
    if entries is None:
        if not total:
            return [], []
        raise ValueError("response has no meta_info.output_token_logprobs (return_logprob not honoured?)")
    if total is None or len(entries) == total:  # cumulative: the whole attempt so far
        if len(entries) < already:
            raise ValueError(f"response lists {len(entries)} tokens but {already} were already recorded")
        fresh = entries[already:]
    elif already + len(entries) == total:  # incremental: only the new ones
        fresh = entries
    else:
        raise ValueError(f"cannot align {len(entries)} logprob entries with completion_tokens={total} "
                         f"after {already} recorded")
    ids, lps = [], []
    for e in fresh:
        if not isinstance(e, (list, tuple)) or len(e) < 2 or e[0] is None:
            raise ValueError(f"malformed output_token_logprobs entry {e!r}")
        lps.append(float(e[0]))
        ids.append(int(e[1]))
    out_ids = _single(response).get("output_ids")
    both_cumulative = isinstance(out_ids, list) and len(out_ids) == len(entries) and total in (None, len(entries))
    if both_cumulative and [int(t) for t in out_ids[already:]] != ids:  # then they must agree
        raise ValueError("output_ids disagree with output_token_logprobs")
    return ids, lps


# --- per-request state and version tagging (pure) ------------------------------------------------
@dataclass
class RequestState(Trajectory):
    """One request of ours, possibly submitted to sglang several times (once per weight version).

    Tokens recorded from an attempt carry the version that attempt was submitted under; weights
    change only between attempts, so that tag is exact. Each attempt sends ``tokens`` (the prompt
    plus every token generated so far).
    """

    attempts: int = 0
    attempt_version: int | None = None  # version of the attempt in flight; None = nothing in flight
    attempt_received: int = 0  # tokens recorded from the attempt in flight
    key: str | None = None  # sglang rid of the attempt in flight

    @property
    def in_flight(self) -> bool:
        return self.attempt_version is not None

    def budget(self, max_seq_len: int | None = None) -> int:
        """New tokens the next attempt may generate (our max_new_tokens and max_seq_len, as `Engine`)."""
        n = self.params.max_new_tokens - len(self.output_ids)
        if max_seq_len is not None:
            n = min(n, max_seq_len - len(self.prompt_ids) - len(self.output_ids))
        return n

    def begin_attempt(self, version: int, key: str) -> None:
        if self.in_flight:
            raise RuntimeError(f"request {self.rid!r} already has an attempt in flight")
        self.attempts += 1
        self.attempt_version = int(version)
        self.attempt_received = 0
        self.key = key

    def record(self, token_ids: Sequence[int], logprobs: Sequence[float]) -> None:
        if not self.in_flight:
            raise RuntimeError(f"request {self.rid!r}: tokens arrived with no attempt in flight")
        if len(token_ids) != len(logprobs):
            raise ValueError(f"{len(token_ids)} tokens but {len(logprobs)} logprobs")
        self.output_ids.extend(int(t) for t in token_ids)
        self.logprobs.extend(float(x) for x in logprobs)
        self.versions.extend([self.attempt_version] * len(token_ids))
        self.attempt_received += len(token_ids)

    def end_attempt(self) -> None:
        self.attempt_version = None
        self.key = None


# --- weights: trainer's safetensors file -> a directory sglang can load ----------------------------
_STAGED = re.compile(r"v(\d{6,})")
_CONFIG_FILES = ("config.json", "generation_config.json")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
        return
    except OSError:
        pass
    try:
        os.symlink(src.resolve(), dst)
        return
    except OSError:
        pass
    shutil.copyfile(src, dst)


def stage_weights(weights: Mapping[str, Any] | str | os.PathLike, version: int, *, staging_dir: str | os.PathLike,
                  model_dir: str | os.PathLike, keep: int = 2) -> Path:
    """Build `<staging_dir>/v{version:06d}/` = model.safetensors + the base model's config files.

    `weights` is the trainer's published file (linked in) or a name -> tensor mapping (written).
    Everything is checked before anything is visible: the directory appears by an atomic rename.
    """
    staging = Path(staging_dir)
    staging.mkdir(parents=True, exist_ok=True)
    final = staging / f"v{int(version):06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=staging))
    try:
        if isinstance(weights, (str, os.PathLike)):
            src = Path(weights)
            if not src.is_file():
                raise FileNotFoundError(f"weight file {src} does not exist (is weights.dir shared with this host?)")
            if src.suffix != ".safetensors":
                raise ValueError(f"weight file {src} is not a .safetensors file")
            _link_or_copy(src, tmp / "model.safetensors")
        elif isinstance(weights, Mapping):
            import torch
            from safetensors.torch import save_file

            if not weights:
                raise ValueError("empty weight update")
            for name, t in weights.items():
                if not isinstance(t, torch.Tensor):
                    raise ValueError(
                        f"weight {name!r} is a {type(t).__name__}, not a torch.Tensor")
            save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()},
                      str(tmp / "model.safetensors"), metadata={"version": str(int(version))})
        else:
            raise ValueError(
                f"weights must be a path or a mapping of tensors, got {type(weights).__name__}")
        for name in _CONFIG_FILES:
            cfg = Path(model_dir) / name
            if cfg.is_file():
                shutil.copyfile(cfg, tmp / name)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    staged = sorted((p for p in staging.iterdir() if p.is_dir() and _STAGED.fullmatch(p.name)),
                    key=lambda p: int(p.name[1:]))
    for old in staged[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final
