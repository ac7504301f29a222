"""DPO / IPO / conservative DPO and the Bradley-Terry loss on tiny tensors, every expected number by hand.

Shared pair: π_c = -1, ref_c = -2, π_r = -3, ref_r = -2.5, so h = (-1 + 2) - (-3 + 2.5) = 1 + 0.5 = 1.5.
-log σ(x) = log(1 + e^-x).
"""
import math

import pytest
import torch

from areal_py.rewards.reward_model import bradley_terry_loss
from trainer.algo.preference_loss import (
    check_settings,
    dpo_loss,
    ipo_loss,
    logratio_margin,
    preference_loss,
    preference_stats,
    sequence_logprob,
)

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


def nls(x):  # -log sigmoid(x), written out
    return math.log(1.0 + math.exp(-x))


def test_sequence_logprob_masks_prompt_and_padding():
    # row 0: prompt "ab" (positions 0, 1 predict prompt tokens), response 2 tokens, no padding
    # row 1: prompt 1 token, response 1 token, then padding whose logprob is -inf
    lp = t([[-0.5, -1.0, -2.0, -0.25], [-7.0, -0.75, float("-inf"), float("-inf")]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0]])
    assert sequence_logprob(lp, mask).tolist() == [-2.25, -0.75]


def test_sequence_logprob_prompt_tokens_get_no_gradient():
    lp = t([[-0.5, -1.0, -2.0]]).requires_grad_()
    sequence_logprob(lp, torch.tensor([[0, 1, 1]])).sum().backward()
    assert lp.grad.tolist() == [[0.0, 1.0, 1.0]]


def test_sequence_logprob_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        sequence_logprob(t([[0.0, 0.0]]), torch.tensor([[1, 1, 1]]))


def test_margin():
    assert logratio_margin(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.5])).item() == 1.5


def test_dpo_loss_hand_value():
    # β = 0.1: β h = 0.15; -log σ(0.15) = log(1 + e^-0.15) = log(1.8607080) = 0.620957
    got = dpo_loss(t([1.5]), beta=0.1).item()
    assert got == pytest.approx(nls(0.15), abs=1e-12)
    assert got == pytest.approx(0.620957, abs=1e-6)


def test_dpo_loss_is_log2_at_zero_margin_for_any_beta():
    for beta in (1e-3, 0.1, 1.0, 50.0):
        assert dpo_loss(t([0.0]), beta).item() == pytest.approx(math.log(2), abs=1e-12)


def test_dpo_gradient_is_minus_beta_sigmoid_of_minus_beta_h():
    # d/dh [-log σ(β h)] = -β σ(-β h); at h = 0: -β/2; at h = 1.5, β = 0.1: -0.1 / (1 + e^0.15)
    h = t([0.0, 1.5]).requires_grad_()
    dpo_loss(h, 0.1).sum().backward()
    assert h.grad.tolist() == pytest.approx([-0.05, -0.1 / (1 + math.exp(0.15))], abs=1e-12)


def test_dpo_loss_large_beta_stays_finite():
    # β h = -1e5: loss = 1e5 (+ log(1 + e^-1e5) = 0); β h = +1e5: loss 0. No overflow.
    assert dpo_loss(t([-100.0, 100.0]), beta=1e3).tolist() == [1e5, 0.0]
    # β = 100, h = -0.1: β h = -10, loss = 10 + log(1 + e^-10) = 10.0000454
    assert dpo_loss(t([-0.1]), beta=100.0).item() == pytest.approx(10.0000454, abs=1e-7)


def test_conservative_dpo_hand_value_and_eps_zero_is_dpo():
    # ε = 0.1, β h = 0.15: 0.9 * log(1 + e^-0.15) + 0.1 * log(1 + e^0.15)
    want = 0.9 * nls(0.15) + 0.1 * nls(-0.15)
    assert dpo_loss(t([1.5]), 0.1, label_smoothing=0.1).item() == pytest.approx(want, abs=1e-12)
    h = t([-2.0, 0.0, 0.3, 7.0])
    assert torch.equal(dpo_loss(h, 0.5, label_smoothing=0.0), dpo_loss(h, 0.5))
    assert torch.equal(preference_loss(h, "dpo", 0.5, 0.0), dpo_loss(h, 0.5))


