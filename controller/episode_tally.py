"""Multi-turn counts since the previous batch: what each step record says about episodes and tool calls.

The controller fills one `EpisodeTally` per run of a workflow (rollout.workflow other than single_turn)
and empties it into every batch it sends (`take`, as `BatchStats`' multi-turn fields). Three moments
feed it: a tool call returns (`tool_call`, on an episode thread), a group's episodes are settled and
assembled (`settled`, on the poll loop), and their rewards come back (`scored`, on the poll loop). So
the counts of one step are of what happened since the previous batch left, like `scored_reward_mean`;
they are not the trained batch's own episodes. Thread-safe: one lock guards every field.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from areal_py.workflow.assembly import AssembledEpisode


class EpisodeTally:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._zero()

    def _zero(self) -> None:
        self.episodes = self.turns = 0
        self.tool_calls = self.tool_errors = self.tool_timeouts = self.tool_crashes = 0
        self.tool_latency_s = 0.0
        self.response_tokens = self.tool_tokens = 0
        self.succeeded = self.succeeded_with_tool = 0

    def tool_call(self, result: Any) -> None:
        """One tool call's outcome (areal_py.tools' ToolResult: `ok`, `reason`, `latency_s`): an error is any
        call that is not ok; timeouts and crashes (the worker died) are also counted on their own."""
        reason = getattr(result, "reason", None)
        with self._lock:
            self.tool_calls += 1
            self.tool_errors += 0 if getattr(result, "ok", False) else 1
            self.tool_timeouts += reason == "timeout"
            self.tool_crashes += reason == "crash"
            self.tool_latency_s += float(getattr(result, "latency_s", 0.0) or 0.0)

    def settled(self, episodes: Sequence[AssembledEpisode], infos: Sequence[dict[str, float]]) -> None:
        """A group's episodes, assembled: turns from `info["turns"]`, tokens from the loss mask (0 = not the model's)."""
        with self._lock:
            self.episodes += len(episodes)
            self.turns += int(sum(i.get("turns", 1.0) for i in infos))
            self.response_tokens += sum(len(a.loss_mask) for a in episodes)
            self.tool_tokens += sum(len(a.loss_mask) - a.model_tokens for a in episodes)

    def scored(self, rewards: Sequence[float], infos: Sequence[dict[str, float]]) -> None:
        """A settled group's rewards: an episode succeeded when its reward is > 0, and used the tool when its
        workflow's `info["tool_calls"]` (tool_loop sets it) is > 0."""
        with self._lock:
            for reward, info in zip(rewards, infos):
                if reward > 0:
                    self.succeeded += 1
                    self.succeeded_with_tool += info.get("tool_calls", 0.0) > 0

    def take(self) -> dict[str, float | int]:
        """The counts since the previous `take` as BatchStats' multi-turn fields, and start again from zero.

        tool_latency_mean_s = tool_latency_s / tool_calls (absent without calls); tool_token_share =
        tool_tokens / response_tokens (absent without episodes)."""
        with self._lock:
            out: dict[str, float | int] = {
                "episodes": self.episodes, "episode_turns": self.turns, "tool_calls": self.tool_calls,
                "tool_errors": self.tool_errors, "tool_timeouts": self.tool_timeouts, "tool_crashes": self.tool_crashes,
                "episodes_succeeded": self.succeeded, "episodes_succeeded_with_tool": self.succeeded_with_tool}
            if self.tool_calls:
                out["tool_latency_mean_s"] = self.tool_latency_s / self.tool_calls
            if self.response_tokens:
                out["tool_token_share"] = self.tool_tokens / self.response_tokens
            self._zero()
        return out
