"""Batch selection: oldest admissible groups first, groups past the hard staleness limit dropped."""
import pytest

from areal_py.wire import protocol as P
from controller.batching import pick_batch


def group(gid: int, versions: list[int]) -> P.Group:
    s = P.Sample(output_ids=[2] * len(versions), logprobs=[-0.1] * len(versions), versions=versions,
                 finish_reason="stop", reward=1.0)
    return P.Group(gid=gid, prompt_index=gid, prompt_ids=[1], samples=[s])


def test_oldest_first_and_ties_keep_completion_order():
    ready = [group(1, [3]), group(2, [1]), group(3, [2]), group(4, [1])]  # ages at batch 3: 0, 2, 1, 2
    pick = pick_batch(ready, batch_version=3, batch_size=3, max_token_staleness=2)
    assert [g.gid for g in pick.groups] == [2, 4, 3]
    assert pick.ages == [2, 2, 1]
    assert [g.gid for g in pick.remaining] == [1] and pick.dropped == 0


def test_a_group_is_as_old_as_its_oldest_token_and_too_old_ones_are_dropped():
    ready = [group(1, [0, 4, 5]), group(2, [4, 5]), group(3, [5])]  # ages at batch 5: 5, 1, 0
    pick = pick_batch(ready, batch_version=5, batch_size=2, max_token_staleness=4)
    assert pick.dropped == 1
    assert [g.gid for g in pick.groups] == [2, 3] and pick.ages == [1, 0] and pick.remaining == []


def test_too_few_admissible_groups_make_no_batch_but_drops_still_count():
    ready = [group(1, [0]), group(2, [3])]
    pick = pick_batch(ready, batch_version=3, batch_size=2, max_token_staleness=2)
    assert pick.groups == [] and pick.ages == []
    assert [g.gid for g in pick.remaining] == [2] and pick.dropped == 1


def test_a_token_newer_than_the_batch_is_an_error():
    with pytest.raises(ValueError, match="newer than trainer_version"):
        pick_batch([group(1, [4])], batch_version=3, batch_size=1, max_token_staleness=2)
