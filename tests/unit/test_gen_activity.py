"""Generation activity bookkeeping by hand: spans, slot-seconds, occupancy, the controller's per-server
accounting, the trainer's time base, and the report timeline drawn from them."""
import pytest

from areal_py.telemetry.gen_activity import (
    MAX_SPANS,
    BusyMeter,
    merge_spans,
    slot_occupancy,
    to_run_time,
)
from areal_py.telemetry.report import timeline_lanes
from areal_py.telemetry.step_record import StepRecord
from areal_py.wire import protocol as P
from controller.activity import Activity, ActivityTracker


def test_merge_spans_unions_close_intervals_and_bounds_the_count():
    assert merge_spans([(3, 4), (0, 1), (1.02, 2)], gap=0.05) == [(0, 2), (3, 4)]
    assert merge_spans([(0, 1), (0.5, 0.7)]) == [(0, 1)]          # contained
    assert merge_spans([(2, 1)]) == []                            # reversed: dropped
    assert merge_spans([(0, 1), (1.002, 2), (2.02, 3)]) == [(0, 2), (2.02, 3)]  # default gap: a few ms
    # cap 2: the smallest gap (between 1 and 1.5) is closed first, the big idle period stays
    assert merge_spans([(0, 1), (1.5, 2), (10, 11)], gap=0.05, max_spans=2) == [(0, 2), (10, 11)]
    many = merge_spans([(i, i + 0.5) for i in range(1000)])
    assert len(many) == MAX_SPANS and many[0][0] == 0 and many[-1][1] == 999.5


def test_busy_meter_integrates_busy_time_and_slot_seconds():
    m = BusyMeter(now=100.0)
    m.tick(101.0, running=0)          # idle 100..101
    m.tick(102.0, running=4)          # busy from 102 with 4 slots
    m.tick(104.0, running=2)          # 102..104: 2 s x 4 slots
    assert m.tick(105.0, running=0)   # 104..105: 1 s x 2 slots; span closes at 105
    assert not m.tick(107.0, running=1, busy=True)
    assert m.busy_s == pytest.approx(3.0) and m.slot_seconds == pytest.approx(10.0)
    assert m.drain_spans(108.0) == [(102.0, 105.0), (107.0, 108.0)]  # the open span is cut at "now"
    m.tick(109.0, running=0)
    assert m.drain_spans(110.0) == [(108.0, 109.0)]                   # ...and continues from there
    assert m.drain_spans(111.0) == []
    assert m.busy_s == pytest.approx(5.0) and m.slot_seconds == pytest.approx(12.0) and m.started == 100.0


def test_busy_meter_bounds_what_one_heartbeat_carries():
    m = BusyMeter(now=0.0)
    for i in range(500):  # 500 short bursts with 10 ms idle between them
        m.tick(i * 0.02, running=1)
        m.tick(i * 0.02 + 0.01, running=0)
    spans = m.drain_spans(20.0)
    assert len(spans) == MAX_SPANS and spans[0][0] == 0.0 and spans[-1][1] == pytest.approx(9.99)


def test_slot_occupancy():
    assert slot_occupancy(30.0, 10.0, 6) == pytest.approx(0.5)
    assert slot_occupancy(1.0, 0.0, 6) is None and slot_occupancy(1.0, 1.0, 0) is None
    assert slot_occupancy(99.0, 1.0, 2) == 1.0  # clamped


def test_spans_move_to_the_run_time_base():
    """Epoch seconds minus the epoch of wall_time_s == 0, rounded to ms: the axis of wall_time_s."""
    epoch0 = 1_700_000_000.0
    assert to_run_time([(epoch0 + 1.23456, epoch0 + 2.5)], epoch0) == [[1.235, 2.5]]
    assert to_run_time([], epoch0) == []


def hb(server: str, started: float, at: float, slot_seconds: float, busy_s: float, max_running: int = 4,
       spans: list | None = None) -> P.Heartbeat:
    return P.Heartbeat(server_id=server, version=0, running=0, waiting=0, generated_tokens=0, busy_s=busy_s,
                       slot_seconds=slot_seconds, max_running=max_running, started=started, at=at, spans=spans or [])


