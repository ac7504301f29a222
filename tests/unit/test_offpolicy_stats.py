"""Off-policy statistics (trainer/algo/offpolicy_stats.py) against values worked out by hand."""
import math

import pytest
import torch

from trainer.algo.offpolicy_stats import (
    OffPolicyTally,
    cap_changed,
    ess_fraction,
    k3,
    offpolicy_stats,
    staleness_bucket,
    staleness_keys,
)

LN2 = math.log(2.0)


def rows(*xs):
    return torch.tensor([list(xs)], dtype=torch.float64)


def test_k3_by_hand():
    # x = ln 2: w = 2, k3 = 2 - 1 - ln 2;  x = 0: 0;  x = -ln 2: 0.5 - 1 + ln 2
    got = k3(torch.tensor([LN2, 0.0, -LN2], dtype=torch.float64))
    assert got.tolist() == pytest.approx([1 - LN2, 0.0, LN2 - 0.5])


def test_ess_fraction_by_hand():
    ones = torch.ones(4)
    assert ess_fraction(ones, torch.ones(4, dtype=torch.bool)) == pytest.approx(1.0)
    # one weight, three zeros: (1)^2 / (4 * 1) = 1/4
    assert ess_fraction(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.ones(4, dtype=torch.bool)) == pytest.approx(0.25)
    # [1, 1, 1, 100]: 103^2 / (4 * 10003)
    assert ess_fraction(torch.tensor([1.0, 1.0, 1.0, 100.0]), torch.ones(4, dtype=torch.bool)) == pytest.approx(
        103 ** 2 / (4 * 10003))
    # masked positions are not weights: only the first two count, (1 + 3)^2 / (2 * 10) = 0.8
    assert ess_fraction(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([True, True, False])) == pytest.approx(0.8)
    assert ess_fraction(torch.tensor([5.0]), torch.tensor([False])) == 1.0   # empty: nothing to weigh


def test_all_equal_weights_give_ess_one_and_k3_of_the_common_ratio():
    behav = rows(-1.0, -2.0, -0.5)
    prox = behav + LN2                                  # w = 2 everywhere
    s = offpolicy_stats(prox, behav, torch.ones(1, 3), None, torch.zeros(1, 3, dtype=torch.long))
    assert s.all.tokens == 3
    assert s.all.ess == pytest.approx(1.0)
    assert s.all.kl_mean == pytest.approx(1 - LN2) and s.all.kl_max == pytest.approx(1 - LN2)
    assert s.all.bounded_fraction == 0.0
    assert list(s.by_staleness) == ["0"]


def test_on_policy_is_zero_kl_and_ess_one():
    lp = rows(-1.0, -3.0)
    s = offpolicy_stats(lp, lp.clone(), torch.ones(1, 2), None, torch.zeros(1, 2, dtype=torch.long))
    assert (s.all.kl_mean, s.all.kl_max, s.all.ess) == (0.0, 0.0, 1.0)


def test_one_dominant_weight():
    behav = rows(-1.0, -1.0, -1.0, -5.0)
    prox = behav + rows(0.0, 0.0, 0.0, math.log(100.0))    # w = [1, 1, 1, 100]
    s = offpolicy_stats(prox, behav, torch.ones(1, 4), None, torch.zeros(1, 4, dtype=torch.long))
    assert s.all.ess == pytest.approx(103 ** 2 / (4 * 10003))
    dominant = 100 - 1 - math.log(100.0)
    assert s.all.kl_max == pytest.approx(dominant) and s.all.kl_mean == pytest.approx(dominant / 4)


def test_masked_positions_holding_nan_and_inf_are_never_read():
    behav = torch.tensor([[-1.0, float("nan"), -2.0, float("-inf")]], dtype=torch.float64)
    prox = torch.tensor([[-1.0 + LN2, float("-inf"), -2.0, float("nan")]], dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 0]])
    stale = torch.tensor([[1, -1, 0, -1]])                  # -1 (not generated) where masked, as RolloutBatch has it
    changed = torch.tensor([[False, True, False, True]])    # set only where masked: not counted
    s = offpolicy_stats(prox, behav, mask, changed, stale)
    # valid: w = [2, 1]: ESS = 9 / (2 * 5) = 0.9; k3 = [1 - ln 2, 0]
    assert s.all.tokens == 2 and s.all.ess == pytest.approx(0.9)
    assert s.all.kl_mean == pytest.approx((1 - LN2) / 2) and s.all.kl_max == pytest.approx(1 - LN2)
    assert s.all.bounded_fraction == 0.0
    assert {k: g.tokens for k, g in s.by_staleness.items()} == {"0": 1, "1": 1}
    assert all(math.isfinite(v) for v in (s.all.kl_mean, s.all.kl_max, s.all.ess))