def test_conservative_dpo_bounds_the_margin_it_asks_for():
    # The cDPO gradient in x = β h is -(1-ε) σ(-x) + ε σ(x): zero at σ(x) = 1 - ε, x* = log((1-ε)/ε).
    # ε = 0.1: x* = log 9; β = 0.5: h* = 2 log 9.
    h = t([2 * math.log(9)]).requires_grad_()
    dpo_loss(h, 0.5, label_smoothing=0.1).sum().backward()
    assert h.grad.item() == pytest.approx(0.0, abs=1e-12)


def test_ipo_loss_hand_value_and_target():
    # β = 0.1: target 1/(2β) = 5; (1.5 - 5)^2 = 12.25
    assert ipo_loss(t([1.5]), 0.1).item() == pytest.approx(12.25, abs=1e-12)
    assert preference_loss(t([1.5]), "ipo", 0.1).item() == pytest.approx(12.25, abs=1e-12)
    # β = 2: target 0.25; a margin of 0.25 has zero loss and zero gradient
    h = t([0.25]).requires_grad_()
    ipo_loss(h, 2.0).sum().backward()
    assert ipo_loss(t([0.25]), 2.0).item() == 0.0 and h.grad.item() == 0.0


@pytest.mark.parametrize("loss,beta,eps,match", [
    ("dpo", 0.0, 0.0, "beta"), ("ipo", -1.0, 0.0, "beta"), ("dpo", float("nan"), 0.0, "beta"),
    ("dpo", float("inf"), 0.0, "beta"), ("dpo", 0.1, 0.5, "label_smoothing"), ("dpo", 0.1, -0.1, "label_smoothing"),
    ("ipo", 0.1, 0.1, "not to ipo"), ("kto", 0.1, 0.0, "unknown preference loss"),
])
def test_bad_settings_are_named(loss, beta, eps, match):
    with pytest.raises(ValueError, match=match):
        check_settings(loss, beta, eps)
    with pytest.raises(ValueError, match=match):
        preference_loss(t([1.0]), loss, beta, eps)


def test_stats_hand_values():
    # pair 0: the shared pair, β = 0.1: r_c = 0.1 * 1 = 0.1, r_r = 0.1 * -0.5 = -0.05, margin 0.15, right
    # pair 1: π = ref on both: r_c = r_r = 0, a tie, counted as wrong
    pi_c, pi_r, ref_c, ref_r = t([-1.0, -4.0]), t([-3.0, -5.0]), t([-2.0, -4.0]), t([-2.5, -5.0])
    losses = dpo_loss(logratio_margin(pi_c, pi_r, ref_c, ref_r), 0.1)
    s = preference_stats(pi_c, pi_r, ref_c, ref_r, losses, beta=0.1)
    assert s.pairs == 2 and s.accuracy == 1.0
    assert s.ranked == 2.0  # π_c > π_r in both: -1 > -3, -4 > -5
    m = s.means()
    assert m["reward_chosen"] == pytest.approx(0.05) and m["reward_rejected"] == pytest.approx(-0.025)
    assert m["margin"] == pytest.approx(0.075) and m["accuracy"] == 0.5 and m["ranked"] == 1.0
    assert m["loss"] == pytest.approx((nls(0.15) + math.log(2)) / 2)
    both = s + s
    assert both.pairs == 4 and both.means() == pytest.approx(m)


def test_bradley_terry_loss_hand_value():
    # pairs: r_c - r_r = 1 and 0: mean(log(1 + e^-1), log 2) = (0.3132617 + 0.6931472) / 2
    got = bradley_terry_loss(t([2.0, 0.0]), t([1.0, 0.0])).item()
    assert got == pytest.approx((nls(1.0) + math.log(2)) / 2, abs=1e-12)
    assert got == pytest.approx(0.5032044, abs=1e-6)
    # the BT loss on scores is DPO's on implicit rewards: r = β (π - ref)
    assert bradley_terry_loss(t([0.1]), t([-0.05])).item() == pytest.approx(dpo_loss(t([1.5]), 0.1).item())
