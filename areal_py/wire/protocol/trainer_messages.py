"""Controller <-> trainer messages: the trainer's hello (with what a resume hands back), the batches it
trains, and its last word (TrainerDone); the controller's counters and buffer a checkpoint keeps.
The trainer's weights notice, WeightsReady, is a weight message (areal_py/wire/protocol/weight_messages.py).

Invariants: a batch is numbered by the trainer version that trains it; every ControllerState counter
defaults to 0, so an older checkpoint still loads; a Sample's per-token lists (and its loss mask when
present) have one entry per token; BatchStats is one flat map of numbers on the wire.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    model_serializer,
    model_validator,
)

from areal_py.wire.protocol.base import Body, Count
from areal_py.wire.protocol.rollout_messages import Result

MAX_SERVERS = 4096  # per-server entries a batch's stats may carry
ServerId = Annotated[str, StringConstraints(max_length=255)]  # a ZeroMQ routing id is at most 255 bytes


class ControllerState(Body):
    """The controller's counters as of one batch; the trainer checkpoints the last trained batch's and
    hands it back in `TrainerHello.resume_state`, so a resumed controller goes on from them.

    Every field defaults to 0, so a state written before a counter existed still loads (the counter
    starts from 0). The JSON of `model_dump()` is what a checkpoint's state.json holds.
    """
    data_position: Count = 0     # prompts taken from the task, skipped ones included
    accepted: Count = 0          # groups scored and kept: in the buffer or already trained
    running: Count = 0           # groups admitted and not yet scored
    dropped_stale: Count = 0     # groups too stale for any batch to come
    dropped_uniform: Count = 0   # groups dynamic sampling dropped (one reward for every sample)
    reward_timeouts: Count = 0   # samples scored 0 because a reward function timed out...
    reward_errors: Count = 0     # ...or raised
    generated_tokens: Count = 0  # every token the servers returned for an awaited result
    skipped_too_long: Count = 0  # prompts longer than the model's context, never dispatched
    dropped_aborted: Count = 0   # groups a server refused (finish_reason abort)
    skipped_bad_lines: Count = 0  # data lines the task left out at load (malformed); a property of the data


MAX_BUFFERED_GROUPS = 2**20  # groups a controller buffer may hold: far above any run's in-flight work


class PendingGroup(Body):
    """An admitted group not yet scored (undispatched, generating or being scored), with the samples of it
    that have finished: `done[i]` is one sample's Result, its `idx` the sample's place in the group."""
    gid: int = Field(ge=0)
    prompt_index: int = Field(ge=0)
    prompt_ids: list[int] = Field(min_length=1)
    done: list[Result] = Field(default_factory=list)


class ControllerBuffer(Body):
    """The controller's work as of one batch, what makes resume lossless: every admitted group neither
    trained (in this or an earlier batch) nor dropped. `ready`: scored and waiting for a batch; `pending`:
    admitted and not yet scored, with their finished samples (per-token versions and logprobs kept, so
    the staleness rule still applies to them after a resume). The trainer checkpoints it with the
    batch's `ControllerState` and hands both back in its hello."""
    ready: list[Group] = Field(default_factory=list, max_length=MAX_BUFFERED_GROUPS)
    pending: list[PendingGroup] = Field(default_factory=list, max_length=MAX_BUFFERED_GROUPS)
    next_gid: Count = 0  # gids below it are taken: a resumed controller numbers new groups from here


class TrainerHello(Body):
    version: int = Field(ge=0)
    resume_state: ControllerState | None = None
    resume_buffer: ControllerBuffer | None = None  # None: a fresh run, or a checkpoint written without one


class TrainerDone(Body):
    version: int = Field(ge=0)


