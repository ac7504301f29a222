"""Advantage estimators on tiny hand-worked examples (population std, unbiased=False):
GRPO / Dr.GRPO, RLOO, REINFORCE with a batch baseline, REINFORCE++, GAE and the clipped value loss.
Every expected number is worked out in the comments, never by calling the code under test."""
import math

import pytest
import torch

from trainer.algo.advantages import (
    expand_to_tokens,
    gae_advantages,
    grpo_advantages,
    reinforce_baseline_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    value_loss,
)

F64 = torch.float64
NAN = float("nan")


def t(rows):
    return torch.tensor(rows, dtype=F64)


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


# ----------------------------------------------------------------------------- RLOO


def test_rloo_by_hand():
    rewards = t([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]])
    # group 0: baseline of sample 0 = mean(0, 0, 1) = 1/3 -> 2/3; of sample 1 = mean(1, 0, 1) = 2/3 -> -2/3
    # group 1: sample 0: mean(1, 2, 2) = 5/3 -> 4/3; sample 1: mean(3, 2, 2) = 7/3 -> -4/3;
    #          samples 2, 3: mean(3, 1, 2) = 2 -> 0
    expected = t([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [4 / 3, -4 / 3, 0.0, 0.0]])
    torch.testing.assert_close(rloo_advantages(rewards), expected)


def test_rloo_is_dr_grpo_scaled_by_n_over_n_minus_1():
    # r_i - (S - r_i)/(n-1) = (n r_i - S)/(n-1) = n/(n-1) (r_i - mean): group [3, 1, 2] -> 3/2 * (1, -1, 0)
    rewards = t([[3.0, 1.0, 2.0]])
    torch.testing.assert_close(rloo_advantages(rewards), t([[1.5, -1.5, 0.0]]))
    torch.testing.assert_close(rloo_advantages(rewards), 1.5 * grpo_advantages(rewards, std_normalize=False))


def test_rloo_identical_rewards_and_one_sample_groups_give_exactly_zero():
    adv = rloo_advantages(torch.tensor([[0.1, 0.1, 0.1], [1.0, 0.0, 1.0]]))
    assert torch.equal(adv[0], torch.zeros(3))
    torch.testing.assert_close(adv[1], torch.tensor([0.5, -1.0, 0.5]))     # 1 - 0.5, 0 - 1, 1 - 0.5
    assert torch.equal(rloo_advantages(torch.tensor([[1.0], [0.3]])), torch.zeros(2, 1))


def test_rloo_bad_arguments():
    with pytest.raises(ValueError, match="rewards"):
        rloo_advantages(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="rewards"):
        rloo_advantages(torch.zeros(3, 0))


# ----------------------------------------------------------------------------- REINFORCE, batch baseline


def test_reinforce_baseline_by_hand():
    # mean (1 + 0 + 0 + 3) / 4 = 1
    torch.testing.assert_close(reinforce_baseline_advantages(t([1.0, 0.0, 0.0, 3.0])), t([0.0, -1.0, -1.0, 2.0]))


def test_reinforce_baseline_equal_rewards_and_single_sample():
    assert torch.equal(reinforce_baseline_advantages(torch.tensor([0.1, 0.1, 0.1])), torch.zeros(3))
    assert torch.equal(reinforce_baseline_advantages(torch.tensor([0.7])), torch.zeros(1))
    torch.testing.assert_close(reinforce_baseline_advantages(torch.tensor([1, 0])), torch.tensor([0.5, -0.5]))


def test_reinforce_baseline_bad_shape():
    with pytest.raises(ValueError, match="rewards"):
        reinforce_baseline_advantages(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="rewards"):
        reinforce_baseline_advantages(torch.zeros(0))


# ----------------------------------------------------------------------------- REINFORCE++

