"""An agent's calls as one token-exact trajectory: the continuation rule and the per-episode record.

An agent written against an API client sends its whole history with every call (chat messages, or a
completion prompt), as text. The endpoint renders that text to ids; `continue_context` decides whether
those ids continue the episode's trajectory and, if so, which ids the engine is sent, so that the
trained sequence is exactly what the model saw and the model's own output ids are never replaced by a
re-tokenisation of their text.

`AgentTrace` records every call (the context ids sent, the engine's output ids, logprobs and versions)
and turns them into an Episode. It is thread-safe; the calls of one episode run one at a time.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from areal_py.workflow.api import Episode, Segment, Turn


def continue_context(prev: Sequence[int], prev_stopped: bool, rendered: Sequence[int]) -> list[int] | None:
    """The ids to send the engine for a call whose history renders to `rendered`, when the trajectory so far
    is `prev` (the last call's context + its output ids; for the first call, the prompt's ids) and
    `prev_stopped` says the last call ended on a stop token (its last output id); None when the call does
    not continue the trajectory.

    Rule, first match:
    1. `rendered` starts with `prev`: the context is `rendered` (nothing of `prev` is re-tokenised).
    2. `prev_stopped` and `rendered` starts with `prev` minus its last id (the stop token, which the template
       or the text did not render, e.g. an EOS after which a template writes its own end-of-message text):
       the context is `prev` + the rest of `rendered`. The model's own stop token stays where it ended its
       reply, so the trained sequence holds it with its logprob.
    3. Otherwise (the history was edited, a reply was re-tokenised into other ids, a template dropped part of
       an earlier turn): None.
    """
    prev, rendered = list(prev), [int(t) for t in rendered]
    n = len(prev)
    if rendered[:n] == prev:
        return rendered
    if prev_stopped and n and rendered[:n - 1] == prev[:n - 1]:
        return prev + rendered[n - 1:]
    return None


class TraceError(Exception):
    """A call the trace refuses; `code` is the OpenAI-style error code the endpoint answers with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class AgentCall:
    """One recorded call: the ids the engine was sent and what it returned (output ids, logprobs, versions)."""

    context: list[int]
    turn: Turn


class AgentTrace:
    """The calls of one agent episode (module docstring).

    States: open (calls accepted) -> ended (the agent returned; later calls are refused as episode_ended).
    A call that does not continue the trajectory (`continue_context` None) is refused as
    history_not_extended and the whole episode is marked `broken`: it cannot be trained as one sequence,
    so `episode()` raises instead of training part of it. A turn the server aborted marks it `aborted`.
    """

    def __init__(self, prompt_ids: Sequence[int], max_calls: int) -> None:
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.max_calls = max_calls
        self.calls: list[AgentCall] = []
        self.lock = threading.Lock()  # held by the endpoint for a whole call: one call of an episode at a time
        self.ended = False
        self.broken: str | None = None
        self.aborted = False
        self.failed: str | None = None  # a generation that raised (timeout, controller stopping)
        self.out_of_calls = False  # a call was refused for max_calls

    def tip(self) -> tuple[list[int], bool]:
        """The trajectory so far (last context + output, or the prompt) and whether it ended on a stop token."""
        if not self.calls:
            return list(self.prompt_ids), False
        last = self.calls[-1]
        stopped = last.turn.finish_reason == "stop" and bool(last.turn.output_ids)
        return last.context + list(last.turn.output_ids), stopped

    def next_context(self, rendered: Sequence[int]) -> list[int]:
        """The context for the next call (caller holds `lock`); raises TraceError for a call refused."""
        if self.ended:
            raise TraceError("episode_ended", "this episode has ended (the agent function returned): its api key "
                             "takes no more calls")
        if self.broken or self.aborted or self.failed:
            why = self.broken or self.failed or "a turn was aborted by its server"
            raise TraceError("episode_failed", f"an earlier call of this episode failed ({why}); the episode will "
                             "not be trained")
        if len(self.calls) >= self.max_calls:
            self.out_of_calls = True
            raise TraceError("max_turns", f"this episode made rollout.max_turns={self.max_calls} calls already")
        prev, stopped = self.tip()
        ctx = continue_context(prev, stopped, rendered)
        if ctx is None:
            what = "the task's prompt" if not self.calls else f"call {len(self.calls) - 1}'s context and output"
            at = next((i for i, (a, b) in enumerate(zip(prev, rendered)) if a != b), min(len(prev), len(rendered)))
            self.broken = (f"call {len(self.calls)} does not continue {what}: its rendered ids differ at token {at} "
                           f"of {len(prev)} (the history was edited or re-tokenised differently)")
            raise TraceError("history_not_extended", self.broken + "; an episode is one trajectory: send the "
                             "history back as the endpoint returned it, with new messages only appended")
        return ctx

    def record(self, context: list[int], turn: Turn) -> None:
        """Record a finished call (caller holds `lock`)."""
        if turn.finish_reason in ("abort", "stale"):
            self.aborted = True
        self.calls.append(AgentCall(list(context), turn))

    def end(self) -> None:
        with self.lock:
            self.ended = True

    def episode(self, reward: float | None) -> Episode:
        """The calls as one Episode: before each call's output, the ids its context adds to the trajectory
        (the prompt's rest, template scaffolding, new messages) as a non-model segment; each output as a model
        segment. An aborted turn finishes it as "abort" (the group is dropped); a last call cut by max_new_tokens, or
        a call refused for max_calls, as "length".

        Raises ValueError (the reason) for a broken or failed episode, or one with no call."""
        if self.broken or self.failed:
            raise ValueError(f"agent episode not trainable: {self.broken or self.failed}")
        if self.aborted:
            return Episode([], finish_reason="abort", info={"turns": float(len(self.calls))})
        if not self.calls:
            raise ValueError("the agent made no call through its client: nothing to train")
        segments, prev = [], self.prompt_ids
        for call in self.calls:
            gap = call.context[len(prev):]
            if gap:
                segments.append(Segment.context(gap))
            segments.append(Segment.model(call.turn))
            prev = call.context + list(call.turn.output_ids)
        last = self.calls[-1].turn.finish_reason
        finish = "length" if last == "length" or self.out_of_calls else "stop"
        return Episode(segments, finish_reason=finish, reward=reward,
                       info={"turns": float(len(self.calls)),
                             "tool_tokens": float(sum(len(s.ids) for s in segments if not s.from_model))})
