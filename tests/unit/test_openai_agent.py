"""The OpenAI-compatible agent endpoint (workflow openai_agent) against a fake EpisodeEnv, called through the
official `openai` client: the continuation rule by hand, two chat calls recorded token for token, an edited
history refused and the episode not trained, the completions endpoint, and hostile requests answered 4xx
and counted."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from areal_py.config.agent_endpoint import OpenAIEndpointConfig
from areal_py.models import build_char_tokenizer
from areal_py.tasks.base import Prompt
from areal_py.telemetry.metrics import OPENAI_EPISODES, OPENAI_REQUESTS
from areal_py.workflow.agent_trace import AgentTrace, continue_context
from areal_py.workflow.api import Turn
from areal_py.workflow.assembly import assemble
from areal_py.workflow.builtin import WorkflowSettings
from areal_py.workflow.openai_agent import OpenAIAgentWorkflow
from areal_py.workflow.openai_endpoint import Limits, OpenAIEndpoint

TOK = build_char_tokenizer()
EOS = TOK.eos_token_id
PROMPT = Prompt(index=3, text="1+2=", answer="3")


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False).input_ids


def chat_ids(messages: list[dict]) -> list[int]:
    return TOK.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


class FakeEnv:
    """Answers each generate with the next scripted reply: its characters then EOS (finish stop), logprob
    -0.1 * (position + 1) and version = the call's index; records every context it was sent."""

    def __init__(self, replies: list[str]) -> None:
        self.replies, self.contexts, self.turns = list(replies), [], []

    @property
    def tokenizer(self):
        return TOK

    def generate(self, context_ids, max_new_tokens=None) -> Turn:
        out = ids(self.replies.pop(0)) + [EOS]
        k = len(self.turns)
        turn = Turn(out, [-0.1 * (i + 1) for i in range(len(out))], [k] * len(out), "stop")
        self.contexts.append(list(context_ids))
        self.turns.append(turn)
        return turn

    def call_tool(self, name, args):
        raise AssertionError("no tools here")


def count(metric, **labels) -> float:
    return sum(s.value for m in metric.collect() for s in m.samples
               if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()))


# --- the rule, by hand ----------------------------------------------------------------------------
def test_continue_context_rule() -> None:
    prev = [1, 5, 6, 2]  # a context [1, 5] and an output [6, EOS=2]
    assert continue_context(prev, True, [1, 5, 6, 2, 9]) == [1, 5, 6, 2, 9]      # 1: extends as it is
    assert continue_context(prev, True, [1, 5, 6, 7, 9]) == [1, 5, 6, 2, 7, 9]   # 2: the stop token kept
    assert continue_context(prev, False, [1, 5, 6, 7, 9]) is None                # ... only after a stop
    assert continue_context(prev, True, [1, 5, 8, 7, 9]) is None                 # 3: history edited
    assert continue_context(prev, True, [1, 5, 6]) == [1, 5, 6, 2]               # only the stop token missing
    assert continue_context(prev, True, [1, 5]) is None                          # the reply dropped
    assert continue_context([1, 5], False, [1, 5]) == [1, 5]                     # the prompt itself


# --- the workflow through the official client -----------------------------------------------------
def two_calls(client: openai.OpenAI, prompt) -> float:
    msgs = list(prompt.messages)
    first = client.chat.completions.create(model=prompt.model, messages=msgs, logprobs=True)
    msgs += [first.choices[0].message.model_dump(), {"role": "user", "content": "sure?"}]
    second = client.chat.completions.create(model=prompt.model, messages=msgs, max_tokens=3)
    two_calls.seen = (first, second)
    return 1.0 if second.choices[0].message.content == prompt.answer else 0.0


def edits_history(client: openai.OpenAI, prompt) -> float:
    msgs = list(prompt.messages)
    first = client.chat.completions.create(model=prompt.model, messages=msgs)
    edited = "9" + first.choices[0].message.content  # the reply rewritten: its first token changed
    msgs += [{"role": "assistant", "content": edited}, {"role": "user", "content": "?"}]
    try:
        client.chat.completions.create(model=prompt.model, messages=msgs)
    except openai.BadRequestError as e:
        edits_history.error = e
    return 1.0  # the agent swallows the error: the episode must still not be trained


