"""An agent written against the official `openai` client trains unchanged (rollout.workflow=openai_agent): two
chat calls per episode through the controller's endpoint, on the embedded model with its chat template, for
a few steps; every trained sample is, token for token, the episode's recorded calls (the last call's context
+ output), with exactly the model's output ids in the loss, carrying their engine logprobs and versions.

The agent module is test instrumentation too: imported in the controller process, it logs each episode's
recorded calls (AgentTrace.episode) and each group the controller sends the trainer (Controller.send_batch)."""
from __future__ import annotations

import json

import pytest
from conftest import run_cli

from areal_py.models import EOS, build_char_tokenizer
from areal_py.telemetry.metrics import read_jsonl

AGENT = '''
import json, os, threading

import controller.controller as cc
from areal_py.workflow import agent_trace

LOG, LOCK = os.environ["AGENT_LOG"], threading.Lock()


def write(record):
    with LOCK, open(LOG, "a") as f:
        f.write(json.dumps(record) + "\\n")


_episode = agent_trace.AgentTrace.episode


def episode(self, reward):
    write({"kind": "trace", "prompt_ids": self.prompt_ids,
           "calls": [{"context": c.context, "output": c.turn.output_ids, "logprobs": c.turn.logprobs,
                      "versions": c.turn.versions} for c in self.calls]})
    return _episode(self, reward)


_send = cc.Controller.send_batch


def send_batch(self, batch):
    for g in batch.groups:
        for s in g.samples:
            write({"kind": "trained", "prompt_ids": list(g.prompt_ids), "output_ids": list(s.output_ids),
                   "loss_mask": list(s.loss_mask), "logprobs": list(s.logprobs), "versions": list(s.versions)})
    return _send(self, batch)


agent_trace.AgentTrace.episode = episode
cc.Controller.send_batch = send_batch


def solve(client, prompt):
    """Ask, then ask again with the reply sent back as the client returned it."""
    msgs = list(prompt.messages)
    first = client.chat.completions.create(model=prompt.model, messages=msgs)
    msgs += [first.choices[0].message.model_dump(), {"role": "user", "content": "?"}]
    second = client.chat.completions.create(model=prompt.model, messages=msgs, max_tokens=3)
    write({"kind": "texts", "texts": [first.choices[0].message.content, second.choices[0].message.content],
           "usage": [first.usage.completion_tokens, second.usage.completion_tokens]})
    return None  # the run's reward functions score the episode
'''


def test_openai_agent_trains_on_its_recorded_calls(tmp_path, small_cfg, monkeypatch):
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "two_call_agent.py").write_text(AGENT)
    log = tmp_path / "agent.jsonl"
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "agents"))
    monkeypatch.setenv("AGENT_LOG", str(log))
    res = run_cli(["run", "--quiet", *small_cfg, "task.chat_template=true", "cold_start.steps=10",
                   "trainer.total_steps=2", "rollout.max_new_tokens=4", "rollout.workflow=openai_agent",
                   "rollout.agent=two_call_agent:solve"], timeout=150)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(tmp_path / "runs" / "t" / "metrics.jsonl")] == [1, 2]

    records = [json.loads(line) for line in log.read_text().splitlines()]
    traces = [r for r in records if r["kind"] == "trace"]
    trained = [r for r in records if r["kind"] == "trained"]
    assert len(trained) >= 2 * 8 * 4 and all(len(t["calls"]) == 2 for t in traces)
    by_sequence: dict[tuple, list[dict]] = {}  # episodes of one prompt can sample the same tokens
    for t in traces:
        by_sequence.setdefault(tuple(t["calls"][-1]["context"] + t["calls"][-1]["output"]), []).append(t)
    eos = build_char_tokenizer().convert_tokens_to_ids(EOS)
    kept_eos = 0
    for s in trained:
        candidates = by_sequence[tuple(s["prompt_ids"] + s["output_ids"])]  # the whole sequence is the calls'
        model = [i for i, m in enumerate(s["loss_mask"]) if m]
        trace = next((t for t in candidates if [s["versions"][i] for i in model]
                      == t["calls"][0]["versions"] + t["calls"][1]["versions"]), None)
        assert trace is not None, f"no recorded episode has this sequence with these versions: {s}"
        candidates.remove(trace)  # each recorded episode is trained at most once
        first, second = trace["calls"]
        assert first["context"] == s["prompt_ids"] == trace["prompt_ids"]
        assert second["context"][:len(first["context"]) + len(first["output"])] == first["context"] + first["output"]
        kept_eos += first["output"][-1:] == [eos]
        # the loss covers exactly the two outputs; the bridge between them (template scaffolding, "?") is context
        n1, gap = len(first["output"]), len(second["context"]) - len(first["context"]) - len(first["output"])
        assert s["loss_mask"] == [1] * n1 + [0] * gap + [1] * len(second["output"])
        # logprobs cross the wire as float32
        assert [s["logprobs"][i] for i in model] == pytest.approx(first["logprobs"] + second["logprobs"], abs=1e-6)
    assert kept_eos > 0  # the model's own EOS stayed in the context where the template writes </assistant>
    texts = [r for r in records if r["kind"] == "texts"]
    assert len(texts) == len(traces)
