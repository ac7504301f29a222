"""The report's per-rank charts: drawn only for runs with several trainer ranks."""
from __future__ import annotations

from areal_py.telemetry.report_sections import chart_sections, rank_sections
from areal_py.telemetry.step_record import StepRecord


def test_two_ranks_get_a_time_and_a_token_chart():
    recs = [StepRecord(step=s, rank_busy_s=[1.0 + s, 2.0], rank_tokens=[100, 90 + s], rank_tokens_max=100,
                       rank_tokens_min=90 + s) for s in (1, 2, 3)]
    secs = {s.chart_id: s for s in rank_sections(recs)}
    assert set(secs) == {"rank_busy", "rank_tokens"}
    assert 'data-series="rank 1"' in secs["rank_busy"].svg and 'data-series="rank 0"' in secs["rank_tokens"].svg
    assert 'data-y="93' in secs["rank_tokens"].svg  # rank 1's tokens at step 3
    assert {"rank_busy", "rank_tokens"} <= {s.chart_id for s in chart_sections(recs)}


def test_one_rank_or_old_records_get_none():
    assert rank_sections([StepRecord(step=1, rank_busy_s=[1.0], rank_tokens=[5])]) == []
    assert rank_sections([StepRecord(step=1)]) == []