def completions(client: openai.OpenAI, prompt) -> None:
    first = client.completions.create(model=prompt.model, prompt=prompt.text, logprobs=0)
    # the token ids of the prompt and the first output (EOS included) sent back, plus more text
    nxt = TOK(prompt.text).input_ids + ids(first.choices[0].text) + [EOS] + ids("?")
    client.completions.create(model=prompt.model, prompt=nxt)
    completions.seen = first  # returns None: the run's reward functions score the episode


def settings(agent: str, **kw) -> WorkflowSettings:
    return WorkflowSettings(agent=f"{__name__}:{agent}", chat_template=kw.pop("chat", "true"),
                            max_new_tokens=4, **kw)


def test_two_chat_calls_are_one_token_exact_episode() -> None:
    wf = OpenAIAgentWorkflow(settings("two_calls", system_prompt="be brief"))
    env = FakeEnv(["12", "3"])
    prompt_msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2="}]
    prompt_ids = chat_ids(prompt_msgs)
    ok_before = count(OPENAI_EPISODES, outcome="ok")
    try:
        ep = wf.run(PROMPT, prompt_ids, env)
    finally:
        wf.close()
    first, second = two_calls.seen
    assert first.choices[0].message.content == "12" and first.choices[0].finish_reason == "stop"
    assert [c.logprob for c in first.choices[0].logprobs.content] == pytest.approx([-0.1, -0.2, -0.3])
    assert first.usage.prompt_tokens == len(prompt_ids) and first.usage.completion_tokens == 3
    # call 1 was sent the prompt's ids; call 2 the trajectory with the model's own EOS kept, then the template's
    # closing of the reply and the new message (rule 2: the template renders "</assistant>", not EOS)
    bridge = ids("</assistant><user>sure?</user><assistant>")
    assert env.contexts[0] == prompt_ids
    assert env.contexts[1] == prompt_ids + ids("12") + [EOS] + bridge
    assert second.usage.prompt_tokens == len(env.contexts[1]) and second.choices[0].message.content == "3"
    a = assemble(ep)
    assert a.output_ids == ids("12") + [EOS] + bridge + ids("3") + [EOS]
    assert a.loss_mask == [1, 1, 1] + [0] * len(bridge) + [1, 1]
    assert a.logprobs == pytest.approx([-0.1, -0.2, -0.3] + [0.0] * len(bridge) + [-0.1, -0.2])
    assert a.versions == [0, 0, 0] + [0] * len(bridge) + [1, 1]
    assert ep.reward == 1.0 and ep.finish_reason == "stop" and ep.info["turns"] == 2
    assert count(OPENAI_EPISODES, outcome="ok") == ok_before + 1


def test_edited_history_is_refused_and_the_episode_not_trained() -> None:
    wf = OpenAIAgentWorkflow(settings("edits_history"))
    env = FakeEnv(["12", "3"])
    before = count(OPENAI_EPISODES, outcome="broken")
    refused = count(OPENAI_REQUESTS, endpoint="chat", outcome="history_not_extended")
    try:
        with pytest.raises(ValueError, match="call 1 does not continue call 0"):
            wf.run(PROMPT, chat_ids([{"role": "user", "content": "1+2="}]), env)
    finally:
        wf.close()
    assert edits_history.error.status_code == 400 and edits_history.error.code == "history_not_extended"
    assert len(env.contexts) == 1  # the refused call generated nothing
    assert count(OPENAI_EPISODES, outcome="broken") == before + 1
    assert count(OPENAI_REQUESTS, endpoint="chat", outcome="history_not_extended") == refused + 1


def test_first_call_must_start_from_the_prompt() -> None:
    wf = OpenAIAgentWorkflow(settings("two_calls"))
    env = FakeEnv(["12"])
    try:  # the run renders a system prompt the agent is not told about: its first call does not match
        with pytest.raises(RuntimeError, match="does not continue the task's prompt"):
            wf.run(PROMPT, chat_ids([{"role": "system", "content": "x"}, {"role": "user", "content": "1+2="}]), env)
    finally:
        wf.close()
    assert env.contexts == []


