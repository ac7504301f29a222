"""The off-policy correction family (trainer/algo/offpolicy.py), every expected number worked out by hand.

Inputs are built from chosen behaviour weights: behav = prox - log(w), so the arithmetic works
directly with w. The shared example (row 1's last token is padding):

    w = [[0.5, 2, 8], [1, 6, -]]        log w = x = [[-ln2, ln2, 3 ln2], [0, ln6, -]]
    k1 = x                     = [[-0.6931, 0.6931, 2.0794], [0, 1.7918]]
    k2 = x^2 / 2               = [[ 0.2402, 0.2402, 2.1620], [0, 1.6052]]
    k3 = exp(-x) - 1 + x       = [[ 0.3069, 0.1931, 1.2044], [0, 0.9584]]   (2-1-ln2, 1/2-1+ln2, 1/8-1+3ln2, 1/6-1+ln6)
    row geometric means:  row 0 (0.5*2*8)^(1/3) = 2,   row 1 (1*6)^(1/2) = sqrt 6 = 2.4495
    row products:         row 0 8,                      row 1 6
"""
import math

import pytest
import torch

from trainer.algo.offpolicy import OffPolicySpec, offpolicy_weight
from trainer.algo.policy_loss import legacy_spec, policy_loss, ppo_clip_loss

F64 = torch.float64
S6 = math.sqrt(6.0)


def t(rows):
    return torch.tensor(rows, dtype=F64)


PROX = t([[-1.0, -2.0, -0.5], [-3.0, -1.5, -2.5]])
W = t([[0.5, 2.0, 8.0], [1.0, 6.0, 3.0]])
BEHAV = PROX - torch.log(W)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)


def weight(**spec):
    return offpolicy_weight(PROX, BEHAV, MASK, OffPolicySpec(**spec))


def check(bw, weight_rows, kept_rows, changed_rows):
    torch.testing.assert_close(bw.weight, t(weight_rows))
    assert bw.kept.tolist() == kept_rows
    assert bw.changed.tolist() == changed_rows
    torch.testing.assert_close(bw.raw, t([[0.5, 2.0, 8.0], [1.0, 6.0, 0.0]]))
    assert not bw.weight.requires_grad


ALL = [[True, True, True], [True, True, False]]
NONE = [[False] * 3, [False] * 3]


# ----------------------------------------------------------------------------- token level


def test_none_is_weight_one_on_valid_tokens():
    check(weight(method="none"), [[1, 1, 1], [1, 1, 0]], ALL, NONE)


def test_default_is_the_token_clamp_at_5():
    assert OffPolicySpec() == legacy_spec(5.0, "cap")
    check(weight(), [[0.5, 2, 5], [1, 5, 0]], ALL, [[False, False, True], [False, True, False]])


def test_filter_token_clamp_with_a_lower_bound():
    bw = weight(action="clamp", upper=5.0, lower=1.0)
    check(bw, [[1, 2, 5], [1, 5, 0]], ALL, [[True, False, True], [False, True, False]])
    assert bw.clamped.tolist() == bw.changed.tolist() and not bw.dropped.any()


def test_filter_token_mask_ratio_with_both_bounds():
    # 0.5 < 0.6 dropped, 8 and 6 > 5 dropped; kept tokens keep their raw (unclamped) w
    bw = weight(action="mask", upper=5.0, lower=0.6)
    kept = [[False, True, False], [True, False, False]]
    check(bw, [[0, 2, 0], [1, 0, 0]], kept, [[True, False, True], [False, True, False]])
    assert bw.dropped.tolist() == bw.changed.tolist() and not bw.clamped.any()


@pytest.mark.parametrize("metric, upper, lower, kept", [
    ("kl_k3", 0.25, None, [[False, True, False], [True, False, False]]),   # 0.3069, 1.2044, 0.9584 > 0.25
    ("kl_k3", 1.0, None, [[True, True, False], [True, True, False]]),      # only 1.2044 > 1
    ("kl_k2", 0.3, None, [[True, True, False], [True, False, False]]),     # 2.162, 1.605 > 0.3
    ("kl_k1", 1.0, -0.5, [[False, True, False], [True, False, False]]),    # -0.693 < -0.5; 2.079, 1.792 > 1
])
def test_filter_token_mask_on_a_kl_metric(metric, upper, lower, kept):
    bw = weight(action="mask", metric=metric, upper=upper, lower=lower)
    expected = [[w if k else 0.0 for w, k in zip(row, keep)] for row, keep in zip(W.tolist(), kept)]
    changed = [[v and not k for v, k in zip(valid, keep)] for valid, keep in zip(ALL, kept)]
    check(bw, expected, kept, changed)


