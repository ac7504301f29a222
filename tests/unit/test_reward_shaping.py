"""Reward shaping on hand-worked numbers: scale, clip, batch / group normalisation, DAPO overlong
penalty, zero reward for truncated responses, uniform groups for DAPO dynamic sampling."""
import math

import pytest
import torch

from trainer.algo.reward_shaping import (
    batch_normalize,
    clip_rewards,
    group_normalize,
    overlong_penalty,
    scale_rewards,
    uniform_groups,
    zero_truncated,
)


def test_scale_and_clip():
    torch.testing.assert_close(scale_rewards(torch.tensor([1.0, -2.0, 0.0]), 0.5), torch.tensor([0.5, -1.0, 0.0]))
    torch.testing.assert_close(clip_rewards(torch.tensor([-3.0, 0.5, 3.0]), -1.0, 1.0), torch.tensor([-1.0, 0.5, 1.0]))
    torch.testing.assert_close(clip_rewards(torch.tensor([-3.0, 0.5, 3.0]), low=0.0), torch.tensor([0.0, 0.5, 3.0]))
    torch.testing.assert_close(clip_rewards(torch.tensor([[1, 5]]), high=2.0), torch.tensor([[1.0, 2.0]]))


def test_clip_with_both_sides_open_returns_the_rewards():
    r = torch.tensor([-3.0, 0.5, 3.0])
    out = clip_rewards(r, None, None)
    torch.testing.assert_close(out, torch.tensor([-3.0, 0.5, 3.0]))
    out[0] = 9.0                                   # a new tensor, as when a side is clipped
    assert r[0] == -3.0
    torch.testing.assert_close(clip_rewards(torch.tensor([1, 5])), torch.tensor([1.0, 5.0]))
    torch.testing.assert_close(clip_rewards(r, None, 1.0), torch.tensor([-3.0, 0.5, 1.0]))
    torch.testing.assert_close(clip_rewards(r, -1.0, None), torch.tensor([-1.0, 0.5, 3.0]))


def test_batch_normalize_by_hand():
    # (0, 2, 2, 4): mean 2, deviations (-2, 0, 0, 2), population var 8/4 = 2, std sqrt(2)
    r = torch.tensor([0.0, 2.0, 2.0, 4.0])
    s = math.sqrt(2)
    torch.testing.assert_close(batch_normalize(r, eps=0.0), torch.tensor([-2 / s, 0.0, 0.0, 2 / s]))
    # the whole batch, whatever the shape: [[0, 2], [2, 4]] is the same four numbers
    torch.testing.assert_close(batch_normalize(r.reshape(2, 2), eps=0.0), torch.tensor([[-2 / s, 0.0], [0.0, 2 / s]]))


def test_batch_normalize_equal_rewards_give_exactly_zero():
    assert torch.equal(batch_normalize(torch.tensor([0.1, 0.1, 0.1])), torch.zeros(3))
    assert torch.equal(batch_normalize(torch.tensor([0.7])), torch.zeros(1))


def test_group_normalize_by_hand():
    # group 0: mean 1/3, std sqrt(2)/3 -> (sqrt 2, -1/sqrt 2, -1/sqrt 2); group 1: identical -> 0
    r = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    expected = torch.tensor([[math.sqrt(2), -1 / math.sqrt(2), -1 / math.sqrt(2)], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(group_normalize(r, eps=0.0), expected)
    # std off (Dr.GRPO): r - mean
    torch.testing.assert_close(group_normalize(r, std_normalize=False),
                               torch.tensor([[2 / 3, -1 / 3, -1 / 3], [0.0, 0.0, 0.0]]))


def test_overlong_penalty_by_hand():
    # max_len 20, cache 4 -> soft zone 16 < L <= 20, penalty (16 - L) / 4
    #   L:  0   10  16  17     18    20  21
    #       0   0   0   -0.25  -0.5  -1  -1
    lengths = torch.tensor([0, 10, 16, 17, 18, 20, 21])
    expected = torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, max_len=20, cache_len=4), expected)
    torch.testing.assert_close(overlong_penalty([0, 10, 16, 17, 18, 20, 21], 20, 4, factor=0.5), expected * 0.5)


def test_overlong_penalty_without_cache_is_a_hard_step():
    # cache 0: nothing up to max_len, -1 beyond
    torch.testing.assert_close(overlong_penalty([19, 20, 21], max_len=20, cache_len=0), torch.tensor([0.0, 0.0, -1.0]))
    # cache = max_len: linear from length 0: (0 - L) / 20
    torch.testing.assert_close(overlong_penalty([0, 5, 20], max_len=20, cache_len=20), torch.tensor([0.0, -0.25, -1.0]))


def test_overlong_penalty_bad_arguments():
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty([1], max_len=10, cache_len=11)
    with pytest.raises(ValueError, match="max_len"):
        overlong_penalty([1], max_len=0, cache_len=0)
    with pytest.raises(ValueError, match="lengths"):
        overlong_penalty([-1, 3], max_len=10, cache_len=2)
    with pytest.raises(ValueError, match="lengths"):
        overlong_penalty(torch.tensor([1.5]), max_len=10, cache_len=2)


def test_zero_truncated():
    r = torch.tensor([[1.0, 0.5], [1.0, -1.0]])
    truncated = torch.tensor([[False, True], [True, False]])
    torch.testing.assert_close(zero_truncated(r, truncated), torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    with pytest.raises(ValueError, match="truncated"):
        zero_truncated(r, truncated[0])


def test_uniform_groups():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.1, 0.1, 0.1], [0.0, 0.0, 0.0]])
    assert uniform_groups(r).tolist() == [True, False, True, True]
    assert uniform_groups(torch.tensor([[0.3], [1.0]])).tolist() == [True, True]      # one-sample groups
    with pytest.raises(ValueError, match="rewards"):
        uniform_groups(torch.tensor([1.0, 1.0]))


def test_shaping_bad_arguments():
    with pytest.raises(ValueError, match="scale"):
        scale_rewards(torch.ones(2), float("inf"))
    with pytest.raises(ValueError, match="low"):
        clip_rewards(torch.ones(2), 1.0, 0.0)
    with pytest.raises(ValueError, match="eps"):
        batch_normalize(torch.ones(2), eps=-1.0)
    with pytest.raises(ValueError, match="rewards"):
        scale_rewards([1.0, 2.0], 2.0)
