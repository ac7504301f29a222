"""Multi-turn counts per step (issue 21): the controller's tally, the step record's fields built from a batch's
stats, and the report's multi-turn section shown for multi-turn runs only."""
from __future__ import annotations

import pytest

from areal_py.telemetry.report_sections import chart_sections
from areal_py.telemetry.step_record import StepRecord
from areal_py.tools.result import ToolResult
from areal_py.wire import protocol as P
from areal_py.workflow.api import Episode, Segment, Turn
from areal_py.workflow.assembly import assemble
from controller.episode_tally import EpisodeTally
from trainer.step_metrics import multi_turn_fields


def _episode(model: int, tool: int) -> Episode:
    turn = Turn(list(range(model)), [-0.1] * model, [0] * model, "stop")
    segs = [Segment.model(turn)] + ([Segment.context([1] * tool)] if tool else [])
    return Episode(segs)


def test_tally_counts_and_resets():
    t = EpisodeTally()
    t.tool_call(ToolResult(True, "42", None, "ok", 0.25))
    t.tool_call(ToolResult(False, "", "timed out", "timeout", 1.5))
    t.tool_call(ToolResult(False, "", "worker died", "crash", 0.25))
    t.tool_call(ToolResult(False, "", "ZeroDivisionError", "error", 0.0))
    eps = [assemble(_episode(6, 4)), assemble(_episode(10, 0))]
    infos = [{"turns": 2.0, "tool_calls": 1.0}, {"turns": 1.0, "tool_calls": 0.0}]
    t.settled(eps, infos)
    t.scored([1.0, 1.0], infos)
    t.scored([0.0, 0.5], [{"turns": 3.0, "tool_calls": 2.0}, {"turns": 1.0}])
    assert t.take() == {"episodes": 2, "episode_turns": 3, "tool_calls": 4, "tool_errors": 3, "tool_timeouts": 1,
                        "tool_crashes": 1, "episodes_succeeded": 3, "episodes_succeeded_with_tool": 1,
                        "tool_latency_mean_s": 0.5, "tool_token_share": 4 / 20}
    # emptied: no call and no episode since, so the two means are absent, not 0
    assert t.take() == {"episodes": 0, "episode_turns": 0, "tool_calls": 0, "tool_errors": 0, "tool_timeouts": 0,
                        "tool_crashes": 0, "episodes_succeeded": 0, "episodes_succeeded_with_tool": 0}


def test_step_record_fields_from_batch_stats():
    t = EpisodeTally()
    t.tool_call(ToolResult(True, "1", None, "ok", 0.125))
    t.settled([assemble(_episode(3, 1))] * 4, [{"turns": 2.0}, {"turns": 1.0}, {"turns": 3.0}, {"turns": 1.0}])
    ws = P.BatchStats(servers_live=1, **t.take())
    # the stats cross the wire as a flat map and come back equal
    assert P.BatchStats.model_validate(ws.model_dump()) == ws
    f = multi_turn_fields(ws)
    assert f["episodes"] == 4 and f["episode_turns"] == 7 and f["turns_per_episode"] == 1.75
    assert f["tool_calls"] == 1 and f["tool_latency_mean_s"] == 0.125 and f["tool_token_share"] == 0.25
    assert multi_turn_fields(P.BatchStats(servers_live=1)) == {}  # single-turn: no field at all
    with pytest.raises(ValueError):
        P.BatchStats(tool_token_share=1.5)


def _record(step: int, **kw) -> StepRecord:
    return StepRecord(step=step, wall_time_s=float(step), reward_mean=0.5, loss=0.1, clip_fraction=0.0, grad_norm=1.0,
                      publish_s=0.1, **kw)


def test_report_shows_the_multi_turn_section_only_for_multi_turn_runs():
    single = {s.chart_id for s in chart_sections([_record(1), _record(2)])}
    assert not single & {"episode_turns", "tool_shares", "tool_faults", "tool_latency"}
    multi = [_record(i, episodes=8, episode_turns=16, turns_per_episode=2.0, tool_calls=8, tool_errors=1,
                     tool_timeouts=1, tool_crashes=0, tool_latency_mean_s=0.01, tool_token_share=0.4,
                     episodes_succeeded=4, episodes_succeeded_with_tool=4) for i in (1, 2)]
    ids = {s.chart_id: s for s in chart_sections(multi)}
    assert {"episode_turns", "tool_shares", "tool_faults", "tool_latency"} <= set(ids)
    assert all(ids[k].svg for k in ("episode_turns", "tool_shares", "tool_faults", "tool_latency"))