# row 0: prompt at position 0, three response tokens; row 1: a one-token response among padding;
# row 2: a zero-length response. Masked positions hold NaN: they must never be read.
PP_MASK = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
PP_REWARDS = t([[NAN, 2.0, -1.0, 2.0], [NAN, NAN, 0.0, NAN], [NAN, NAN, NAN, NAN]])


def test_reinforce_pp_discounted_by_hand():
    # gamma 0.5, row 0 from the end: G3 = 2, G2 = -1 + 0.5*2 = 0, G1 = 2 + 0.5*0 = 2; row 1: G = 0
    # valid returns {2, 0, 2, 0}: mean 1, population std 1 -> A = G - 1
    adv = reinforce_pp_advantages(PP_REWARDS, PP_MASK, gamma=0.5, eps=0.0)
    expected = t([[0.0, 1.0, -1.0, 1.0], [0.0, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected)
    # default eps 1e-6 is added to the std: 1 / (1 + 1e-6)
    torch.testing.assert_close(reinforce_pp_advantages(PP_REWARDS, PP_MASK, gamma=0.5), expected / (1 + 1e-6))


def test_reinforce_pp_undiscounted_by_hand():
    # gamma 1: G3 = 2, G2 = -1 + 2 = 1, G1 = 2 + 1 = 3; row 1: 0
    # {3, 1, 2, 0}: mean 1.5, deviations (1.5, -0.5, 0.5, -1.5), var (2.25+0.25+0.25+2.25)/4 = 1.25
    s = math.sqrt(1.25)
    adv = reinforce_pp_advantages(PP_REWARDS, PP_MASK, eps=0.0)
    expected = t([[0.0, 1.5 / s, -0.5 / s, 0.5 / s], [0.0, 0.0, -1.5 / s, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected)


def test_reinforce_pp_kl_folded_in_by_the_caller():
    # score 1 on the last token, KL penalty 0.1 per token: rewards (-0.1, -0.1, 0.9), gamma 1
    # -> G = (0.7, 0.8, 0.9); second row: a one-token response with reward -0.1 -> G = -0.1
    # {0.7, 0.8, 0.9, -0.1}: mean 0.575, deviations (0.125, 0.225, 0.325, -0.675),
    # var (0.015625 + 0.050625 + 0.105625 + 0.455625) / 4 = 0.156875
    rewards = t([[-0.1, -0.1, 0.9], [-0.1, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    s = math.sqrt(0.156875)
    expected = t([[0.125 / s, 0.225 / s, 0.325 / s], [-0.675 / s, 0.0, 0.0]])
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, eps=0.0), expected)


def test_reinforce_pp_equal_returns_and_empty_batch_give_zero():
    # one valid token in the whole batch, or all returns equal: no signal, exactly 0
    mask = torch.tensor([[0, 1, 0]], dtype=torch.bool)
    assert torch.equal(reinforce_pp_advantages(t([[NAN, 0.1, NAN]]), mask), torch.zeros(1, 3, dtype=F64))
    mask2 = torch.tensor([[1, 0], [1, 0]], dtype=torch.bool)
    assert torch.equal(reinforce_pp_advantages(t([[0.1, 5.0], [0.1, 5.0]]), mask2), torch.zeros(2, 2, dtype=F64))
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert torch.equal(reinforce_pp_advantages(t([[NAN] * 3] * 2), empty), torch.zeros(2, 3, dtype=F64))


def test_reinforce_pp_bad_arguments():
    with pytest.raises(ValueError, match="gamma"):
        reinforce_pp_advantages(PP_REWARDS, PP_MASK, gamma=1.5)
    with pytest.raises(ValueError, match="token_rewards"):
        reinforce_pp_advantages(PP_REWARDS[:, :3], PP_MASK)
    with pytest.raises(ValueError, match="eps"):
        reinforce_pp_advantages(PP_REWARDS, PP_MASK, eps=-1.0)


# ----------------------------------------------------------------------------- GAE

# row 0: prompt position 0 (NaN: never read), response of 3 tokens, reward 1 on the last;
# row 1: one-token response at position 2, reward 2; row 2: zero-length response.
GAE_MASK = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
GAE_REWARDS = t([[NAN, 0.0, 0.0, 1.0], [NAN, NAN, 2.0, 7.0], [3.0, 3.0, 3.0, 3.0]])
GAE_VALUES = t([[NAN, 0.5, 0.4, 0.8], [9.0, 9.0, 0.5, 7.0], [1.0, 1.0, 1.0, 1.0]])


def test_gae_by_hand():
    # gamma = lam = 0.5, so gamma*lam = 0.25. Row 0 from the end (bootstrap 0 after t=3):
    #   t=3: delta = 1 + 0.5*0 - 0.8 = 0.2                 A = 0.2
    #   t=2: delta = 0 + 0.5*0.8 - 0.4 = 0.0               A = 0 + 0.25*0.2 = 0.05
    #   t=1: delta = 0 + 0.5*0.4 - 0.5 = -0.3              A = -0.3 + 0.25*0.05 = -0.2875
    #   returns A + V: 1.0, 0.45, 0.2125
    # Row 1: one token, delta = 2 - 0.5 = 1.5 = A, return 2. Row 2: nothing valid, all 0.
    adv, ret = gae_advantages(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, t([[0.0, -0.2875, 0.05, 0.2], [0.0, 0.0, 1.5, 0.0], [0.0] * 4]))
    torch.testing.assert_close(ret, t([[0.0, 0.2125, 0.45, 1.0], [0.0, 0.0, 2.0, 0.0], [0.0] * 4]))


def test_gae_lambda_one_is_monte_carlo_and_lambda_zero_is_td():
    # gamma = lam = 1: A_t = (sum of future rewards) - V_t = 1 - V_t -> (0.5, 0.6, 0.2); returns all 1
    adv, ret = gae_advantages(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv[0], t([0.0, 0.5, 0.6, 0.2]))
    torch.testing.assert_close(ret[0], t([0.0, 1.0, 1.0, 1.0]))
    # lam = 0, gamma = 1: A_t = delta_t = r_t + V_{t+1} - V_t -> (0.4 - 0.5, 0.8 - 0.4, 1 - 0.8)
    adv, ret = gae_advantages(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=1.0, lam=0.0)
    torch.testing.assert_close(adv[0], t([0.0, -0.1, 0.4, 0.2]))
    torch.testing.assert_close(ret[0], t([0.0, 0.4, 0.8, 1.0]))      # one-step TD targets r + V_{t+1}


def test_gae_skips_masked_positions_inside_a_row():
    # mask (1, 0, 1): the masked middle is skipped, position 2 is the next step of position 0
    # gamma 0.5, lam 0.5: t=2: delta = 1 - 0.8 = 0.2 = A; t=0: delta = 0 + 0.5*0.8 - 0.5 = -0.1,
    # A = -0.1 + 0.25*0.2 = -0.05
    adv, ret = gae_advantages(t([[0.0, 100.0, 1.0]]), t([[0.5, 100.0, 0.8]]),
                              torch.tensor([[1, 0, 1]], dtype=torch.bool), gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, t([[-0.05, 0.0, 0.2]]))
    torch.testing.assert_close(ret, t([[0.45, 0.0, 1.0]]))


def test_gae_outputs_carry_no_gradient():
    values = GAE_VALUES.clone().requires_grad_(True)
    adv, ret = gae_advantages(GAE_REWARDS, values, GAE_MASK, gamma=1.0, lam=0.95)
    assert not adv.requires_grad and not ret.requires_grad
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()


def test_gae_bad_arguments():
    with pytest.raises(ValueError, match="gamma"):
        gae_advantages(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=1.5, lam=0.9)
    with pytest.raises(ValueError, match="lam"):
        gae_advantages(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=1.0, lam=-0.1)
    with pytest.raises(ValueError, match="values"):
        gae_advantages(GAE_REWARDS, GAE_VALUES[:, :3], GAE_MASK, gamma=1.0, lam=0.9)
    with pytest.raises(ValueError, match="mask"):
        gae_advantages(GAE_REWARDS, GAE_VALUES, GAE_MASK[0], gamma=1.0, lam=0.9)


# ----------------------------------------------------------------------------- value loss

# clip_eps 0.2 around old = 0.5: clip range [0.3, 0.7]
#   token  v    R    (v-R)^2  v_clip  (v_clip-R)^2  0.5*max   clipped?   d/dv
#   a      1.0  1.2  0.04     0.7     0.25          0.125     yes        0
#   b      0.4  0.0  0.16     0.4     0.16          0.08      no         (v - R) = 0.4
#   c      1.0  0.0  1.00     0.7     0.49          0.5       no         (v - R) = 1.0
#   sum 0.705, N = 3 -> 0.235; the fourth position is padding (NaN)
VL_VALUES = t([[1.0, 0.4, 1.0, NAN]])
VL_OLD = t([[0.5, 0.5, 0.5, NAN]])
VL_RETURNS = t([[1.2, 0.0, 0.0, NAN]])
VL_MASK = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)


def test_clipped_value_loss_by_hand():
    v = VL_VALUES.clone().requires_grad_(True)
    loss, stats = value_loss(v, VL_OLD, VL_RETURNS, VL_MASK, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.235, dtype=F64))
    loss.backward()
    torch.testing.assert_close(v.grad, t([[0.0, 0.4 / 3, 1.0 / 3, 0.0]]))
    assert stats["value_clip_fraction"] == pytest.approx(1 / 3)
    assert stats["value_mean"] == pytest.approx(0.8)          # (1.0 + 0.4 + 1.0) / 3
    assert stats["return_mean"] == pytest.approx(0.4)         # (1.2 + 0 + 0) / 3


def test_unclipped_value_loss_and_normalizer():
    # 0.5 * (0.04 + 0.16 + 1.0) / 3 = 0.2; gradients (v - R) / 3 = (-0.2, 0.4, 1.0) / 3
    v = VL_VALUES.clone().requires_grad_(True)
    loss, stats = value_loss(v, VL_OLD, VL_RETURNS, VL_MASK, clip_eps=None)
    torch.testing.assert_close(loss, torch.tensor(0.2, dtype=F64))
    loss.backward()
    torch.testing.assert_close(v.grad, t([[-0.2 / 3, 0.4 / 3, 1.0 / 3, 0.0]]))
    assert stats["value_clip_fraction"] == 0.0
    # a global normalizer of 6 tokens (micro-batching): 0.705 / 6
    loss, _ = value_loss(VL_VALUES, VL_OLD, VL_RETURNS, VL_MASK, clip_eps=0.2, normalizer=6)
    torch.testing.assert_close(loss, torch.tensor(0.1175, dtype=F64))


def test_value_loss_all_masked_is_zero():
    v = VL_VALUES.clone().requires_grad_(True)
    loss, stats = value_loss(v, VL_OLD, VL_RETURNS, torch.zeros(1, 4, dtype=torch.bool), clip_eps=0.2)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(v.grad, torch.zeros(1, 4, dtype=F64))
    assert all(x == 0.0 for x in stats.values())


def test_value_loss_bad_arguments():
    with pytest.raises(ValueError, match="clip_eps"):
        value_loss(VL_VALUES, VL_OLD, VL_RETURNS, VL_MASK, clip_eps=0.0)
    with pytest.raises(ValueError, match="normalizer"):
        value_loss(VL_VALUES, VL_OLD, VL_RETURNS, VL_MASK, clip_eps=0.2, normalizer=0)
    with pytest.raises(ValueError, match="old_values"):
        value_loss(VL_VALUES, VL_OLD[:, :2], VL_RETURNS, VL_MASK, clip_eps=0.2)
