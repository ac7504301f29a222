"""The generation backend the rollout server drives, and the records every backend exchanges.

`RolloutServer` talks to its engine only through `Backend`; the built-in continuous-batching
`torch_engine.engine.Engine` and the `sglang_engine.engine.SGLangEngine` both implement all of it,
each falling back to a documented simpler behaviour where it cannot do better, so the server never
asks which backend it holds. The records (`Finished`, `Trajectory`) live here rather than in either
engine so that neither backend imports the other.

Request ids are opaque strings chosen by the caller and unique among the requests a backend holds.
A request is *held* from `add` until `step` returns it or `abort` drops it; after that its id is
forgotten and may be reused.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from rollout_server.sampling import SamplingParams

__all__ = ["Backend", "Finished", "Trajectory", "WeightSource"]

# The trainer's published safetensors file (`areal_py.wire.weights` format: HF `named_parameters()`
# names, tied weights once), or those tensors by name (`weights.transfer=stream`).
WeightSource = Mapping[str, torch.Tensor] | str | os.PathLike


@dataclass
class Finished:
    """A request that left its backend, with everything generated for it.

    The three output lists have one entry per output token. `finish_reason` is "stop" (EOS emitted,
    and included in `output_ids`), "length" (token budget or max_seq_len reached) or "abort"
    (aborted, or given up by the backend); the server adds "stale" for requests it aborts as too old.
    """

    rid: str
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]  # behaviour logprob of each output token
    versions: list[int]  # policy version that produced each output token
    finish_reason: str


@dataclass
class Trajectory:
    """A request and what has been generated for it so far: each output token with its behaviour
    logprob and the policy version that sampled it. What every backend keeps per request."""

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        """The prompt followed by every token generated so far."""
        return self.prompt_ids + self.output_ids

    def result(self, reason: str) -> Finished:
        """A snapshot: later changes to this trajectory do not reach the returned record."""
        return Finished(self.rid, list(self.prompt_ids), list(self.output_ids), list(self.logprobs),
                        list(self.versions), reason)


@runtime_checkable
class Backend(Protocol):
    """What the rollout server calls on a generation engine; all calls come from one thread.

    `version` is the policy version of the loaded weights: every token sampled from now on is tagged
    with it. `max_running` is how many requests can be in flight at once (>= 1); more wait in FIFO
    order. The server runs `step` while `has_work()`, and applies weight updates between two steps.
    """

    version: int
    max_running: int

    @property
    def num_running(self) -> int:
        """Requests in flight (holding a generation slot)."""
        ...

    @property
    def num_waiting(self) -> int:
        """Requests queued for a slot."""
        ...

    def has_work(self) -> bool:
        """True while a `step` may still make progress or return results."""
        ...

    def kv_usage(self) -> float:
        """Occupancy in [0, 1] for the KV-cache gauge; each backend documents what it measures."""
        ...

    def add(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue one request. Raises ValueError (and queues nothing) for a duplicate id, an empty
        or too long prompt, token ids the backend cannot take, or invalid `params`."""
        ...

    def add_group(self, rids: list[str], prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue one request per id, all with the same prompt and params (a GRPO group).

        Validated as a whole first: on ValueError nothing of the group is queued. A backend that
        can share the prompt's prefill does; the fallback is `add` for each id.
        """
        ...

    def abort(self, rid: str) -> Finished | None:
        """Drop a held request and return it with reason "abort" and the tokens it has so far
        (a backend may document that it cannot report some of them); None if it holds no such id.
        An aborted request is never returned by a later `step`."""
        ...

    def requests_older_than(self, min_version: int) -> list[str]:
        """Ids of running requests holding a token sampled before `min_version`, which the server
        then aborts as too stale to train on. The fallback is [] (they run to the end and the
        controller drops them when it builds batches)."""
        ...

    def update_weights(self, weights: WeightSource, version: int) -> None:
        """Load new weights and make `version` current, between two steps.

        In-flight requests are never lost: they continue under the new weights, each token keeping
        the version that sampled it, so one trajectory may span versions. On failure it raises
        (KeyError / ValueError: weights that do not fit; OSError: unreadable file or unreachable
        server), `version` is unchanged and generation goes on under the old weights. Duplicates and
        older versions are filtered by the caller.
        """
        ...

    def step(self) -> list[Finished]:
        """Advance generation once and return the requests that finished, each exactly once and
        then forgotten. Never blocks for long: the server polls its sockets between steps."""
        ...

    def close(self) -> None:
        """Release what the backend holds outside this process (a launched server, staged files).
        The server calls it once, when it stops; nothing else is called after it."""
        ...
