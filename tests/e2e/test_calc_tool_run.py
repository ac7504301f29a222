"""calc_tool end to end (issue 21): tool_loop on the embedded model calls the calculator, episodes are assembled
with the tool's result masked, and a hung and a crashing tool call are counted while the run finishes; the
multi-turn fields reach metrics.jsonl and the report. The learning run (reward gain >= 0.2) is `slow`."""
from __future__ import annotations

import os

import pytest
from conftest import SMALL_RUN, net_overrides, run_cli

from areal_py.telemetry.step_record import read_step_records

# A model that has learnt the call format (every cold-start example calls the tool): sized to build in seconds.
TINY_CALC = ["task.name=calc_tool", "task.min_operand=10", "task.max_operand=99", "task.direct_share=0",
             "cold_start.steps=60", "cold_start.batch_size=32", "cold_start.label_noise=0",
             "model.embedded.hidden_size=64", "model.embedded.num_layers=2", "model.embedded.intermediate_size=128",
             "model.embedded.max_position_embeddings=64", "rollout.max_new_tokens=20", "rollout.workflow=tool_loop"]

# The calculator, but the first call of the run hangs past tools.timeout_s and the second kills its worker
# (os._exit); which call is which is decided across worker processes by files created exclusively.
FAULTY_CALC = '''
import os
import time

from areal_py.tools.calculator import calculator


def _first(name):
    try:
        os.close(os.open(os.path.join(os.environ["CALC_FAULT_DIR"], name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def faulty(expression):
    if _first("hang"):
        time.sleep(60)
    if _first("crash"):
        os._exit(3)
    return calculator(expression)
'''


@pytest.fixture(scope="module")
def calc_cache(tmp_path_factory):
    from areal_py.app.model_dir import prepare_model
    from areal_py.config import load_config

    cache = tmp_path_factory.mktemp("calc-cache")
    prepare_model(load_config(None, [f"model.cache_dir={cache}", *SMALL_RUN, *TINY_CALC]))
    return cache


def test_tool_loop_run_counts_a_hung_and_a_crashing_tool(tmp_path, calc_cache, monkeypatch):
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "calc_faults.py").write_text(FAULTY_CALC)
    (tmp_path / "marks").mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "tools"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("CALC_FAULT_DIR", str(tmp_path / "marks"))
    res = run_cli(["run", "--quiet", f"run.output_dir={tmp_path / 'runs'}", "run.name=t", f"model.cache_dir={calc_cache}",
                   *SMALL_RUN, *net_overrides(), *TINY_CALC, "trainer.total_steps=2",
                   "rollout.tool_tags={calc: faulty}", "tools.custom={faulty: 'calc_faults:faulty'}",
                   "tools.timeout_s=1"], timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "marks").iterdir()) == ["crash", "hang"]
    rows = read_step_records(tmp_path / "runs" / "t" / "metrics.jsonl")
    assert [r.step for r in rows] == [1, 2]
    calls = sum(r.tool_calls for r in rows)
    assert calls >= 8, rows  # the cold-started model calls the tool
    assert sum(r.tool_timeouts for r in rows) == 1 and sum(r.tool_crashes for r in rows) == 1
    assert 2 <= sum(r.tool_errors for r in rows) <= calls
    assert all(r.tool_latency_mean_s > 0 for r in rows if r.tool_calls)
    assert sum(r.episodes for r in rows) >= 2 * 8 * 4  # every trained episode was settled before its batch left
    assert max(r.turns_per_episode for r in rows) > 1
    for r in rows:
        # tool output is in each trained sequence but out of the loss
        in_sequence = round(r.response_len_mean * r.samples)
        assert in_sequence > r.response_tokens, r
        assert 0 < r.tool_token_share < 1
        assert r.episodes_succeeded_with_tool <= r.episodes_succeeded
    html = (tmp_path / "runs" / "t" / "report.html").read_text()
    assert 'id="sec-episode_turns"' in html and 'id="sec-tool_faults"' in html


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_calc_tool_learns(tmp_path):
    """configs/calc_tool.yaml learns: first-10 -> last-10 training reward +0.2 or more, and most rewarded
    episodes of the last 10 steps called the tool (docs/multi-turn.md, "The agentic task")."""
    res = run_cli(["run", "configs/calc_tool.yaml", "--quiet", f"run.output_dir={tmp_path / 'runs'}", "run.name=t",
                   f"model.cache_dir={tmp_path / 'cache'}", "run.dashboard_port=0", *net_overrides()], timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = read_step_records(tmp_path / "runs" / "t" / "metrics.jsonl")
    first, last = rows[:10], rows[-10:]
    gain = sum(r.reward_mean for r in last) / 10 - sum(r.reward_mean for r in first) / 10
    assert gain >= 0.2, [r.reward_mean for r in rows]
    assert sum(r.episodes_succeeded_with_tool for r in last) >= 0.8 * sum(r.episodes_succeeded for r in last)
