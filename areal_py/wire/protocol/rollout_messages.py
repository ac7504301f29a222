"""Controller <-> rollout server messages: a server joins and reports (Hello, Heartbeat), the controller
hands out a prompt's group (Generate) and the server streams its samples back (Result); the controller's
liveness (Ping, also the trainer's probe and its answer) and the order to stop (Shutdown).

Invariants: a Result's output_ids, logprobs and versions have one entry per token; a controller's message
to a server may carry its `session`, by which a server tells a restarted controller from the one it knew.
The weight messages a server receives are areal_py/wire/protocol/weight_messages.py.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from areal_py.wire.protocol.base import Body, Count, Session

MAX_HELD_ATTEMPTS = 2**16  # bound of Heartbeat.held: far above any server's groups in flight


class SamplingBody(Body):
    max_new_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)


EnginePath = Literal["fast", "generic", "external"]
"""How a server generates: the torch engine's fast runner, its generic Hugging Face forward fallback, or an
engine of its own (SGLang). rollout_server/kernel_report.py says why."""


class Hello(Body):
    """A server joins (the only message that registers one). `rejoin`: said again because the controller
    restarted (a new `Ping.session`); its `version` may then be one the restarted controller never
    published (the run rolled back past it), and such a server is registered as holding no usable weights."""
    server_id: str
    version: int = Field(ge=0)
    engine_path: EnginePath | None = None  # None: the server did not say
    rejoin: bool = False


class Heartbeat(Body):
    server_id: str
    version: int = Field(ge=0)
    running: int = Field(ge=0)
    waiting: int = Field(ge=0)
    generated_tokens: int = Field(ge=0)
    # activity (areal_py.telemetry.gen_activity), defaulted so older senders still validate: cumulative busy seconds
    # and slot-seconds since `started` (epoch seconds; a new value = counters restarted), taken at `at`,
    # the slot count, and the wall-clock busy spans since the previous heartbeat
    busy_s: float = Field(0.0, ge=0)
    slot_seconds: float = Field(0.0, ge=0)
    max_running: int = Field(0, ge=0)
    started: float = Field(0.0, ge=0)
    at: float = Field(0.0, ge=0)
    spans: list[tuple[float, float]] = Field(default_factory=list, max_length=256)
    # the attempts (gid, attempt) the server holds requests of: the controller's evidence that each is alive
    # (controller/progress.py); None: not said (an older sender), so only results show an attempt's progress
    held: list[tuple[Count, Count]] | None = Field(None, max_length=MAX_HELD_ATTEMPTS)


class Generate(Body):
    """One prompt's group: the server runs `n` samples and streams each back as it finishes."""
    gid: int = Field(ge=0)
    attempt: int = Field(ge=0)
    prompt_ids: list[int] = Field(min_length=1)
    n: int = Field(ge=1)
    sampling: SamplingBody
    session: Session | None = None  # the sending controller's (None: not said)


class Result(Body):
    gid: int = Field(ge=0)
    attempt: int = Field(ge=0)
    idx: int = Field(ge=0)
    output_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    # "stale": aborted because its oldest token became too old for any batch still to come
    finish_reason: Literal["stop", "length", "abort", "stale"]

    @model_validator(mode="after")
    def _same_lengths(self) -> Result:
        if not (len(self.output_ids) == len(self.logprobs) == len(self.versions)):
            raise ValueError("output_ids, logprobs and versions must have the same length")
        return self


class Shutdown(Body):
    reason: str = ""
    session: Session | None = None  # the sending controller's (None: not said)


class Ping(Body):
    """Controller -> every server (on the weights PUB), every `rollout.heartbeat_s`: the controller lives.

    A server hearing nothing from the controller (ping or any other message) for
    `rollout.controller_timeout_s` stops with an error instead of waiting forever. The trainer, while it
    waits for a batch, sends one to the controller every `rollout.heartbeat_s` and the controller answers
    it with one on the batch link; `trainer.controller_timeout_s` without an answer stops the trainer.

    `session`: drawn at random by each controller process (None in the trainer's probes). A peer that hears a
    session other than the one it knew learns that the controller restarted, and rejoins it
    (docs/operations.md, reconnecting to a restarted controller).
    """
    session: Session | None = None