def test_tracker_averages_occupancy_over_live_servers_per_batch():
    t = ActivityTracker()
    t.add("a", hb("a", 100.0, 104.0, slot_seconds=8.0, busy_s=2.0, spans=[(101.0, 103.0)]), received=0)
    t.add("b", hb("b", 100.0, 110.0, slot_seconds=4.0, busy_s=1.0, max_running=2, spans=[(102.5, 103.5)]), received=0)
    a = t.take(["a", "b"])
    # a: 8 slot-s over 4 s of 4 slots = 0.5; b: 4 over 10 s of 2 slots = 0.2; mean over servers 0.35
    assert (a.gen_busy_s, a.rollout_slot_occupancy) == (pytest.approx(3.0), pytest.approx(0.35))
    assert a.spans == [(101.0, 103.5)]
    # the next batch counts only what came after: a adds 4 slot-s over 2 s (0.5); b is dead, not averaged
    t.add("a", hb("a", 100.0, 106.0, slot_seconds=12.0, busy_s=3.0, spans=[(105.0, 106.0)]), received=0)
    a = t.take(["a"])
    assert (a.gen_busy_s, a.rollout_slot_occupancy) == (pytest.approx(1.0), pytest.approx(0.5))
    assert a.spans == [(105.0, 106.0)]
    assert t.take(["a"]) == Activity(0.0, None, [])  # no heartbeat since: no occupancy to report


def test_tracker_handles_a_restarted_server_and_old_heartbeats():
    t = ActivityTracker()
    t.add("a", hb("a", 100.0, 110.0, slot_seconds=20.0, busy_s=5.0), received=0)
    t.take(["a"])
    t.add("a", hb("a", 200.0, 202.0, slot_seconds=2.0, busy_s=1.0), received=0)  # new process, same id
    a = t.take(["a"])
    assert (a.gen_busy_s, a.rollout_slot_occupancy) == (pytest.approx(1.0), pytest.approx(0.25))
    old = P.Heartbeat(server_id="o", version=0, running=0, waiting=0, generated_tokens=0)  # before activity fields
    t.add("o", old, received=300.0)
    t.add("o", old, received=301.0)
    assert t.take(["o"]) == Activity(0.0, None, [])  # counted as nothing, never an error


def test_tracker_keeps_its_span_list_bounded():
    t = ActivityTracker()
    for i in range(50):
        t.add("a", hb("a", 0.0, i + 1.0, slot_seconds=0.0, busy_s=0.0,
                      spans=[(i + k / 20, i + k / 20 + 0.01) for k in range(20)]), received=0)
        assert len(t.spans) <= 4 * MAX_SPANS + 20
    assert len(t.take(["a"]).spans) == MAX_SPANS


def test_sync_like_timeline_keeps_generation_and_training_apart():
    """Sync mode: generation happens while the trainer waits; the measured spans must show that."""
    recs = [StepRecord(step=1, wall_time_s=3.0, wait_s=2.0, train_s=1.0, publish_s=0.0, gen_spans=[(0.9, 2.0)]),
            StepRecord(step=2, wall_time_s=6.0, wait_s=2.0, train_s=1.0, publish_s=0.0, gen_spans=[(3.0, 4.9)])]
    lanes = dict(timeline_lanes(recs))
    train = [(s.start, s.end) for s in lanes["trainer"] if s.kind == "train"]
    gen = [(s.start, s.end) for s in lanes["generation"]]
    assert gen == [(0.9, 2.0), (3.0, 4.9)] and train == [(2.0, 3.0), (5.0, 6.0)]
    assert not any(a < d and c < b for a, b in gen for c, d in train)  # no overlap
    # the same run without gen_spans (an old metrics.jsonl) falls back to step-interval rollout lanes,
    # which cover the training phases: the picture the spans replace
    old = [r.model_copy(update={"gen_spans": None, "generated_tokens": 10 * (i + 1)}) for i, r in enumerate(recs)]
    lanes = dict(timeline_lanes(old))
    assert "generation" not in lanes and [(s.start, s.end) for s in lanes["rollout"]] == [(0.0, 3.0), (3.0, 6.0)]