class Sample(Body):
    """One trained response. `loss_mask` (absent: every token is the model's, a single-turn response) marks
    which tokens the model generated (1: trained, with its behaviour logprob and version) and which it only
    saw (0: tool output and chat-template scaffolding of a multi-turn episode, areal_py/workflow: their
    logprob is 0 and their version the nearest model token's, so min(versions) is still the oldest model
    token's). Absent on the wire when None, so a single-turn batch is the bytes it always was."""
    output_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: Literal["stop", "length", "abort"]
    reward: float
    loss_mask: list[Annotated[int, Field(ge=0, le=1)]] | None = None

    @model_validator(mode="after")
    def _same_lengths(self) -> Sample:
        n = len(self.output_ids)
        if len(self.logprobs) != n or len(self.versions) != n or (self.loss_mask is not None and len(self.loss_mask) != n):
            raise ValueError(f"sample: {n} output_ids, {len(self.logprobs)} logprobs, {len(self.versions)} versions"
                             + ("" if self.loss_mask is None else f", {len(self.loss_mask)} loss_mask entries")
                             + "; they must be equal")
        return self

    @model_serializer(mode="wrap")
    def _without_absent_mask(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        d = handler(self)
        if d.get("loss_mask", 0) is None:
            del d["loss_mask"]
        return d

    def model_versions(self) -> list[int]:
        """The versions of the tokens the model generated (all of them without a loss mask)."""
        if self.loss_mask is None:
            return self.versions
        return [v for v, m in zip(self.versions, self.loss_mask) if m]


class Group(Body):
    gid: int = Field(ge=0)
    prompt_index: int = Field(ge=0)
    prompt_ids: list[int] = Field(min_length=1)
    samples: list[Sample] = Field(min_length=1)


GEN_TOKENS_PREFIX = "gen_tokens/"


class BatchStats(Body):
    """What the controller saw since the previous batch (rollout activity, scored reward) and the tokens
    each server generated since the controller started.

    On the wire this is one flat map of numbers: `gen_tokens` travels as one `gen_tokens/<server>` key
    per server and an absent optional field as no key, so receivers of the flat map read it unchanged.
    """
    servers_live: Count = 0
    gen_busy_s: float = Field(0.0, ge=0, allow_inf_nan=False)  # seconds any server spent generating
    # mean slot occupancy of the live servers that reported (None: none did)
    rollout_slot_occupancy: float | None = Field(None, ge=0, allow_inf_nan=False)
    # mean reward of every sample scored, dynamic sampling's drops included (None: none was scored)
    scored_reward_mean: float | None = Field(None, allow_inf_nan=False)
    # live servers running the generic Hugging Face forward, not the engine's fast path (None: no live server
    # said which path it runs)
    generic_engine_servers: Count | None = None
    gen_tokens: dict[ServerId, Count] = Field(default_factory=dict, max_length=MAX_SERVERS)
    # multi-turn runs (rollout.workflow other than single_turn; None otherwise), since the previous batch
    # (controller/episode_tally.py): episodes settled and their turns, tool calls and how many failed, timed
    # out or crashed, the mean call latency, the share of the settled episodes' response tokens that are not
    # the model's, and the episodes rewarded > 0, and those of them that called a tool
    episodes: Count | None = None
    episode_turns: Count | None = None
    tool_calls: Count | None = None
    tool_errors: Count | None = None
    tool_timeouts: Count | None = None
    tool_crashes: Count | None = None
    tool_latency_mean_s: float | None = Field(None, ge=0, allow_inf_nan=False)
    tool_token_share: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    episodes_succeeded: Count | None = None
    episodes_succeeded_with_tool: Count | None = None

    @model_validator(mode="before")
    @classmethod
    def _unflatten(cls, data: Any) -> Any:
        """Gather the wire's `gen_tokens/<server>` keys into `gen_tokens` (both forms at once: rejected)."""
        if not isinstance(data, dict) or not any(isinstance(k, str) and k.startswith(GEN_TOKENS_PREFIX) for k in data):
            return data
        if "gen_tokens" in data:
            raise ValueError("gen_tokens given both as a map and as gen_tokens/<server> keys")
        if len(data) > MAX_SERVERS + len(cls.model_fields):
            raise ValueError(f"more than {MAX_SERVERS} servers")
        out = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith(GEN_TOKENS_PREFIX))}
        out["gen_tokens"] = {k[len(GEN_TOKENS_PREFIX):]: v for k, v in data.items()
                             if isinstance(k, str) and k.startswith(GEN_TOKENS_PREFIX)}
        return out

    @model_serializer(mode="wrap")
    def _flatten(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        d = {k: v for k, v in handler(self).items() if v is not None}
        per_server = d.pop("gen_tokens")
        return {**d, **{f"{GEN_TOKENS_PREFIX}{k}": v for k, v in per_server.items()}}


class Batch(Body):
    """`version` is the trainer version that will train on it: batches are numbered by it."""
    version: int = Field(ge=0)
    groups: list[Group] = Field(min_length=1)
    state: ControllerState
    stats: BatchStats = Field(default_factory=BatchStats)
    # when any server was generating since the previous batch: [start, end] in epoch seconds
    gen_spans: list[tuple[float, float]] = Field(default_factory=list, max_length=256)
    # prompts dropped (or skipped at admission) since the previous batch, by reason: the run's ledger
    dropped_prompts: dict[Annotated[str, StringConstraints(max_length=64)], list[Count]] = Field(
        default_factory=dict, max_length=64)
    # set on the batches whose state the trainer checkpoints (TrainerConfig.checkpoints_at); None on the others
    buffer: ControllerBuffer | None = None


ControllerBuffer.model_rebuild()  # it names Group, defined after it
TrainerHello.model_rebuild()
