"""Semantic checks on what rollout servers send the controller, after the schema check.

A schema-valid message can still be impossible: a token version no trainer has published, token ids
outside the model's vocabulary, a NaN logprob. Any of these reaching a batch would poison training
or, as in `sample_staleness`, raise inside the controller and end the run. So every `Result` is checked
here first; a failing one is rejected and counted by the reason this returns, and the controller keeps
going (controller/controller.py: the group it belonged to is generated again elsewhere).

The rules, for a Result `r` of a group of `group_size` samples:

    0 <= r.idx < group_size                                     bad_index
    len(r.output_ids) <= max_new_tokens, and >= 1 unless the
      server stopped it (finish_reason abort or stale)          bad_length
    0 <= id < vocab_size for every output id                    bad_token
    0 <= v <= newest_version for every token version v, and
      versions never decrease along the sequence                bad_version
    every logprob finite                                        nonfinite_logprob
    MIN_LOGPROB <= logprob <= MAX_LOGPROB                       bad_logprob

`newest_version` is the newest policy version that exists: the last weights the trainer published, or
the version it started at. Versions only grow along a sequence because a server's weights only move
forward (an interrupted sequence resumes under newer weights). A logprob is log p <= 0; MAX_LOGPROB
leaves room for float rounding of a token with p ~ 1. MIN_LOGPROB is far below any token a sampler can
pick: float32 probabilities underflow to 0 below e^-104, and such a token is never drawn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from areal_py.wire import protocol as P

MAX_LOGPROB = 1e-3
MIN_LOGPROB = -1e4


@dataclass(frozen=True)
class ResultLimits:
    """What the controller knows that bounds a Result."""

    group_size: int
    max_new_tokens: int
    vocab_size: int
    newest_version: int


@dataclass(frozen=True)
class Invalid:
    """Why a message was rejected: `reason` is the metric label, `detail` the log line's substance."""

    reason: str
    detail: str


def check_version(version: int, newest_version: int, what: str) -> Invalid | None:
    """A server's own version (hello, heartbeat, weights loaded) must be one that exists: <= newest."""
    if version > newest_version:
        return Invalid("bad_version", f"{what} claims version {version}; the newest published is {newest_version}")
    return None


def check_result(r: P.Result, lim: ResultLimits) -> Invalid | None:
    """The first rule `r` breaks (module docstring), or None when it may be used."""
    where = f"result {r.gid}:{r.attempt}:{r.idx}"
    if r.idx >= lim.group_size:
        return Invalid("bad_index", f"{where}: sample index {r.idx} in a group of {lim.group_size}")
    n = len(r.output_ids)
    if n > lim.max_new_tokens or (n == 0 and r.finish_reason not in ("abort", "stale")):
        return Invalid("bad_length", f"{where}: {n} tokens (finish_reason {r.finish_reason}, at most "
                                     f"{lim.max_new_tokens})")
    if n == 0:
        return None
    lo, hi = min(r.output_ids), max(r.output_ids)
    if lo < 0 or hi >= lim.vocab_size:
        return Invalid("bad_token", f"{where}: token id {lo if lo < 0 else hi} outside the vocabulary "
                                    f"[0, {lim.vocab_size})")
    if min(r.versions) < 0 or max(r.versions) > lim.newest_version:
        return Invalid("bad_version", f"{where}: token versions {min(r.versions)}..{max(r.versions)}, newest "
                                      f"published {lim.newest_version}")
    if any(b < a for a, b in zip(r.versions, r.versions[1:])):
        return Invalid("bad_version", f"{where}: token versions decrease along the sequence")
    if not all(math.isfinite(x) for x in r.logprobs):
        return Invalid("nonfinite_logprob", f"{where}: a logprob is NaN or infinite")
    lo_lp, hi_lp = min(r.logprobs), max(r.logprobs)
    if lo_lp < MIN_LOGPROB or hi_lp > MAX_LOGPROB:
        return Invalid("bad_logprob", f"{where}: logprobs {lo_lp:g}..{hi_lp:g} outside [{MIN_LOGPROB:g}, "
                                      f"{MAX_LOGPROB:g}]")
    return None
