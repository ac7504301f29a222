"""The controller's episode runner without sockets: episodes on threads, turns out as Generates (n=1) to the
least loaded server, results resolving them, a dead server's turn sent again under a new attempt, and the
settling rule for finished groups."""
from __future__ import annotations

import time

from areal_py.models import build_char_tokenizer
from areal_py.tasks.base import Prompt
from areal_py.wire import protocol as P
from areal_py.workflow.api import Episode, Segment
from areal_py.workflow.builtin import ToolLoop, WorkflowSettings
from controller.episodes import TURN_GID_BASE, EpisodeRunner, settle
from controller.servers import ServerRegistry

TOK = build_char_tokenizer()
PROMPT = Prompt(index=3, text="1+2", answer="3")


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False).input_ids


class FakeTools:
    def __init__(self) -> None:
        self.calls = []

    def call(self, name, args):
        self.calls.append((name, args))
        return type("R", (), {"ok": True, "output": "3", "error": None})()


def runner(tools=None, n=2) -> EpisodeRunner:
    return EpisodeRunner(ToolLoop(WorkflowSettings(max_turns=3)), TOK, n=n,
                         sampling=P.SamplingBody(max_new_tokens=12, temperature=1.0, top_p=1.0), context_len=64,
                         vocab_size=len(TOK), threads=4, turn_timeout_s=10, tools=tools)


def pump(r: EpisodeRunner, registry: ServerRegistry, sent: list, want: int) -> None:
    deadline = time.monotonic() + 10
    while len(sent) < want:
        assert time.monotonic() < deadline, f"only {len(sent)} of {want} turns sent"
        r.dispatch(registry, lambda s, g: sent.append((s.server_id, g)))
        time.sleep(0.01)


def answer(r, registry, server, gen: P.Generate, text: str, version: int = 0) -> bool:
    out = ids(text)
    return r.on_result(server, P.Result(gid=gen.gid, attempt=gen.attempt, idx=0, output_ids=out,
                                        logprobs=[-0.5] * len(out), versions=[version] * len(out),
                                        finish_reason="stop"), registry)


def test_turns_go_out_as_generates_and_a_dead_servers_turn_is_sent_again() -> None:
    registry = ServerRegistry(timeout_s=60)
    registry.seen("a", 0)
    registry.seen("b", 0)
    tools = FakeTools()
    r = runner(tools)
    r.start(gid=7, prompt=PROMPT, prompt_ids=ids("1+2="))
    sent: list = []
    pump(r, registry, sent, 2)  # both episodes' first turns, one per server (least loaded)
    assert sorted(s for s, _ in sent) == ["a", "b"]
    for server, gen in sent:
        assert gen.n == 1 and gen.gid >= TURN_GID_BASE and gen.prompt_ids == ids("1+2=")
        assert gen.sampling.max_new_tokens == 12
    (sa, ga), (sb, gb) = sent
    assert answer(r, registry, sa, ga, "<calc>1+2</calc>xx")
    assert not answer(r, registry, sa, gb, "3")  # not from the server it was sent to: stale_result
    # server b dies: its turn goes out again under a new attempt
    r.redispatch(gb.gid)
    registry.servers[sb].inflight.pop(gb.gid)
    pump(r, registry, sent, 4)  # the retried turn and episode 0's second turn
    retry = next(g for _, g in sent[2:] if g.gid == gb.gid)
    assert retry.attempt == 1
    second = next(g for _, g in sent[2:] if g.gid != gb.gid)
    assert second.prompt_ids == ids("1+2=<calc>1+2</calc><result>3</result>")  # cut after the tag, result appended
    assert tools.calls == [("calculator", "1+2")]
    for server, gen in sent[2:]:
        assert answer(r, registry, server, gen, "3", version=1)
    deadline = time.monotonic() + 10
    while not (done := r.finished()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    [(gid, outcomes, stale)] = done
    s = settle(outcomes, stale, TOK)
    assert gid == 7 and s.kind == "ok" and not stale
    texts = sorted(t for t, _ in s.texts)
    assert texts == ["3", "<calc>1+2</calc><result>3</result>3"]
    multi = next(a for a in s.episodes if len(a.output_ids) > 1)
    assert multi.loss_mask == [1] * len("<calc>1+2</calc>") + [0] * len("<result>3</result>") + [1]
    assert multi.versions[-1] == 1 and multi.oldest_version == 0
    assert all(not srv.inflight for srv in registry.servers.values())
    r.close()


def test_settle_rule() -> None:
    good = Episode([Segment(ids("7"), True, [-1.0], [0])])
    assert settle([good, RuntimeError("boom")], False, TOK).error == "episode 1: RuntimeError: boom"
    assert settle([good, good], True, TOK).kind == "stale"
    assert settle([good, Episode([Segment(ids("7"), True, [-1.0], [0])], finish_reason="abort")], False, TOK).kind == "abort"
    no_model = settle([good, Episode([Segment.context(ids("7"))])], False, TOK)
    assert no_model.kind == "error" and "no model token" in no_model.error
    ok = settle([good, Episode([Segment(ids("7"), True, [-1.0], [0])], reward=0.25)], False, TOK)
    assert ok.kind == "ok" and ok.rewards == [None, 0.25] and ok.info[0] == {"turns": 1.0}


def test_tool_loop_with_the_real_sandbox() -> None:
    """tool_loop's calls go to the sandbox's calculator out of process; a failing call is an error observation."""
    from areal_py.config.tools import ToolsConfig
    from areal_py.workflow.api import Turn
    from areal_py.workflow.assembly import assemble
    from controller.episodes import LazyTools

    tools = LazyTools(ToolsConfig(workers=1, timeout_s=5))
    script = ["<calc>12*34</calc>", "<calc>1/0</calc>", "408"]

    class Env:
        tokenizer = TOK

        def generate(self, context_ids, max_new_tokens=None):
            out = ids(script.pop(0))
            return Turn(out, [-0.1] * len(out), [0] * len(out), "stop")

        def call_tool(self, name, args):
            return tools.call(name, args)

    try:
        ep = ToolLoop(WorkflowSettings(max_turns=3)).run(PROMPT, ids("q"), Env())
    finally:
        tools.close()
    text = TOK.decode(assemble(ep).output_ids)
    assert text.startswith("<calc>12*34</calc><result>408</result><calc>1/0</calc><result>error: ")
    assert text.endswith("</result>408") and ep.info["tool_errors"] == 1.0 and ep.info["tool_calls"] == 2.0
