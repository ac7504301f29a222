"""How one episode is produced: the `Workflow` protocol, the `EpisodeEnv` it runs against, and the records.

A workflow is plain blocking code, like an agent written against an API client: it asks the env to
generate from a context, inspects the text, calls tools, appends their output and generates again,
then returns an `Episode`. Where it runs (the controller's episode threads) and how a generate
reaches a rollout server is the env's business, not the workflow's.

The invariant every workflow keeps: an Episode's segments, concatenated after the prompt ids, are
exactly the token ids the model saw. A model segment is a `Turn`'s output ids (or a prefix of them)
as the engine returned them, with the engine's logprobs and versions; anything else (tool output,
chat-template scaffolding) is a non-model segment, in the context but out of the loss. The next
turn's context is the previous context + those ids: text is never decoded and re-tokenised between
turns, so every model token's logprob is the one its context produced.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from areal_py.tasks.base import Prompt

FinishReason = Literal["stop", "length", "abort"]
TurnFinish = Literal["stop", "length", "abort", "stale"]


@dataclass(frozen=True)
class Turn:
    """What one generate returned: the engine's tokens, behaviour logprobs and per-token versions.

    `versions` may span several policy versions: a weight update in the middle of the turn interrupts it
    and the rest is sampled (and its logprobs computed) by the new weights."""

    output_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: TurnFinish

    def __post_init__(self) -> None:
        if not (len(self.output_ids) == len(self.logprobs) == len(self.versions)):
            raise ValueError(f"turn: {len(self.output_ids)} output ids, {len(self.logprobs)} logprobs and "
                             f"{len(self.versions)} versions; they must be equal")

    def prefix(self, k: int) -> Turn:
        """The first `k` tokens, finished as "stop": a workflow that stops reading at a tag keeps only
        what precedes it (the dropped tail never enters the context, so the prefix stays token-exact)."""
        if not 0 <= k <= len(self.output_ids):
            raise ValueError(f"turn prefix of {k} tokens out of {len(self.output_ids)}")
        if k == len(self.output_ids):
            return self
        return Turn(self.output_ids[:k], self.logprobs[:k], self.versions[:k], "stop")


class ToolOutcome(Protocol):
    """What a tool call returns (areal_py.tools' ToolResult has these fields): `output` is the observation
    text on success, `error` says what went wrong otherwise."""

    @property
    def ok(self) -> bool: ...

    @property
    def output(self) -> str: ...

    @property
    def error(self) -> str | None: ...


@runtime_checkable
class EpisodeEnv(Protocol):
    """What a workflow may do. Every blocking call has a timeout and raises an error naming what it waited for."""

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (Hugging Face): to decode turns and encode observations."""
        ...

    def generate(self, context_ids: Sequence[int], max_new_tokens: int | None = None) -> Turn:
        """Sample one continuation of `context_ids` (exact ids, never re-tokenised) from the current policy.

        `max_new_tokens`: at most rollout.max_new_tokens (None: that), and cut to the room the model's
        context leaves. A turn refused by the engine comes back with finish_reason "abort", one aborted as
        too stale for any batch to come with "stale"."""
        ...

    def call_tool(self, name: str, args: Any) -> ToolOutcome:
        """Run tool `name` out of process; a hung or crashing tool comes back as an error outcome."""
        ...


@dataclass(frozen=True)
class Segment:
    """A run of tokens of the trained sequence: the model's (`from_model`: trained, with the engine's
    logprobs and versions) or not (tool output, template scaffolding: context only, `logprobs` and
    `versions` empty)."""

    ids: list[int]
    from_model: bool
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)

    @classmethod
    def model(cls, turn: Turn) -> Segment:
        return cls(list(turn.output_ids), True, list(turn.logprobs), list(turn.versions))

    @classmethod
    def context(cls, ids: Sequence[int]) -> Segment:
        return cls([int(t) for t in ids], False)


@dataclass(frozen=True)
class Episode:
    """One finished episode: its segments in order after the prompt, how it ended, and its reward.

    `reward` None: scored by the run's reward functions (reward.functions) on the decoded segments, as a
    single-turn response is. `finish_reason`: "stop" when the workflow finished it, "length" when it ran
    out of turns or context, "abort" when a turn was refused (the group is then dropped, not trained).
    `info`: numbers for the metrics (turns, tool calls, tool errors...)."""

    segments: list[Segment]
    finish_reason: FinishReason = "stop"
    reward: float | None = None
    info: dict[str, float] = field(default_factory=dict)

    @property
    def turns(self) -> int:
        return sum(s.from_model for s in self.segments)


@runtime_checkable
class Workflow(Protocol):
    """How one episode of a prompt is produced. Built once per run as ``cls(settings)``, where
    `settings` is the run's `WorkflowSettings`; `run` is called from several threads at once, so it
    must keep its per-episode state in locals."""

    def run(self, prompt: Prompt, prompt_ids: list[int], env: EpisodeEnv) -> Episode:
        """Produce one episode from `prompt`, whose rendered ids (what the model sees first) are `prompt_ids`."""
        ...
