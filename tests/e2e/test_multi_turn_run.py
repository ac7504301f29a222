"""A multi-turn run end to end: a user workflow loaded by module:Class from outside the package runs two
turns per episode with a fake tool's output between them, on the embedded model; the run trains its steps
and every trained sample carries the tool tokens in its sequence but out of its loss."""
from __future__ import annotations

from conftest import run_cli

from areal_py.telemetry.metrics import read_jsonl

OBS = " = ?"  # the fake tool's observation: 4 characters, 4 tokens of the embedded character tokenizer

WORKFLOW = f'''
from areal_py.workflow.api import Episode, Segment
from areal_py.workflow.template import text_ids


class AskTwice:
    """Generate, append a fixed observation, generate again."""

    def __init__(self, settings):
        pass

    def run(self, prompt, prompt_ids, env):
        first = env.generate(prompt_ids)
        obs = text_ids(env.tokenizer, {OBS!r})
        second = env.generate(list(prompt_ids) + first.output_ids + obs)
        finish = "abort" if "abort" in (first.finish_reason, second.finish_reason) else second.finish_reason
        return Episode([Segment.model(first), Segment.context(obs), Segment.model(second)], finish_reason=finish)
'''


def test_user_workflow_run_trains_with_tool_tokens_masked(tmp_path, small_cfg, monkeypatch):
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "ask_twice.py").write_text(WORKFLOW)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "agents"))
    res = run_cli(["run", "--quiet", *small_cfg, "trainer.total_steps=3", "rollout.workflow=ask_twice:AskTwice",
                   "rollout.max_new_tokens=4"], timeout=150)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = read_jsonl(tmp_path / "runs" / "t" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        # each sample's sequence = turn 1 + the 4 observation tokens + turn 2; only the turns are in the loss
        in_sequence = round(r["response_len_mean"] * r["samples"])
        assert in_sequence - r["response_tokens"] == len(OBS) * r["samples"], r
        assert r["samples"] == 8 * 4
