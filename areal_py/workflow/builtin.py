"""The built-in workflows: `single_turn` (one generation) and `tool_loop` (generate, call a tool on a tag, go on).

The run's default single-turn path is the controller's native group dispatch (one Generate of n samples,
the prompt prefilled once); `SingleTurn` is the same episode through the workflow API, the reference a
user workflow starts from.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from areal_py.config.agent_endpoint import OpenAIEndpointConfig
from areal_py.tasks.base import Prompt
from areal_py.workflow.api import Episode, EpisodeEnv, Segment, Turn
from areal_py.workflow.template import text_ids


@dataclass(frozen=True)
class WorkflowSettings:
    """What a workflow is built with (from the `rollout` config section)."""

    max_turns: int = 4
    tool_tags: dict[str, str] = field(default_factory=lambda: {"calc": "calculator"})
    result_open: str = "<result>"
    result_close: str = "</result>"
    # openai_agent (areal_py/workflow/openai_agent.py): the agent, how prompts are rendered, the run's sampling
    agent: str = ""
    chat_template: str = "auto"
    system_prompt: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 5
    turn_timeout_s: float = 300.0
    openai: OpenAIEndpointConfig = field(default_factory=OpenAIEndpointConfig)


class SingleTurn:
    """One generation from the prompt: the episode is the model's response."""

    def __init__(self, settings: WorkflowSettings | None = None) -> None:
        self.settings = settings or WorkflowSettings()

    def run(self, prompt: Prompt, prompt_ids: list[int], env: EpisodeEnv) -> Episode:
        turn = env.generate(prompt_ids)
        return Episode([Segment.model(turn)], finish_reason=_episode_finish(turn), info={"turns": 1.0})


def _episode_finish(turn: Turn) -> str:
    return "abort" if turn.finish_reason in ("abort", "stale") else turn.finish_reason


@dataclass(frozen=True)
class ToolCall:
    tokens: int  # the turn's tokens up to and including the closing tag
    tag: str
    args: str


def find_tool_call(tokenizer: Any, output_ids: list[int], tags: dict[str, str]) -> ToolCall | None:
    """The first complete ``<tag>args</tag>`` (tag one of `tags`) in the decoded turn, and the fewest
    leading tokens whose text contains it (the turn is cut there: what the model wrote after the closing
    tag is discarded, never seen by a later turn). None: the turn calls no tool."""
    text = tokenizer.decode(output_ids)
    found = None
    for tag in tags:
        m = re.search(f"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
        if m is not None and (found is None or m.end() < found[1].end()):
            found = (tag, m)
    if found is None:
        return None
    tag, m = found
    close = f"</{tag}>"
    for k in range(1, len(output_ids) + 1):
        if close in tokenizer.decode(output_ids[:k])[m.start():]:
            return ToolCall(k, tag, m.group(1).strip())
    raise AssertionError("unreachable: the whole turn contains the call")


class ToolLoop:
    """Generate; when the model writes ``<tag>args</tag>`` (rollout.tool_tags maps tag -> tool), cut the turn
    after the closing tag, call the tool and append ``<result>output</result>`` (its ids, masked out of
    the loss), then generate again; at most rollout.max_turns generations. A failed call's observation is
    ``<result>error: ...</result>``: the model sees it and the episode goes on."""

    def __init__(self, settings: WorkflowSettings | None = None) -> None:
        self.settings = settings or WorkflowSettings()

    def run(self, prompt: Prompt, prompt_ids: list[int], env: EpisodeEnv) -> Episode:
        s, tok = self.settings, env.tokenizer
        context, segments = list(prompt_ids), []
        info = {"turns": 0.0, "tool_calls": 0.0, "tool_errors": 0.0, "tool_tokens": 0.0}
        while True:
            turn = env.generate(context)
            info["turns"] += 1
            call = find_tool_call(tok, turn.output_ids, s.tool_tags) if turn.finish_reason in ("stop", "length") else None
            if call is None:
                segments.append(Segment.model(turn))
                return Episode(segments, finish_reason=_episode_finish(turn), info=info)
            kept = turn.prefix(call.tokens)
            segments.append(Segment.model(kept))
            context += kept.output_ids
            if info["turns"] >= s.max_turns:
                return Episode(segments, finish_reason="length", info=info)
            outcome = env.call_tool(s.tool_tags[call.tag], call.args)
            info["tool_calls"] += 1
            info["tool_errors"] += 0 if outcome.ok else 1
            body = outcome.output if outcome.ok else f"error: {outcome.error or 'failed'}"
            obs = text_ids(tok, f"{s.result_open}{body}{s.result_close}")
            info["tool_tokens"] += len(obs)
            segments.append(Segment.context(obs))
            context += obs