def test_completions_with_token_ids_continue_the_trajectory() -> None:
    wf = OpenAIAgentWorkflow(settings("completions", chat="false"))
    env = FakeEnv(["12", "3"])
    prompt_ids = TOK(PROMPT.text).input_ids
    try:
        ep = wf.run(PROMPT, prompt_ids, env)
    finally:
        wf.close()
    first = completions.seen
    assert first.choices[0].text == "12" and first.choices[0].logprobs.tokens == ["1", "2", "<eos>"]
    assert first.choices[0].logprobs.token_logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert env.contexts[1] == prompt_ids + ids("12") + [EOS] + ids("?")
    a = assemble(ep)
    assert a.output_ids == ids("12") + [EOS] + ids("?") + ids("3") + [EOS]
    assert a.loss_mask == [1, 1, 1, 0, 1, 1] and ep.reward is None


# --- hostile requests -----------------------------------------------------------------------------
@pytest.fixture
def endpoint():
    ep = OpenAIEndpoint(Limits(OpenAIEndpointConfig(max_body_bytes=2048), max_new_tokens=4, temperature=1.0,
                               top_p=1.0), vocab_size=len(TOK))
    yield ep
    ep.close()


def post(ep: OpenAIEndpoint, path: str, body: bytes, key: str | None) -> tuple[int, dict]:
    req = urllib.request.Request(ep.base_url + path, data=body, method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_hostile_requests_get_openai_errors_and_are_counted(endpoint) -> None:
    prompt_ids = chat_ids([{"role": "user", "content": "1+2="}])
    env, trace = FakeEnv(["1"]), AgentTrace(prompt_ids, max_calls=4)
    key = endpoint.open(trace, env)
    good = {"model": "areal-py", "messages": [{"role": "user", "content": "1+2="}]}

    def expect(status: int, code: str, body, path="/chat/completions", k=key) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        endpoint_label = "completions" if path == "/completions" else "chat"
        before = count(OPENAI_REQUESTS, endpoint=endpoint_label, outcome=code)
        got, answer = post(endpoint, path, raw, k)
        assert (got, answer["error"]["code"]) == (status, code), answer
        assert count(OPENAI_REQUESTS, endpoint=endpoint_label, outcome=code) == before + 1

    expect(400, "bad_json", b"{not json")
    expect(400, "bad_json", b"[1, 2]")
    expect(413, "too_large", b"{" + b" " * 4000 + b"}")
    expect(401, "invalid_api_key", good, k=None)
    expect(401, "invalid_api_key", good, k="guess")
    expect(404, "model_not_found", {**good, "model": "gpt-4o"})
    expect(400, "invalid_value", {**good, "max_tokens": 5})  # past rollout.max_new_tokens=4
    expect(400, "invalid_value", {**good, "max_tokens": -1})
    expect(400, "unsupported_parameter", {**good, "tools": [{"type": "function"}]})
    expect(400, "unsupported_value", {**good, "temperature": 0.2})
    expect(400, "unsupported_value", {**good, "stream": True})
    expect(400, "unsupported_value", {**good, "n": 2})
    expect(400, "invalid_value", {**good, "messages": [{"role": "user", "content": 7}]})
    expect(400, "invalid_value", {"model": "areal-py", "prompt": [10 ** 9]}, path="/completions")
    assert env.contexts == []  # nothing above reached the engine

    client = openai.OpenAI(base_url=endpoint.base_url, api_key=key, max_retries=0)
    r = client.chat.completions.create(model="areal-py", messages=good["messages"], max_tokens=4)
    assert r.choices[0].message.content == "1" and env.contexts == [prompt_ids]
    endpoint.close_session(key)
    with pytest.raises(openai.BadRequestError) as e:  # a call after the episode ended
        client.chat.completions.create(model="areal-py", messages=good["messages"])
    assert e.value.code == "episode_ended" and len(env.contexts) == 1
