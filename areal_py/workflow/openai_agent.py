"""Workflow `openai_agent`: an agent function written against the official `openai` client, trained unchanged.

``rollout.workflow=openai_agent rollout.agent=my_pkg.agents:solve`` calls, once per episode,

    solve(client: openai.OpenAI, prompt: AgentPrompt) -> float | None

with a client whose `base_url` is this controller's OpenAI-compatible endpoint (areal_py/workflow/
openai_endpoint.py, started at the first episode) and whose api key is a token of this episode alone. Each
`client.chat.completions.create` / `client.completions.create` is one turn of the episode on a rollout
server; the calls are recorded token-exactly (areal_py/workflow/agent_trace.py) and become the trained
sequence. The agent returns its reward, or None to have the run's reward functions score the episode's text.

The client is built with ``max_retries=0``: a retried call would be a second sample of the same context,
which does not continue the trajectory and would break the episode.
"""
from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from areal_py.import_spec import load_callable
from areal_py.tasks.base import Prompt
from areal_py.tasks.prompt_render import uses_chat_template
from areal_py.telemetry.metrics import OPENAI_EPISODES
from areal_py.workflow.agent_trace import AgentTrace
from areal_py.workflow.api import Episode, EpisodeEnv
from areal_py.workflow.builtin import WorkflowSettings
from areal_py.workflow.openai_endpoint import Limits, OpenAIEndpoint

log = logging.getLogger("controller.openai")


@dataclass(frozen=True)
class AgentPrompt:
    """What an agent is given besides its client.

    `messages`: the prompt as chat messages exactly as the run renders it (task.system_prompt included), when
    the run renders prompts with the chat template; send them as they are as the first call's messages (then
    append). None for a text-prompt run: send `text` to /v1/completions. `model`: the name to call."""

    index: int
    text: str
    answer: str
    messages: list[dict] | None
    model: str


def agent_function(spec: str) -> Callable[..., Any]:
    """The function ``rollout.agent`` names (``package.module:function``); ValueError naming the key otherwise."""
    return load_callable(spec, f"rollout.agent={spec!r}",
                         "'package.module:function' (workflow openai_agent's agent)")


def agent_prompt(prompt: Prompt, tokenizer: Any, settings: WorkflowSettings) -> AgentPrompt:
    """The prompt for the agent: the same messages `render_prompt` renders (so the first call's ids are the
    prompt's ids), or the text alone when prompts are not rendered through a template."""
    messages = None
    if uses_chat_template(tokenizer, settings.chat_template):
        msgs = ([{"role": m.role, "content": m.content} for m in prompt.messages] if prompt.messages
                else [{"role": "user", "content": prompt.text}])
        if settings.system_prompt:
            msgs.insert(0, {"role": "system", "content": settings.system_prompt})
        messages = msgs
    return AgentPrompt(prompt.index, prompt.text, prompt.answer, messages, settings.openai.model_name)


def _reward(value: Any, spec: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"rollout.agent={spec!r} returned {value!r}: an agent returns a finite number or None")
    return float(value)


class OpenAIAgentWorkflow:
    """The workflow (module docstring). One endpoint per workflow, started at the first episode; `close` stops it."""

    def __init__(self, settings: WorkflowSettings | None = None) -> None:
        self.settings = settings or WorkflowSettings()
        self.agent = agent_function(self.settings.agent)
        self._lock = threading.Lock()
        self._endpoint: OpenAIEndpoint | None = None
        self._closed = False

    def endpoint(self, tokenizer: Any) -> OpenAIEndpoint:
        s = self.settings
        with self._lock:
            if self._closed:
                raise RuntimeError("the openai_agent workflow was closed")
            if self._endpoint is None:
                self._endpoint = OpenAIEndpoint(Limits(s.openai, s.max_new_tokens, s.temperature, s.top_p),
                                                vocab_size=len(tokenizer))
            return self._endpoint

    def run(self, prompt: Prompt, prompt_ids: list[int], env: EpisodeEnv) -> Episode:
        try:
            import openai
        except ImportError as e:  # the workflow needs the client its agents are written against
            raise RuntimeError("rollout.workflow=openai_agent needs the openai package: pip install openai") from e
        endpoint = self.endpoint(env.tokenizer)
        trace = AgentTrace(prompt_ids, max_calls=self.settings.max_turns)
        token = endpoint.open(trace, env)
        client = openai.OpenAI(base_url=endpoint.base_url, api_key=token, max_retries=0,
                               timeout=self.settings.turn_timeout_s + 30.0)
        try:
            value = self.agent(client, agent_prompt(prompt, env.tokenizer, self.settings))
        except Exception as e:
            if trace.aborted and not (trace.broken or trace.failed):  # the agent gave up on a refused turn
                OPENAI_EPISODES.labels(outcome="aborted").inc()
                return trace.episode(None)
            outcome = "broken" if trace.broken else "failed"
            OPENAI_EPISODES.labels(outcome=outcome).inc()
            raise RuntimeError(f"rollout.agent={self.settings.agent!r} raised {type(e).__name__}: {e}"
                               + (f" ({trace.broken or trace.failed})" if trace.broken or trace.failed else "")) from e
        finally:
            endpoint.close_session(token)
            client.close()
        try:
            episode = trace.episode(_reward(value, self.settings.agent))
        except ValueError:
            OPENAI_EPISODES.labels(outcome="broken" if trace.broken else "failed" if trace.failed else "empty").inc()
            raise
        OPENAI_EPISODES.labels(outcome="aborted" if episode.finish_reason == "abort" else "ok").inc()
        return episode

    def close(self) -> None:
        with self._lock:
            self._closed, endpoint = True, self._endpoint
        if endpoint is not None:
            endpoint.close()