def test_empty():
    s = offpolicy_stats(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), None,
                        torch.zeros(2, 3, dtype=torch.long))
    assert s.all.tokens == 0 and (s.all.kl_mean, s.all.kl_max, s.all.ess, s.all.bounded_fraction) == (0, 0, 1, 0)
    assert s.by_staleness == {}
    s = offpolicy_stats(torch.zeros(0, 0), torch.zeros(0, 0), torch.zeros(0, 0), None, torch.zeros(0, 0, dtype=torch.long))
    assert s.all.tokens == 0 and s.all.ess == 1.0


def test_split_by_staleness_with_a_bounded_set_of_keys():
    assert staleness_keys() == ("0", "1", "2", "3+")
    assert [staleness_bucket(s) for s in (0, 2, 3, 17)] == ["0", "2", "3+", "3+"]
    behav = torch.zeros(1, 5, dtype=torch.float64)
    x = rows(0.0, LN2, 0.0, LN2, -LN2)                  # w = [1, 2, 1, 2, 0.5]
    stale = torch.tensor([[0, 1, 3, 5, 3]])
    changed = torch.tensor([[False, True, False, True, False]])
    s = offpolicy_stats(x, behav, torch.ones(1, 5), changed, stale)
    assert list(s.by_staleness) == ["0", "1", "3+"]      # staleness 2 has no token: left out
    assert s.by_staleness["0"].tokens == 1 and s.by_staleness["0"].ess == pytest.approx(1.0)
    assert s.by_staleness["1"].bounded_fraction == 1.0 and s.by_staleness["1"].kl_mean == pytest.approx(1 - LN2)
    top = s.by_staleness["3+"]                         # w = [1, 2, 0.5]: 3.5^2 / (3 * 5.25)
    assert top.tokens == 3 and top.ess == pytest.approx(3.5 ** 2 / (3 * 5.25))
    assert top.bounded_fraction == pytest.approx(1 / 3)
    assert top.kl_max == pytest.approx(1 - LN2)        # k3(ln 2) = 0.307 > k3(-ln 2) = 0.193
    assert s.all.bounded_fraction == pytest.approx(2 / 5)


def test_tally_of_micro_batches_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    behav = -torch.rand(6, 7, generator=g, dtype=torch.float64) * 3
    prox = behav + torch.randn(6, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 7, generator=g) > 0.3
    stale = torch.randint(0, 6, (6, 7), generator=g)
    changed = torch.rand(6, 7, generator=g) > 0.7
    whole = offpolicy_stats(prox, behav, mask, changed, stale)
    tally = OffPolicyTally()
    for rows_ in (slice(0, 2), slice(2, 3), slice(3, 6)):
        tally.add(prox[rows_], behav[rows_], mask[rows_], changed[rows_], stale[rows_])
    parts = tally.summary()
    for a, b in [(parts.all, whole.all), *((parts.by_staleness[k], whole.by_staleness[k]) for k in whole.by_staleness)]:
        assert (a.tokens, a.kl_max) == (b.tokens, b.kl_max)
        assert a.kl_mean == pytest.approx(b.kl_mean) and a.ess == pytest.approx(b.ess)
        assert a.bounded_fraction == pytest.approx(b.bounded_fraction)
    assert list(parts.by_staleness) == list(whole.by_staleness)


def test_cap_changed_follows_the_bound_in_use():
    behav = torch.zeros(1, 3, dtype=torch.float64)
    prox = rows(math.log(6.0), math.log(4.0), math.log(5.0))   # w = [6, 4, 5]; cap 5: only 6 is over
    mask = torch.ones(1, 3)
    assert cap_changed(prox, behav, mask, 5.0, "cap").tolist() == [[True, False, False]]
    assert cap_changed(prox, behav, mask, 5.0, "mask").tolist() == [[True, False, False]]
    assert not cap_changed(prox, behav, mask, 5.0, "none").any()
    assert not cap_changed(prox, behav, mask, None, "cap").any()
    assert not cap_changed(prox, behav, torch.tensor([[0, 1, 1]]), 5.0, "cap").any()


def test_bad_input_raises():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        offpolicy_stats(z, z, torch.ones(1, 2), None, torch.tensor([[0, -1]]))
    with pytest.raises(ValueError, match="integer"):
        offpolicy_stats(z, z, torch.ones(1, 2), None, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="behaviour_logprobs"):
        offpolicy_stats(z, torch.zeros(1, 3), torch.ones(1, 2), None, torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="staleness"):
        staleness_bucket(-1)
