"""GRPO / Dr.GRPO advantages on tiny hand-worked examples (population std, unbiased=False)."""
import math

import pytest
import torch

from trainer.advantages import expand_to_tokens, grpo_advantages


def test_grpo_2x3_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    # group 0: mean 1/3, deviations (2/3, -1/3, -1/3), var (4/9 + 1/9 + 1/9) / 3 = 2/9, std sqrt(2)/3
    #   A = (2/3) / (sqrt(2)/3) = sqrt(2),  (-1/3) / (sqrt(2)/3) = -1/sqrt(2)
    # group 1: mean 2, deviations (-1, 0, 1), var 2/3, std sqrt(2/3); A = -+sqrt(3/2)
    expected = torch.tensor([[1.41421356, -0.70710678, -0.70710678], [-1.22474487, 0.0, 1.22474487]])
    torch.testing.assert_close(grpo_advantages(rewards, eps=0.0), expected)


def test_grpo_eps_is_added_to_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    eps = 0.1
    std = math.sqrt(2) / 3                       # 0.47140452
    expected = torch.tensor([[(2 / 3) / (std + eps), (-1 / 3) / (std + eps), (-1 / 3) / (std + eps)]],
                            dtype=torch.float64)
    torch.testing.assert_close(grpo_advantages(rewards, eps=eps), expected)
    # default eps 1e-6 barely moves the value
    torch.testing.assert_close(grpo_advantages(rewards)[0, 0].item(), math.sqrt(2), rtol=1e-5, atol=0)


@pytest.mark.parametrize("std_normalize", [True, False])
def test_all_equal_group_gets_exactly_zero(std_normalize):
    # 0.1 is not exact in binary: mean(0.1, 0.1, 0.1) - 0.1 may be a rounding residue, which
    # 1 / eps would amplify; the rule must still give exactly 0
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    adv = grpo_advantages(rewards, std_normalize=std_normalize)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[:2], torch.zeros(2, 3))
    assert adv[2].abs().sum() > 0


def test_std_off_is_dr_grpo_r_minus_mean():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 4.0, 6.0, 0.0]])
    # means 0.25 and 3
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25], [-1.0, 1.0, 3.0, -3.0]])
    torch.testing.assert_close(grpo_advantages(rewards, std_normalize=False), expected)


@pytest.mark.parametrize("std_normalize", [True, False])
def test_one_sample_group(std_normalize):
    rewards = torch.tensor([[1.0], [0.0], [0.7]])
    adv = grpo_advantages(rewards, std_normalize=std_normalize)
    assert adv.shape == (3, 1)
    assert torch.equal(adv, torch.zeros(3, 1))


def test_integer_rewards_are_accepted():
    adv = grpo_advantages(torch.tensor([[1, 0]]), eps=0.0)
    # mean 0.5, population std 0.5
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1.0]]))


def test_grpo_bad_arguments():
    with pytest.raises(ValueError, match="rewards"):
        grpo_advantages(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="rewards"):
        grpo_advantages(torch.zeros(2, 0))
    with pytest.raises(ValueError, match="eps"):
        grpo_advantages(torch.zeros(2, 2), eps=-1.0)


def test_expand_to_tokens():
    values = torch.tensor([2.0, -0.5])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    expected = torch.tensor([[0.0, 2.0, 2.0, 0.0], [-0.5, -0.5, -0.5, -0.5]])
    assert torch.equal(expand_to_tokens(values, mask), expected)
    assert torch.equal(expand_to_tokens(values, mask.float()), expected)


def test_expand_to_tokens_bad_shapes():
    with pytest.raises(ValueError, match="seq_values"):
        expand_to_tokens(torch.zeros(2, 1), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        expand_to_tokens(torch.zeros(2), torch.ones(3, 3))