def test_tis_token_is_min_w_c():
    check(weight(method="tis", upper=5.0), [[0.5, 2, 5], [1, 5, 0]], ALL,
          [[False, False, True], [False, True, False]])


def test_icepop_drops_tokens_outside_one_over_c_and_c():
    # C = 4: [0.25, 4] keeps 0.5, 2, 1; drops 8 and 6
    kept = [[True, True, False], [True, False, False]]
    check(weight(method="icepop", upper=4.0), [[0.5, 2, 0], [1, 0, 0]], kept,
          [[False, False, True], [False, True, False]])
    # C = 2.5 with lower 0.6 given: 0.5 dropped too
    bw = weight(method="icepop", upper=2.5, lower=0.6)
    assert bw.kept.tolist() == [[False, True, False], [True, False, False]]


# ----------------------------------------------------------------------------- sequence level


def test_filter_sequence_mask_geometric_mean_is_verdict_and_weight():
    # row 0 geometric mean 2 <= 2.2: kept, weight 2 on every token; row 1 sqrt 6 > 2.2: dropped
    check(weight(level="sequence", action="mask", upper=2.2), [[2, 2, 2], [0, 0, 0]],
          [[True, True, True], [False, False, False]], [[False] * 3, [True, True, False]])


def test_filter_sequence_clamp_geometric_mean():
    check(weight(level="sequence", action="clamp", upper=2.2), [[2, 2, 2], [2.2, 2.2, 0]], ALL,
          [[False] * 3, [True, True, False]])


def test_filter_sequence_sum_and_max_aggregations():
    # sum (product of w): row 0 8 > 7 out, row 1 6 in; max: row 0 max 8 > 7 out, row 1 max 6 in
    for agg in ("sum", "max"):
        check(weight(level="sequence", action="mask", agg=agg, upper=7.0), [[0, 0, 0], [S6, S6, 0]],
              [[False] * 3, [True, True, False]], [[True] * 3, [False] * 3])
    # clamp, as AReaL: the out-of-bounds row 0 has its geometric mean (2) clamped to [0, 7]: unchanged
    check(weight(level="sequence", action="clamp", agg="sum", upper=7.0), [[2, 2, 2], [S6, S6, 0]], ALL, NONE)


def test_filter_sequence_mask_on_kl_keeps_per_token_weights():
    # k3 row means: row 0 (0.3069 + 0.1931 + 1.2044) / 3 = 0.5681 > 0.5 out; row 1 0.9584 / 2 = 0.4792 in
    check(weight(level="sequence", action="mask", metric="kl_k3", upper=0.5), [[0, 0, 0], [1, 6, 0]],
          [[False] * 3, [True, True, False]], [[True] * 3, [False] * 3])
    # upper 1.5: k3 row sums 1.7044 (out) and 0.9584 (in); row maxima 1.2044 and 0.9584 (both in)
    assert weight(level="sequence", action="mask", metric="kl_k3", agg="sum", upper=1.5).kept[0].sum() == 0
    assert weight(level="sequence", action="mask", metric="kl_k3", agg="max", upper=1.5).kept.tolist() == ALL


def test_tis_sequence_is_the_clamped_product():
    # products 8 and 6; C = 7: row 0 min(8, 7) = 7 on every token, row 1 6
    check(weight(method="tis", level="sequence", upper=7.0), [[7, 7, 7], [6, 6, 0]], ALL,
          [[True] * 3, [False] * 3])


def test_tis_sequence_product_does_not_overflow():
    prox = torch.zeros(1, 200, dtype=F64)
    bw = offpolicy_weight(prox, prox - 5.0, torch.ones(1, 200, dtype=torch.bool), OffPolicySpec(method="tis",
                          level="sequence", upper=3.0))     # product e^1000 = inf in float64
    torch.testing.assert_close(bw.weight, torch.full((1, 200), 3.0, dtype=F64))


