"""Admission rule and sample staleness, numbers worked out by hand from
accepted + running < (version + max_staleness + 1) * batch_size."""
import pytest

from controller.staleness import (
    admission_capacity,
    can_admit,
    sample_staleness,
    within_bound,
)


def test_capacity_at_version_zero():
    # (0 + 2 + 1) * 4 = 12 slots, nothing used yet
    assert admission_capacity(0, 2, 4, accepted=0, running=0) == 12
    # 5 finished + 3 in flight leave 12 - 8 = 4
    assert admission_capacity(0, 2, 4, accepted=5, running=3) == 4
    assert can_admit(0, 2, 4, accepted=5, running=3)


def test_capacity_grows_as_versions_advance():
    # version 3, staleness 1, batch 8: (3 + 1 + 1) * 8 = 40; 24 accepted (3 batches) + 10 running = 34
    assert admission_capacity(3, 1, 8, accepted=24, running=10) == 6
    # one more version frees exactly one batch
    assert admission_capacity(4, 1, 8, accepted=24, running=10) == 14


def test_on_policy_admits_exactly_one_batch_per_version():
    batch = 4
    assert admission_capacity(0, 0, batch, accepted=0, running=0) == 4
    assert admission_capacity(0, 0, batch, accepted=0, running=4) == 0        # all 4 dispatched
    assert admission_capacity(0, 0, batch, accepted=4, running=0) == 0        # finished, not yet trained
    assert not can_admit(0, 0, batch, accepted=4, running=0)
    assert admission_capacity(1, 0, batch, accepted=4, running=0) == 4        # trained: version 1
    assert admission_capacity(1, 0, batch, accepted=7, running=1) == 0


def test_full_capacity_is_zero_never_negative():
    assert admission_capacity(0, 1, 2, accepted=4, running=0) == 0           # exactly full: 4 == (0+1+1)*2
    assert admission_capacity(0, 1, 2, accepted=3, running=5) == 0           # overshoot: 8 > 4, not -4
    assert not can_admit(0, 1, 2, accepted=3, running=5)


@pytest.mark.parametrize(
    "args, name",
    [
        ((-1, 0, 4, 0, 0), "version"),
        ((0, -1, 4, 0, 0), "max_staleness"),
        ((0, 0, 0, 0, 0), "batch_size"),
        ((0, 0, -2, 0, 0), "batch_size"),
        ((0, 0, 4, -1, 0), "accepted"),
        ((0, 0, 4, 0, -1), "running"),
        ((0, 0, 4.5, 0, 0), "batch_size"),
        ((0, True, 4, 0, 0), "max_staleness"),
    ],
)
def test_bad_arguments_raise(args, name):
    with pytest.raises(ValueError, match=name):
        admission_capacity(*args)
    with pytest.raises(ValueError, match=name):
        can_admit(*args)


def test_max_concurrent_none_is_the_staleness_rule_exactly():
    for args in [(0, 2, 4, 0, 0), (0, 2, 4, 5, 3), (3, 1, 8, 24, 10), (0, 1, 2, 3, 5)]:
        assert admission_capacity(*args, max_concurrent=None) == admission_capacity(*args)


def test_max_concurrent_bounds_what_is_in_flight():
    # staleness allows (0 + 2 + 1) * 4 = 12; at most 5 in flight: min(5 - 0, 12) = 5
    assert admission_capacity(0, 2, 4, accepted=0, running=0, max_concurrent=5) == 5
    # 3 running: min(5 - 3, 12 - 3) = 2
    assert admission_capacity(0, 2, 4, accepted=0, running=3, max_concurrent=5) == 2
    # the staleness bound is the tighter one: 8 accepted + 3 running leave 12 - 11 = 1 < 5 - 3 = 2
    assert admission_capacity(0, 2, 4, accepted=8, running=3, max_concurrent=5) == 1


def test_max_concurrent_reached_admits_nothing():
    assert admission_capacity(0, 2, 4, accepted=0, running=5, max_concurrent=5) == 0
    assert not can_admit(0, 2, 4, accepted=0, running=5, max_concurrent=5)
    # lowered below what is in flight (a resume with a smaller value): 0, not negative
    assert admission_capacity(0, 2, 4, accepted=0, running=7, max_concurrent=5) == 0
    # staleness capacity 0 with concurrency to spare: still nothing
    assert admission_capacity(0, 0, 4, accepted=4, running=0, max_concurrent=100) == 0
    assert can_admit(0, 2, 4, accepted=0, running=4, max_concurrent=5)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_max_concurrent_raises(bad):
    with pytest.raises(ValueError, match="max_concurrent"):
        admission_capacity(0, 2, 4, 0, 0, max_concurrent=bad)


def test_sample_staleness():
    assert sample_staleness(5, [5, 5, 5]) == 0
    assert sample_staleness(5, [3, 3]) == 2
    assert sample_staleness(0, []) == 0
    assert sample_staleness(7, ()) == 0


def test_interrupted_trajectory_is_as_old_as_its_oldest_token():
    # started under version 2, interrupted twice: tokens from versions 2, 3 and 4
    versions = [2, 2, 2, 3, 3, 4]
    assert sample_staleness(5, versions) == 3
    assert within_bound(5, versions, max_staleness=3)
    assert not within_bound(5, versions, max_staleness=2)


def test_within_bound_edges():
    assert within_bound(4, [], max_staleness=0)
    assert within_bound(4, [4, 4], max_staleness=0)
    assert not within_bound(4, [3, 4], max_staleness=0)
    with pytest.raises(ValueError, match="max_staleness"):
        within_bound(4, [4], max_staleness=-1)


def test_bad_versions_raise():
    with pytest.raises(ValueError, match="trainer_version"):
        sample_staleness(-1, [0])
    with pytest.raises(ValueError, match="token_versions"):
        sample_staleness(3, [2, 4])          # a token from the future
    with pytest.raises(ValueError, match="token_versions"):
        sample_staleness(3, [-1, 2])
