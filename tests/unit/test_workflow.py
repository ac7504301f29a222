"""The workflow API: episode assembly, token-exact multi-turn contexts on the real engine (a weight update
in the middle of a turn included), the tool loop, chat-template observations, and loading a user workflow."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import torch

from areal_py.models import build_char_tokenizer
from areal_py.tasks.base import Prompt
from areal_py.workflow.api import Episode, Segment, Turn
from areal_py.workflow.assembly import assemble
from areal_py.workflow.builtin import SingleTurn, ToolLoop, WorkflowSettings, find_tool_call
from areal_py.workflow.loading import load_workflow
from areal_py.workflow.template import chat_message_ids, text_ids
from rollout_server.sampling import SamplingParams
from rollout_server.torch_engine.engine import Engine
from tests.unit.test_engine import EOS, make_model, reference_logprobs

torch.set_num_threads(1)
PROMPT = Prompt(index=0, text="q", answer="a")


# --- assembly: hand-computed ------------------------------------------------------------------
def test_assemble_masks_tool_tokens_and_carries_versions() -> None:
    ep = Episode([Segment([5, 6], True, [-0.5, -1.0], [3, 4]), Segment.context([9, 9, 9]),
                  Segment([7], True, [-0.25], [4])], finish_reason="stop")
    a = assemble(ep)
    assert a.output_ids == [5, 6, 9, 9, 9, 7]
    assert a.loss_mask == [1, 1, 0, 0, 0, 1]
    assert a.logprobs == [-0.5, -1.0, 0.0, 0.0, 0.0, -0.25]
    assert a.versions == [3, 4, 4, 4, 4, 4]  # tool tokens carry the nearest earlier model token's version
    assert a.oldest_version == 3 and a.model_tokens == 3


def test_assemble_leading_context_takes_first_model_version_and_rejects_bad_episodes() -> None:
    a = assemble(Episode([Segment.context([1]), Segment([2], True, [-1.0], [7])]))
    assert a.versions == [7, 7] and a.loss_mask == [0, 1] and a.oldest_version == 7
    with pytest.raises(ValueError, match="no model token"):
        assemble(Episode([Segment.context([1, 2])]))
    with pytest.raises(ValueError, match="segment 0 \\(model\\)"):
        assemble(Episode([Segment([1, 2], True, [-1.0], [0, 0])]))
    with pytest.raises(ValueError, match="carries logprobs"):
        assemble(Episode([Segment([1], False, [-1.0], [0]), Segment([2], True, [-1.0], [0])]))


# --- an env on the real engine, in process ------------------------------------------------------
class EngineEnv:
    """`EpisodeEnv` over an in-process torch Engine; `on_step(n)` runs before the n-th engine step of a
    turn (counted over the whole episode), where a test swaps weights."""

    def __init__(self, engine: Engine, tokenizer=None, max_new_tokens: int = 6, on_step=None) -> None:
        self.engine, self._tokenizer, self.max_new_tokens, self.on_step = engine, tokenizer, max_new_tokens, on_step
        self.contexts: list[list[int]] = []  # what each generate was asked to continue
        self.turns: list[Turn] = []
        self.steps = 0

    @property
    def tokenizer(self):
        return self._tokenizer

    def generate(self, context_ids, max_new_tokens=None) -> Turn:
        rid = str(len(self.turns))
        self.contexts.append(list(context_ids))
        self.engine.add(rid, list(context_ids), SamplingParams(max_new_tokens or self.max_new_tokens, 1.0,
                                                               ignore_eos=True))
        while True:
            if self.on_step is not None:
                self.on_step(self.steps)
            self.steps += 1
            done = {f.rid: f for f in self.engine.step()}
            if rid in done:
                f = done[rid]
                turn = Turn(f.output_ids, f.logprobs, f.versions, f.finish_reason)
                self.turns.append(turn)
                return turn

    def call_tool(self, name, args):
        raise AssertionError("no tools here")


OBS = [11, 12, 13]


class ObserveEveryTurn:
    """A scripted workflow: after each turn it appends fixed observation ids; three turns."""

    def __init__(self, settings=None) -> None:
        pass

    def run(self, prompt, prompt_ids, env) -> Episode:
        context, segments = list(prompt_ids), []
        for i in range(3):
            turn = env.generate(context)
            segments.append(Segment.model(turn))
            context += turn.output_ids
            if i < 2:
                segments.append(Segment.context(OBS))
                context += OBS
        return Episode(segments)


@pytest.mark.parametrize("swap_at", [None, 9])
def test_multi_turn_sequence_is_token_exact_and_weight_update_mid_turn(swap_at: int | None) -> None:
    """Rebuild the trained sequence from the recorded turns: it is exactly what each turn's engine saw,
    every model logprob is what a full forward over the trained sequence gives under the token's version,
    observation tokens are masked. swap_at=9: new weights after 9 engine steps, in the middle of turn 2
    (each turn is 6 steps, one token per step)."""
    model_a, model_b = make_model("llama", seed=0), make_model("llama", seed=1)
    engine = Engine(make_model("llama", seed=0), EOS, max_running=4)
    swap = (lambda n: engine.update_weights(dict(model_b.named_parameters()), version=1) if n == swap_at else None)
    env = EngineEnv(engine, on_step=swap)
    prompt_ids = [1, 2, 5, 7]
    a = assemble(ObserveEveryTurn().run(PROMPT, prompt_ids, env))
    t1, t2, t3 = env.turns
    obs = OBS
    assert a.output_ids == t1.output_ids + obs + t2.output_ids + obs + t3.output_ids
    assert env.contexts == [prompt_ids, prompt_ids + t1.output_ids + obs,
                            prompt_ids + t1.output_ids + obs + t2.output_ids + obs]
    assert a.loss_mask == [1] * 6 + [0] * 3 + [1] * 6 + [0] * 3 + [1] * 6
    model_idx = [i for i, m in enumerate(a.loss_mask) if m]
    assert [a.versions[i] for i in model_idx] == t1.versions + t2.versions + t3.versions
    assert [a.logprobs[i] for i in model_idx] == t1.logprobs + t2.logprobs + t3.logprobs
    if swap_at is None:
        assert set(a.versions) == {0}
    else:
        assert t1.versions == [0] * 6 and t2.versions == [0] * 3 + [1] * 3 and t3.versions == [1] * 6
        assert a.oldest_version == 0
    # every model token's logprob is what its version computes over the trained sequence itself
    ref = {0: reference_logprobs(model_a, prompt_ids, a.output_ids, 1.0),
           1: reference_logprobs(model_b, prompt_ids, a.output_ids, 1.0)}
    for i in model_idx:
        assert abs(a.logprobs[i] - float(ref[a.versions[i]][i])) < 1e-4, i


# --- the tool loop, scripted --------------------------------------------------------------------
TOK = build_char_tokenizer()


@dataclass(frozen=True)
class FakeOutcome:
    ok: bool
    output: str
    error: str | None = None


class ScriptedEnv:
    """Turns come from a script of texts (logprob -0.1 per token, version = turn number); tools are fakes."""

    def __init__(self, texts: list[str], tools: dict) -> None:
        self.texts, self.tools, self.contexts, self.calls = list(texts), tools, [], []

    @property
    def tokenizer(self):
        return TOK

    def generate(self, context_ids, max_new_tokens=None) -> Turn:
        v = len(self.contexts)
        self.contexts.append(list(context_ids))
        ids = text_ids(TOK, self.texts.pop(0))
        return Turn(ids, [-0.1] * len(ids), [v] * len(ids), "length")

    def call_tool(self, name, args):
        self.calls.append((name, args))
        return self.tools[name](args)


def test_tool_loop_cuts_after_the_tag_calls_the_tool_and_masks_the_result() -> None:
    env = ScriptedEnv(["1+<calc>2*3</calc>junk", "x<calc>1/0</calc>", "=6"], {
        "calculator": lambda a: FakeOutcome(True, "6") if a == "2*3" else FakeOutcome(False, "", "division by zero")})
    prompt_ids = text_ids(TOK, "q:")
    ep = ToolLoop(WorkflowSettings(max_turns=4)).run(PROMPT, prompt_ids, env)
    a = assemble(ep)
    text = TOK.decode(a.output_ids)
    assert text == "1+<calc>2*3</calc><result>6</result>x<calc>1/0</calc><result>error: division by zero</result>=6"
    assert env.calls == [("calculator", "2*3"), ("calculator", "1/0")]
    # the junk after the first closing tag was never seen: turn 2's context ends with the result
    assert TOK.decode(env.contexts[1]) == "q:1+<calc>2*3</calc><result>6</result>"
    mask_text = "".join(c if m else "_" for c, m in zip(text, a.loss_mask))
    assert mask_text == ("1+<calc>2*3</calc>" + "_" * len("<result>6</result>") + "x<calc>1/0</calc>"
                         + "_" * len("<result>error: division by zero</result>") + "=6")
    assert a.versions[:18] == [0] * 18 and a.versions[-2:] == [2, 2]
    assert ep.info == {"turns": 3.0, "tool_calls": 2.0, "tool_errors": 1.0,
                       "tool_tokens": float(len("<result>6</result>") + len("<result>error: division by zero</result>"))}
    assert ep.finish_reason == "length"


def test_tool_loop_stops_at_max_turns_and_single_turn_is_one_generation() -> None:
    env = ScriptedEnv(["<calc>1</calc>", "<calc>2</calc>"], {"calculator": lambda a: FakeOutcome(True, a)})
    ep = ToolLoop(WorkflowSettings(max_turns=2)).run(PROMPT, [1], env)
    assert TOK.decode(assemble(ep).output_ids) == "<calc>1</calc><result>1</result><calc>2</calc>"
    assert ep.finish_reason == "length" and env.calls == [("calculator", "1")]
    ep = SingleTurn().run(PROMPT, [1], ScriptedEnv(["7<calc>1</calc>"], {}))
    assert [s.from_model for s in ep.segments] == [True] and TOK.decode(ep.segments[0].ids) == "7<calc>1</calc>"


def test_find_tool_call_takes_the_first_complete_call() -> None:
    ids = text_ids(TOK, "a<py>x</py>b<calc>1+1</calc>")
    call = find_tool_call(TOK, ids, {"calc": "calculator", "py": "python"})
    assert (call.tag, call.args, call.tokens) == ("py", "x", len("a<py>x</py>"))
    assert find_tool_call(TOK, text_ids(TOK, "<calc>1+1</cal"), {"calc": "calculator"}) is None


# --- chat-template observations -----------------------------------------------------------------
def test_chat_message_ids_follow_the_template_after_the_models_end_token() -> None:
    tok = build_char_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if m.role == 'assistant' %}"
                         "{{ eos_token }} {% else %}</{{ m.role }}>{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    ids = chat_message_ids(tok, "user", "7", end_id=tok.eos_token_id)
    assert tok.decode(ids) == " <user>7</user><assistant>"  # the space after the eos, which the model never writes
    with pytest.raises(ValueError, match="has no token"):
        chat_message_ids(build_char_tokenizer(), "user", "7", end_id=tok.eos_token_id)  # embedded: no eos in it


# --- a user workflow from outside the package ---------------------------------------------------
def test_user_workflow_loads_by_module_and_class(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_agents.py").write_text(
        "from areal_py.workflow.api import Episode, Segment\n"
        "class Twice:\n"
        "    def __init__(self, settings):\n"
        "        self.turns = settings.max_turns\n"
        "    def run(self, prompt, prompt_ids, env):\n"
        "        t = env.generate(prompt_ids)\n"
        "        u = env.generate(list(prompt_ids) + t.output_ids + [9])\n"
        "        return Episode([Segment.model(t), Segment.context([9]), Segment.model(u)], reward=float(self.turns))\n"
        "NotAClass = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    wf = load_workflow("my_agents:Twice", WorkflowSettings(max_turns=5))
    env = ScriptedEnv(["ab", "c"], {})
    ep = wf.run(PROMPT, [1], env)
    assert ep.reward == 5.0 and assemble(ep).loss_mask == [1, 1, 0, 1]
    assert env.contexts[1] == [1, *text_ids(TOK, "ab"), 9]
    with pytest.raises(ValueError, match="rollout.workflow='my_agents:Nope' cannot be imported"):
        load_workflow("my_agents:Nope", WorkflowSettings())
    with pytest.raises(ValueError, match="not a class"):
        load_workflow("my_agents:NotAClass", WorkflowSettings())
    with pytest.raises(ValueError, match="expected one of"):
        load_workflow("nonsense", WorkflowSettings())
    sys.modules.pop("my_agents", None)