# ----------------------------------------------------------------------------- edge cases

SPECS = [OffPolicySpec(method="none"), OffPolicySpec(), OffPolicySpec(action="mask", upper=2.0, lower=0.5),
         OffPolicySpec(action="mask", metric="kl_k3", upper=0.5),
         OffPolicySpec(level="sequence", action="mask", upper=2.0),
         OffPolicySpec(level="sequence", action="mask", metric="kl_k2", agg="max", upper=0.5),
         OffPolicySpec(level="sequence", action="clamp", agg="sum", upper=2.0),
         OffPolicySpec(method="tis", upper=2.0), OffPolicySpec(method="tis", level="sequence", upper=2.0),
         OffPolicySpec(method="icepop", upper=2.0), OffPolicySpec(upper=None)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_masked_positions_holding_nan_and_inf_never_reach_the_weight(spec):
    clean = offpolicy_weight(PROX, BEHAV, MASK, spec)
    prox, behav = PROX.clone(), BEHAV.clone()
    prox[1, 2], behav[1, 2] = -math.inf, math.nan
    dirty = offpolicy_weight(prox, behav, MASK, spec)
    for a, b in ((clean.weight, dirty.weight), (clean.raw, dirty.raw)):
        assert torch.equal(a, b) and torch.isfinite(b).all()
    assert torch.equal(clean.kept, dirty.kept) and torch.equal(clean.changed, dirty.changed)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_equal_policies_give_weight_one_and_change_nothing(spec):
    # an on-policy (or all-equal) batch: w = 1 everywhere, inside every bound here
    bw = offpolicy_weight(PROX, PROX, MASK, spec)
    torch.testing.assert_close(bw.weight, MASK.to(F64))
    assert bw.kept.tolist() == ALL and not bw.changed.any()


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_empty_mask_and_empty_rows(spec):
    empty = torch.zeros_like(MASK)
    bw = offpolicy_weight(PROX, BEHAV, empty, spec)
    assert not bw.weight.any() and not bw.kept.any() and not bw.changed.any()
    one_row = torch.tensor([[1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    bw = offpolicy_weight(PROX, BEHAV, one_row, spec)
    assert not bw.weight[1].any() and not bw.kept[1].any()
    assert torch.isfinite(bw.weight).all()


def test_weight_has_no_gradient_and_keeps_float32_for_bf16():
    prox = PROX.to(torch.bfloat16).requires_grad_(True)
    bw = offpolicy_weight(prox, BEHAV.to(torch.bfloat16), MASK, OffPolicySpec(method="tis", upper=5.0))
    assert bw.weight.dtype == torch.float32 and not bw.weight.requires_grad


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "is"}, "method"),
    ({"level": "seq"}, "level"),
    ({"action": "metric", "metric": "kl_k3"}, "action"),
    ({"action": "clamp", "metric": "kl_k3"}, "clamp"),
    ({"method": "tis", "upper": None}, "needs upper"),
    ({"method": "tis", "upper": 2.0, "lower": 0.5}, "no lower"),
    ({"method": "icepop", "upper": 2.0, "level": "sequence"}, "token"),
    ({"upper": 2.0, "lower": 3.0}, "above upper"),
    ({"upper": 0.0}, "> 0"),
    ({"upper": math.inf}, "finite"),
    ({"lower": math.nan}, "finite"),
])
def test_bad_specs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OffPolicySpec(**kwargs)


def test_shape_mismatch_names_the_argument():
    with pytest.raises(ValueError, match="behaviour_logprobs"):
        offpolicy_weight(PROX, BEHAV[:1], MASK, OffPolicySpec())
    with pytest.raises(ValueError, match="mask"):
        offpolicy_weight(PROX, BEHAV, MASK[:, :2], OffPolicySpec())


# ----------------------------------------------------------------------------- in the loss
# Unweighted per-token PPO terms of this example (r = [[1.5, 1.1, 0.5], [0.9, 0.7, -]],
# A = [[2, 2, -1], [-1, 0.5, -]], clip [0.8, 1.2]; test_policy_loss.py): [[-2.4, -2.2, 0.8], [0.9, -0.35, -]],
# clipped (0,0) and (0,2).

