"""Generation activity bookkeeping by hand: spans, slot-seconds, occupancy, and the report timeline."""
import pytest

from areal_py.gen_activity import BusyMeter, merge_spans, slot_occupancy
from areal_py.report import timeline_lanes


def test_merge_spans_unions_close_intervals_and_bounds_the_count():
    assert merge_spans([(3, 4), (0, 1), (1.02, 2)], gap=0.05) == [(0, 2), (3, 4)]
    assert merge_spans([(0, 1), (0.5, 0.7)]) == [(0, 1)]          # contained
    assert merge_spans([(2, 1)]) == []                            # reversed: dropped
    # cap 2: the smallest gap (between 1 and 1.5) is closed first, the big idle period stays
    assert merge_spans([(0, 1), (1.5, 2), (10, 11)], gap=0.05, max_spans=2) == [(0, 2), (10, 11)]


def test_busy_meter_integrates_busy_time_and_slot_seconds():
    m = BusyMeter(now=100.0)
    m.tick(101.0, running=0)          # idle 100..101
    m.tick(102.0, running=4)          # busy from 102 with 4 slots
    m.tick(104.0, running=2)          # 102..104: 2 s x 4 slots
    m.tick(105.0, running=0)          # 104..105: 1 s x 2 slots; span closes at 105
    m.tick(107.0, running=1, busy=True)
    assert m.busy_s == pytest.approx(3.0) and m.slot_seconds == pytest.approx(10.0)
    assert m.drain_spans(108.0) == [(102.0, 105.0), (107.0, 108.0)]  # the open span is cut at "now"
    m.tick(109.0, running=0)
    assert m.drain_spans(110.0) == [(108.0, 109.0)]                   # ...and continues from there
    assert m.busy_s == pytest.approx(5.0) and m.slot_seconds == pytest.approx(12.0)


def test_slot_occupancy():
    assert slot_occupancy(30.0, 10.0, 6) == pytest.approx(0.5)
    assert slot_occupancy(1.0, 0.0, 6) is None and slot_occupancy(1.0, 1.0, 0) is None
    assert slot_occupancy(99.0, 1.0, 2) == 1.0  # clamped: heartbeats can land just across a batch boundary


def test_sync_like_timeline_keeps_generation_and_training_apart():
    """Sync mode: generation happens while the trainer waits; the measured spans must show that."""
    recs = [{"wall_time_s": 3.0, "wait_s": 2.0, "train_s": 1.0, "publish_s": 0.0, "gen_spans": [[0.9, 2.0]]},
            {"wall_time_s": 6.0, "wait_s": 2.0, "train_s": 1.0, "publish_s": 0.0, "gen_spans": [[3.0, 4.9]]}]
    lanes = dict(timeline_lanes(recs))
    train = [(s.start, s.end) for s in lanes["trainer"] if s.kind == "train"]
    gen = [(s.start, s.end) for s in lanes["generation"]]
    assert gen == [(0.9, 2.0), (3.0, 4.9)] and train == [(2.0, 3.0), (5.0, 6.0)]
    assert not any(a < d and c < b for a, b in gen for c, d in train)  # no overlap
