"""controller/progress.py: which dispatched attempts have shown no sign of life for group_timeout_s."""
from __future__ import annotations

from controller.progress import AttemptClocks


def test_an_attempt_is_overdue_only_after_the_timeout_with_no_sign_of_life():
    c = AttemptClocks(timeout_s=10)
    c.dispatched(1, 0, "a", now=0)
    c.dispatched(2, 0, "b", now=3)
    assert c.overdue(10) == []  # exactly the timeout is not past it
    assert c.overdue(10.5) == [1]
    assert c.overdue(14) == [1, 2]  # oldest first
    c.result(1, now=12)  # one of its samples came back
    assert c.overdue(14) == [2]
    assert c.overdue(22.5) == [2, 1]  # 2 has been silent longer


def test_a_heartbeat_listing_the_current_attempt_keeps_it_alive_and_nothing_else_does():
    c = AttemptClocks(timeout_s=10)
    c.dispatched(1, 2, "a", now=0)
    c.held("a", [(1, 1)], now=9)  # an older attempt of the group, still running there: not this one
    c.held("b", [(1, 2)], now=9)  # another server's claim
    c.held("a", None, now=9)  # a sender that does not say what it holds
    assert c.overdue(11) == [1]
    c.held("a", [(7, 0), (1, 2)], now=9)
    assert c.overdue(11) == [] and c.overdue(19.5) == [1]


def test_a_finished_or_moved_attempt_has_no_clock_until_it_is_dispatched_again():
    c = AttemptClocks(timeout_s=1)
    c.dispatched(1, 0, "a", now=0)
    c.done(1)
    c.result(1, now=5)  # a late result after the group moved does not bring a clock back
    c.held("a", [(1, 0)], now=5)
    assert c.overdue(100) == []
    c.dispatched(1, 1, "b", now=100)
    assert c.overdue(101.5) == [1]