RATIO = t([[1.5, 1.1, 0.5], [0.9, 0.7, 1.5]])
ADV = t([[2.0, 2.0, -1.0], [-1.0, 0.5, -1.0]])


def loss_of(spec):
    lp = (PROX + torch.log(RATIO)).requires_grad_(True)
    loss, stats = policy_loss(lp, PROX, BEHAV, ADV, MASK, offpolicy=spec)
    loss.backward()
    return loss, stats, lp.grad


def test_none_in_the_loss_is_ppo_clip_around_the_proximal_policy():
    loss, stats, grad = loss_of(OffPolicySpec(method="none"))
    torch.testing.assert_close(loss, torch.tensor(-3.25 / 5, dtype=F64))
    lp = (PROX + torch.log(RATIO)).requires_grad_(True)
    ref, _ = ppo_clip_loss(lp, PROX, ADV, MASK)
    ref.backward()
    torch.testing.assert_close(grad, lp.grad)
    assert stats["behav_weight_mean"] == 1.0 and stats["behav_masked_fraction"] == 0.0


def test_tis_sequence_in_the_loss():
    # w rows 7 and 6: 7 (-2.4 - 2.2 + 0.8) + 6 (0.9 - 0.35) = -26.6 + 3.3 = -23.3, / 5 = -4.66
    loss, stats, grad = loss_of(OffPolicySpec(method="tis", level="sequence", upper=7.0))
    torch.testing.assert_close(loss, torch.tensor(-4.66, dtype=F64))
    # -w r A / N on unclipped tokens: (0,1) -7*1.1*2/5, (1,0) -6*0.9*-1/5, (1,1) -6*0.7*0.5/5
    torch.testing.assert_close(grad, t([[0.0, -3.08, 0.0], [1.08, -0.42, 0.0]]))
    assert stats["behav_masked_fraction"] == pytest.approx(3 / 5)


def test_mask_mode_stats_are_over_the_kept_tokens():
    # icepop C = 4 keeps (0,0), (0,1), (1,0): loss -(0.5*2.4 + 2*2.2 - 0.9) / 5 (dropped tokens stay in N)
    loss, stats, _ = loss_of(OffPolicySpec(method="icepop", upper=4.0))
    torch.testing.assert_close(loss, torch.tensor(-4.7 / 5, dtype=F64))
    assert stats["clip_fraction"] == pytest.approx(1 / 3)            # (0,0) of the 3 kept (2/5 over valid)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 1.1 + 0.9) / 3)
    assert stats["behav_masked_fraction"] == pytest.approx(2 / 5)
    assert stats["behav_weight_mean"] == pytest.approx((0.5 + 2 + 1) / 5)
    # approx_kl stays over every valid token: mean of -log r
    assert stats["approx_kl"] == pytest.approx(-sum(math.log(r) for r in (1.5, 1.1, 0.5, 0.9, 0.7)) / 5)


def test_everything_dropped_gives_zero_loss_and_zero_kept_stats():
    loss, stats, grad = loss_of(OffPolicySpec(action="mask", upper=1.5, lower=1.2))   # no w in [1.2, 1.5]
    assert float(loss.detach()) == 0.0 and not grad.any()
    assert stats["clip_fraction"] == 0.0 and stats["ratio_mean"] == 0.0 and stats["behav_masked_fraction"] == 1.0


def test_offpolicy_and_the_legacy_pair_are_not_both_accepted():
    lp = PROX + torch.log(RATIO)
    with pytest.raises(ValueError, match="either offpolicy or behav_cap"):
        policy_loss(lp, PROX, BEHAV, ADV, MASK, offpolicy=OffPolicySpec(), behav_mode="mask")


@pytest.mark.parametrize("mode, cap", [("cap", 5.0), ("mask", 5.0), ("none", 5.0), ("cap", None), ("mask", 2.0)])
def test_the_legacy_pair_equals_its_spec(mode, cap):
    a = policy_loss(PROX + torch.log(RATIO), PROX, BEHAV, ADV, MASK, behav_cap=cap, behav_mode=mode)
    b = policy_loss(PROX + torch.log(RATIO), PROX, BEHAV, ADV, MASK, offpolicy=legacy_spec(cap, mode))
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
