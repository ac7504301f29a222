"""KL estimators, KL controllers and KL-penalised token rewards on hand-worked numbers."""
import math

import pytest
import torch

from trainer.algo.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_penalised_token_rewards,
)

F64 = torch.float64
NAN = float("nan")


def t(rows):
    return torch.tensor(rows, dtype=F64)


# x = logp - ref = (0.5, 0, -0.3); the fourth position is padding (NaN in both)
LOGP = t([[-1.0, -2.0, -0.5, NAN]])
REF = t([[-1.5, -2.0, -0.2, NAN]])
MASK = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
E_M05 = 0.6065306597    # e^-0.5
E_03 = 1.3498588076     # e^0.3


@pytest.mark.parametrize("kind, value, grad", [
    # k1 = x; d/dlogp = 1
    ("k1", [0.5, 0.0, -0.3], [1.0, 1.0, 1.0]),
    # k2 = x^2 / 2 = (0.125, 0, 0.045); d/dlogp = x
    ("k2", [0.125, 0.0, 0.045], [0.5, 0.0, -0.3]),
    # k3 = e^-x + x - 1 = (0.606531 - 0.5, 0, 1.349859 - 1.3); d/dlogp = 1 - e^-x
    ("k3", [E_M05 - 0.5, 0.0, E_03 - 1.3], [1 - E_M05, 0.0, 1 - E_03]),
])
def test_kl_estimators_by_hand(kind, value, grad):
    lp = LOGP.clone().requires_grad_(True)
    kl = kl_estimate(lp, REF, kind, mask=MASK)
    torch.testing.assert_close(kl, t([value + [0.0]]))
    kl.sum().backward()
    torch.testing.assert_close(lp.grad, t([grad + [0.0]]))   # finite, 0 on padding despite the NaN


def test_kl_estimate_without_mask_and_default_kind():
    kl = kl_estimate(LOGP[:, :3], REF[:, :3])                # default k3
    torch.testing.assert_close(kl, t([[E_M05 - 0.5, 0.0, E_03 - 1.3]]))


def test_k2_and_k3_are_non_negative_and_zero_at_equality():
    gen = torch.Generator().manual_seed(0)
    lp = -torch.rand(3, 5, generator=gen, dtype=F64) * 4
    ref = -torch.rand(3, 5, generator=gen, dtype=F64) * 4
    for kind in ("k2", "k3"):
        assert (kl_estimate(lp, ref, kind) >= 0).all()
        assert torch.equal(kl_estimate(lp, lp, kind), torch.zeros(3, 5, dtype=F64))


def test_kl_estimate_low_precision_and_no_gradient_to_reference():
    ref = REF[:, :3].clone().requires_grad_(True)
    kl = kl_estimate(LOGP[:, :3].to(torch.bfloat16), ref.to(torch.bfloat16), "k1")
    assert kl.dtype == torch.float32
    kl = kl_estimate(LOGP[:, :3], ref, "k3")
    assert not kl.requires_grad


def test_kl_estimate_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        kl_estimate(LOGP, REF, "k4")
    with pytest.raises(ValueError, match="ref_logprobs"):
        kl_estimate(LOGP, REF[:, :2], "k1")
    with pytest.raises(ValueError, match="mask"):
        kl_estimate(LOGP, REF, "k1", mask=MASK[:, :2])


# ----------------------------------------------------------------------------- token rewards


def test_kl_penalised_token_rewards_by_hand():
    # coef 0.5. row 0: response at positions 1..3 -> -0.5*(0.1, 0.2, 0.3) and score 1 on position 3:
    #   (0, -0.05, -0.1, 1 - 0.15 = 0.85, 0)
    # row 1: one-token response at position 2 -> 0.5 - 0.5*0.4 = 0.3
    # row 2: zero-length response -> all 0 (its score 2 has no token)
    score = t([1.0, 0.5, 2.0])
    kl = t([[NAN, 0.1, 0.2, 0.3, NAN], [NAN, NAN, 0.4, NAN, NAN], [NAN] * 5])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    rewards = kl_penalised_token_rewards(score, kl, mask, coef=0.5)
    expected = t([[0.0, -0.05, -0.1, 0.85, 0.0], [0.0, 0.0, 0.3, 0.0, 0.0], [0.0] * 5])
    torch.testing.assert_close(rewards, expected)


def test_kl_penalised_token_rewards_coef_zero_is_the_score_on_the_last_token():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    rewards = kl_penalised_token_rewards(t([3.0, -1.0]), t([[5.0, 5.0, 5.0], [5.0, 5.0, 5.0]]), mask, coef=0.0)
    torch.testing.assert_close(rewards, t([[0.0, 3.0, 0.0], [0.0, 0.0, -1.0]]))


def test_kl_penalised_token_rewards_bad_arguments():
    kl, mask = t([[0.1, 0.2]]), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="score"):
        kl_penalised_token_rewards(t([1.0, 2.0]), kl, mask, 0.1)
    with pytest.raises(ValueError, match="mask"):
        kl_penalised_token_rewards(t([1.0]), kl, mask[:, :1], 0.1)
    with pytest.raises(ValueError, match="coef"):
        kl_penalised_token_rewards(t([1.0]), kl, mask, -0.1)


# ----------------------------------------------------------------------------- controllers


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(init_coef=1.0, target=1.0, horizon=100)
    # kl 3: error = clip(3/1 - 1 = 2, -0.2, 0.2) = 0.2 -> 1.0 * (1 + 0.2 * 50/100) = 1.1
    assert ctl.update(3.0, 50) == pytest.approx(1.1)
    # kl 1.05: error 0.05 (inside the clip) -> 1.1 * (1 + 0.05 * 100/100) = 1.155
    assert ctl.update(1.05, 100) == pytest.approx(1.155)
    # kl 0: error clip(-1) = -0.2 -> 1.155 * (1 - 0.2 * 10/100) = 1.155 * 0.98 = 1.1319
    assert ctl.update(0.0, 10) == pytest.approx(1.1319)
    # on target: unchanged
    assert ctl.update(1.0, 100) == pytest.approx(1.1319)
    assert ctl.coef == pytest.approx(1.1319)


def test_adaptive_kl_controller_ziegler_scale():
    # Ziegler et al. numbers: init 0.1, target 6, horizon 10000, batch of 256 with kl 9:
    # error = clip(0.5) = 0.2 -> 0.1 * (1 + 0.2 * 256 / 10000) = 0.1 * 1.00512 = 0.100512
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    assert ctl.update(9.0, 256) == pytest.approx(0.100512)


def test_adaptive_kl_controller_never_goes_negative():
    # error -0.2 with n_steps / horizon = 10: factor 1 - 2 = -1 -> floored at 0
    ctl = AdaptiveKLController(0.5, 1.0, 10)
    assert ctl.update(0.0, 100) == 0.0


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 1000) == 0.05 and ctl.coef == 0.05


@pytest.mark.parametrize("args, name", [
    ((-0.1, 1.0, 10), "init_coef"), ((0.1, 0.0, 10), "target"), ((0.1, 1.0, 0), "horizon"),
])
def test_controller_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        AdaptiveKLController(*args)


def test_controller_bad_update_arguments():
    ctl = AdaptiveKLController(0.1, 1.0, 10)
    with pytest.raises(ValueError, match="observed_kl"):
        ctl.update(math.nan, 1)
    with pytest.raises(ValueError, match="n_steps"):
        ctl.update(1.0, -1)
    with pytest.raises(ValueError, match="coef"):
        FixedKLController(-1.0)
