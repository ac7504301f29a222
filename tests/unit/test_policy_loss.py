"""Decoupled PPO / PPO-clip losses on tiny tensors, every expected number worked out by hand.

Inputs are built from chosen ratios: logprobs = prox + log(r), prox = behav + log(w), so the
hand arithmetic works directly with r and w. eps_clip = 0.2 unless stated: clip range [0.8, 1.2].
"""
import math

import pytest
import torch

from trainer.algo.aggregation import aggregate
from trainer.algo.policy_loss import (
    behaviour_weight,
    decoupled_ppo_loss,
    gspo_loss,
    policy_loss,
    ppo_clip_loss,
)

F64 = torch.float64


def t(rows):
    return torch.tensor(rows, dtype=F64)


# Shared 2x3 example. Last token of row 1 is padding.
#   token  A     r     r*A    clip(r)*A   min     -min   clipped?
#   (0,0)  2.0   1.5   3.0    1.2*2=2.4   2.4    -2.4   yes (r > 1+eps, A > 0)
#   (0,1)  2.0   1.1   2.2    2.2         2.2    -2.2   no
#   (0,2) -1.0   0.5  -0.5    0.8*-1=-0.8 -0.8    0.8   yes (r < 1-eps, A < 0)
#   (1,0) -1.0   0.9  -0.9   -0.9        -0.9     0.9   no
#   (1,1)  0.5   0.7   0.35   0.8*.5=0.4  0.35  -0.35   no (r < 1-eps but A > 0: unclipped is the min)
#   sum = -2.4 - 2.2 + 0.8 + 0.9 - 0.35 = -3.25, N = 5 -> loss = -0.65
PROX = t([[-1.0, -2.0, -0.5], [-3.0, -1.5, -2.5]])
RATIO = t([[1.5, 1.1, 0.5], [0.9, 0.7, 1.5]])
ADV = t([[2.0, 2.0, -1.0], [-1.0, 0.5, -1.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
# d loss / d logprob = -w r A / N unclipped, 0 clipped or masked (w = 1 here)
GRAD_W1 = t([[0.0, -1.1 * 2.0 / 5, 0.0], [-0.9 * -1.0 / 5, -0.7 * 0.5 / 5, 0.0]])  # [[0, -0.44, 0], [0.18, -0.07, 0]]
# raw behaviour weights for the decoupled examples; cap 5 clamps/drops (0,2) and (1,1)
W_RAW = t([[0.5, 2.0, 8.0], [1.0, 6.0, 3.0]])


def leaf(values):
    return values.clone().requires_grad_(True)


def example_logprobs():
    return leaf(PROX + torch.log(RATIO))


# ----------------------------------------------------------------------------- PPO clip


def test_ppo_clip_2x3_by_hand():
    lp = example_logprobs()
    loss, stats = ppo_clip_loss(lp, PROX, ADV, MASK)
    torch.testing.assert_close(loss, torch.tensor(-0.65, dtype=F64))
    loss.backward()
    torch.testing.assert_close(lp.grad, GRAD_W1)
    assert stats["clip_fraction"] == pytest.approx(2 / 5)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 1.1 + 0.5 + 0.9 + 0.7) / 5)  # 0.94
    kl = -(math.log(1.5) + math.log(1.1) + math.log(0.5) + math.log(0.9) + math.log(0.7)) / 5  # 0.130881
    assert stats["approx_kl"] == pytest.approx(kl)


def test_decoupled_with_prox_equal_behav_is_the_same_2x3_example():
    lp = example_logprobs()
    loss, stats = decoupled_ppo_loss(lp, PROX, PROX, ADV, MASK)
    torch.testing.assert_close(loss, torch.tensor(-0.65, dtype=F64))
    loss.backward()
    torch.testing.assert_close(lp.grad, GRAD_W1)
    assert stats["clip_fraction"] == pytest.approx(0.4)
    assert stats["behav_weight_mean"] == pytest.approx(1.0)
    assert stats["behav_masked_fraction"] == 0.0
    assert stats["ratio_mean"] == pytest.approx(0.94)


def test_asymmetric_clip_high():
    # A = (1, 1, -1), r = (1.25, 1.5, 0.75)
    # symmetric 0.2: min(1.25, 1.2)=1.2 -> -1.2; min(1.5, 1.2) -> -1.2; A<0: min(-0.75, -0.8) -> +0.8
    #   sum -1.6 / 3 = -0.533333, all three clipped
    # eps_clip_high 0.28: min(1.25, 1.28)=1.25 -> -1.25 (unclipped now); min(1.5, 1.28) -> -1.28;
    #   the lower side is still 0.8 -> +0.8; sum -1.73 / 3 = -0.576667, two of three clipped
    prox = t([[-1.0, -1.0, -1.0]])
    adv = t([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    lp_values = prox + torch.log(t([[1.25, 1.5, 0.75]]))
    for fn in ("ppo", "decoupled"):
        def run(fn=fn, **kw):
            lp = leaf(lp_values)
            if fn == "ppo":
                loss, stats = ppo_clip_loss(lp, prox, adv, mask, **kw)
            else:
                loss, stats = decoupled_ppo_loss(lp, prox, prox, adv, mask, **kw)
            loss.backward()
            return loss, stats, lp.grad

        loss, stats, grad = run(eps_clip=0.2)
        torch.testing.assert_close(loss, torch.tensor(-1.6 / 3, dtype=F64))
        assert stats["clip_fraction"] == pytest.approx(1.0)
        torch.testing.assert_close(grad, t([[0.0, 0.0, 0.0]]))

        loss, stats, grad = run(eps_clip=0.2, eps_clip_high=0.28)
        torch.testing.assert_close(loss, torch.tensor(-1.73 / 3, dtype=F64))
        assert stats["clip_fraction"] == pytest.approx(2 / 3)
        torch.testing.assert_close(grad, t([[-1.25 * 1.0 / 3, 0.0, 0.0]]))


# ----------------------------------------------------------------------------- behaviour weight


def test_behaviour_weight_modes_by_hand():
    behav = PROX - torch.log(W_RAW)          # prox - behav = log w
    # raw w = [[0.5, 2, 8], [1, 6, 3]], cap 5, (1,2) masked
    cap = behaviour_weight(PROX, behav, MASK, 5.0, "cap")
    torch.testing.assert_close(cap, t([[0.5, 2.0, 5.0], [1.0, 5.0, 0.0]]))
    dropped = behaviour_weight(PROX, behav, MASK, 5.0, "mask")
    torch.testing.assert_close(dropped, t([[0.5, 2.0, 0.0], [1.0, 0.0, 0.0]]))
    none = behaviour_weight(PROX, behav, MASK, 5.0, "none")
    torch.testing.assert_close(none, t([[0.5, 2.0, 8.0], [1.0, 6.0, 0.0]]))
    unbounded = behaviour_weight(PROX, behav, MASK, None, "cap")
    torch.testing.assert_close(unbounded, none)


def test_behaviour_weight_has_no_gradient():
    prox = leaf(PROX)
    behav = leaf(PROX - torch.log(W_RAW))
    w = behaviour_weight(prox, behav, MASK, 5.0, "cap")
    assert not w.requires_grad


def test_decoupled_cap_mode_by_hand():
    # unweighted per-token terms from the 2x3 example: [[-2.4, -2.2, 0.8], [0.9, -0.35, -]]
    # capped w = [[0.5, 2, 5], [1, 5, -]] -> -1.2 - 4.4 + 4.0 + 0.9 - 1.75 = -2.45, / 5 = -0.49
    lp = example_logprobs()
    behav = PROX - torch.log(W_RAW)
    loss, stats = decoupled_ppo_loss(lp, PROX, behav, ADV, MASK, behav_cap=5.0, behav_mode="cap")
    torch.testing.assert_close(loss, torch.tensor(-0.49, dtype=F64))
    loss.backward()
    # -w r A / N on unclipped tokens: (0,1) -2*1.1*2/5 = -0.88, (1,0) -1*0.9*-1/5 = 0.18, (1,1) -5*0.7*0.5/5 = -0.35
    torch.testing.assert_close(lp.grad, t([[0.0, -0.88, 0.0], [0.18, -0.35, 0.0]]))
    assert stats["behav_weight_mean"] == pytest.approx((0.5 + 2 + 5 + 1 + 5) / 5)   # 2.7
    assert stats["behav_masked_fraction"] == pytest.approx(2 / 5)                  # two clamped
    assert stats["clip_fraction"] == pytest.approx(2 / 5)                          # clipping ignores w


def test_decoupled_mask_mode_by_hand_keeps_dropped_tokens_in_the_denominator():
    # w = [[0.5, 2, 0], [1, 0, -]] -> -1.2 - 4.4 + 0 + 0.9 + 0 = -4.7, / 5 (not / 3) = -0.94
    lp = example_logprobs()
    behav = PROX - torch.log(W_RAW)
    loss, stats = decoupled_ppo_loss(lp, PROX, behav, ADV, MASK, behav_cap=5.0, behav_mode="mask")
    torch.testing.assert_close(loss, torch.tensor(-0.94, dtype=F64))
    loss.backward()
    torch.testing.assert_close(lp.grad, t([[0.0, -0.88, 0.0], [0.18, 0.0, 0.0]]))
    assert stats["behav_weight_mean"] == pytest.approx((0.5 + 2 + 0 + 1 + 0) / 5)  # 0.7
    assert stats["behav_masked_fraction"] == pytest.approx(2 / 5)


def test_decoupled_none_mode_by_hand():
    # w = [[0.5, 2, 8], [1, 6, -]] -> -1.2 - 4.4 + 6.4 + 0.9 - 2.1 = -0.4, / 5 = -0.08
    lp = example_logprobs()
    behav = PROX - torch.log(W_RAW)
    loss, stats = decoupled_ppo_loss(lp, PROX, behav, ADV, MASK, behav_cap=5.0, behav_mode="none")
    torch.testing.assert_close(loss, torch.tensor(-0.08, dtype=F64))
    assert stats["behav_masked_fraction"] == 0.0


def test_clipping_is_around_proximal_not_behaviour():
    # r = pi_theta / pi_prox = 1.1 is inside the trust region although pi_theta / pi_behav = 2.2
    # w = 2 -> loss = -2 * 1.1 * 1 = -2.2, gradient -2.2 (unclipped)
    prox = t([[-1.0]])
    behav = prox - math.log(2.0)
    lp = leaf(prox + math.log(1.1))
    loss, stats = decoupled_ppo_loss(lp, prox, behav, t([[1.0]]), torch.ones(1, 1, dtype=torch.bool))
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(-2.2, dtype=F64))
    torch.testing.assert_close(lp.grad, t([[-2.2]]))
    assert stats["clip_fraction"] == 0.0


# ----------------------------------------------------------------------------- gradients by hand


@pytest.mark.parametrize("normalizer, n", [(None, 1.0), (4.0, 4.0)])
def test_one_token_gradient_by_hand(normalizer, n):
    one = torch.ones(1, 1, dtype=torch.bool)
    prox = t([[-0.7]])
    behav = prox - math.log(1.5)            # w = 1.5, under the cap of 5
    adv = t([[2.0]])
    # unclipped: r = 1.1 -> loss = -1.5 * 1.1 * 2 / n = -3.3 / n, d/dlogprob = -w r A / n = -3.3 / n
    lp = leaf(prox + math.log(1.1))
    loss, _ = decoupled_ppo_loss(lp, prox, behav, adv, one, normalizer=normalizer)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(-3.3 / n, dtype=F64))
    torch.testing.assert_close(lp.grad, t([[-3.3 / n]]))
    # clipped: r = 1.5 > 1.2 with A > 0 -> loss = -1.5 * 1.2 * 2 / n = -3.6 / n, gradient 0
    lp = leaf(prox + math.log(1.5))
    loss, stats = decoupled_ppo_loss(lp, prox, behav, adv, one, normalizer=normalizer)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(-3.6 / n, dtype=F64))
    torch.testing.assert_close(lp.grad, t([[0.0]]))
    assert stats["clip_fraction"] == 1.0


def test_one_token_response_among_padding():
    # a response of one token at position 2; the rest is prompt/padding
    mask = torch.tensor([[0, 0, 1, 0]], dtype=torch.bool)
    prox = t([[-1.0, -1.0, -2.0, -1.0]])
    lp = leaf(prox + torch.log(t([[3.0, 3.0, 0.9, 3.0]])))
    adv = t([[5.0, 5.0, -1.0, 5.0]])
    # only (0,2): r = 0.9, A = -1 -> -min(-0.9, -0.9) = 0.9, N = 1; gradient -r A = 0.9
    for loss, _ in (ppo_clip_loss(lp, prox, adv, mask), decoupled_ppo_loss(lp, prox, prox, adv, mask)):
        lp.grad = None
        loss.backward()
        torch.testing.assert_close(loss, torch.tensor(0.9, dtype=F64))
        torch.testing.assert_close(lp.grad, t([[0.0, 0.0, 0.9, 0.0]]))


# ----------------------------------------------------------------------------- masking


@pytest.mark.parametrize("garbage", [50.0, float("-inf"), float("nan")])
def test_masked_tokens_affect_neither_value_nor_gradient(garbage):
    behav = PROX - torch.log(W_RAW)
    values = {}
    for name, fill in (("clean", None), ("dirty", garbage)):
        lp_values, prox, beh, adv = PROX + torch.log(RATIO), PROX.clone(), behav.clone(), ADV.clone()
        if fill is not None:
            for x in (lp_values, prox, beh, adv):
                x[1, 2] = fill
            prox[1, 2] = fill if math.isnan(fill) else -fill  # a different garbage value for prox
        lp = leaf(lp_values)
        loss, stats = decoupled_ppo_loss(lp, prox, beh, adv, MASK, behav_mode="none")
        loss.backward()
        lp2 = leaf(lp_values)
        loss2, _ = ppo_clip_loss(lp2, prox, adv, MASK)
        loss2.backward()
        values[name] = (loss, lp.grad, stats, loss2, lp2.grad)
    clean, dirty = values["clean"], values["dirty"]
    torch.testing.assert_close(dirty[0], torch.tensor(-0.08, dtype=F64))   # none-mode value from above
    torch.testing.assert_close(dirty[0], clean[0])
    torch.testing.assert_close(dirty[1], clean[1])
    assert dirty[2] == pytest.approx(clean[2])
    torch.testing.assert_close(dirty[3], torch.tensor(-0.65, dtype=F64))
    torch.testing.assert_close(dirty[4], clean[4])
    assert torch.isfinite(dirty[1]).all() and dirty[1][1, 2] == 0


def test_all_masked_gives_zero_loss_and_finite_gradient():
    mask = torch.zeros(2, 3, dtype=torch.bool)
    lp = leaf(PROX + torch.log(RATIO))
    loss, stats = decoupled_ppo_loss(lp, PROX, PROX - 1.0, ADV, mask)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(lp.grad, torch.zeros(2, 3, dtype=F64))
    assert all(v == 0.0 for v in stats.values())
    lp = leaf(PROX + torch.log(RATIO))
    loss, stats = ppo_clip_loss(lp, PROX, ADV, mask)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(lp.grad, torch.zeros(2, 3, dtype=F64))


def test_zero_length_response_in_a_batch_changes_nothing():
    # append a third sequence with no response tokens: the 2x3 example still gives -0.65
    mask = torch.cat([MASK, torch.zeros(1, 3, dtype=torch.bool)])
    prox = torch.cat([PROX, t([[-1.0, -1.0, -1.0]])])
    lp = leaf(prox + torch.log(torch.cat([RATIO, t([[2.0, 2.0, 2.0]])])))
    adv = torch.cat([ADV, t([[3.0, 3.0, 3.0]])])
    loss, _ = decoupled_ppo_loss(lp, prox, prox, adv, mask)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(-0.65, dtype=F64))
    torch.testing.assert_close(lp.grad, torch.cat([GRAD_W1, torch.zeros(1, 3, dtype=F64)]))


# ----------------------------------------------------------------------------- normalizer


def test_micro_batches_with_global_normalizer_sum_to_whole_batch():
    # row 0: (-2.4 - 2.2 + 0.8) / 5 = -0.76; row 1: (0.9 - 0.35) / 5 = 0.11; sum -0.65
    behav = PROX
    lp = example_logprobs()
    halves = []
    for rows, expected in ((slice(0, 1), -0.76), (slice(1, 2), 0.11)):
        loss, _ = decoupled_ppo_loss(lp[rows], PROX[rows], behav[rows], ADV[rows], MASK[rows], normalizer=5)
        torch.testing.assert_close(loss, torch.tensor(expected, dtype=F64))
        loss.backward()                        # gradients accumulate in lp.grad
        halves.append(loss.item())
    assert sum(halves) == pytest.approx(-0.65)
    torch.testing.assert_close(lp.grad, GRAD_W1)
    # without the global normalizer each half would be its own token-mean: -3.8/3 and 0.55/2
    loss0, _ = ppo_clip_loss(lp[:1], PROX[:1], ADV[:1], MASK[:1])
    torch.testing.assert_close(loss0, torch.tensor(-3.8 / 3, dtype=F64))


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("eps_clip_high", [None, 0.28])
def test_decoupled_equals_ppo_clip_when_proximal_is_behaviour(eps_clip_high):
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 7, generator=gen, dtype=F64) * 3
    lp_values = old + 0.4 * torch.randn(4, 7, generator=gen, dtype=F64)
    adv = torch.randn(4, 7, generator=gen, dtype=F64)
    mask = torch.rand(4, 7, generator=gen) > 0.3
    results = []
    for fn in ("ppo", "decoupled"):
        lp = leaf(lp_values)
        if fn == "ppo":
            loss, stats = ppo_clip_loss(lp, old, adv, mask, eps_clip_high=eps_clip_high)
        else:
            loss, stats = decoupled_ppo_loss(lp, old, old, adv, mask, eps_clip_high=eps_clip_high,
                                             behav_cap=5.0, behav_mode="mask")
        loss.backward()
        results.append((loss, lp.grad, stats))
    (l1, g1, s1), (l2, g2, s2) = results
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)
    assert 0 < s1["clip_fraction"] < 1                  # the example exercises both branches
    for key in ("clip_fraction", "approx_kl", "ratio_mean"):
        assert s1[key] == pytest.approx(s2[key])


# ----------------------------------------------------------------------------- dtypes and arguments


def test_low_precision_inputs_computed_in_float32():
    lp = (PROX + torch.log(RATIO)).to(torch.bfloat16).requires_grad_(True)
    loss, _ = ppo_clip_loss(lp, PROX.to(torch.bfloat16), ADV.to(torch.bfloat16), MASK)
    assert loss.dtype == torch.float32
    loss.backward()
    assert lp.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"behav_mode": "clip"}, "behav_mode"),
        ({"behav_cap": 0.0}, "behav_cap"),
        ({"behav_cap": -1.0}, "behav_cap"),
        ({"eps_clip": 0.0}, "eps_clip"),
        ({"eps_clip": 1.0}, "eps_clip"),
        ({"eps_clip_high": -0.1}, "eps_clip_high"),
        ({"normalizer": 0}, "normalizer"),
        ({"normalizer": float("nan")}, "normalizer"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    lp = example_logprobs()
    with pytest.raises(ValueError, match=name):
        decoupled_ppo_loss(lp, PROX, PROX, ADV, MASK, **kwargs)


def test_shape_mismatch_names_the_argument():
    lp = example_logprobs()
    with pytest.raises(ValueError, match="advantages"):
        decoupled_ppo_loss(lp, PROX, PROX, ADV[:, :2], MASK)
    with pytest.raises(ValueError, match="mask"):
        ppo_clip_loss(lp, PROX, ADV, MASK[:1])
    with pytest.raises(ValueError, match="behaviour_logprobs"):
        behaviour_weight(PROX, PROX[:1], MASK, 5.0, "cap")
    with pytest.raises(ValueError, match="behav_mode"):
        behaviour_weight(PROX, PROX, MASK, 5.0, "drop")


# ----------------------------------------------------------------------------- aggregation

NAN = float("nan")
# per-token values on MASK: row 0 (1, 2, 3), row 1 (4, 5, padding)
PER_TOKEN = t([[1.0, 2.0, 3.0], [4.0, 5.0, NAN]])


@pytest.mark.parametrize("mode, const, expected", [
    ("token_mean", None, 3.0),              # (1 + 2 + 3 + 4 + 5) / 5
    ("seq_mean", None, 3.25),               # (mean(1, 2, 3) + mean(4, 5)) / 2 = (2 + 4.5) / 2
    ("seq_sum_const", 10.0, 1.5),           # 15 / 10
])
def test_aggregate_by_hand(mode, const, expected):
    torch.testing.assert_close(aggregate(PER_TOKEN, MASK, mode, const), torch.tensor(expected, dtype=F64))
    # a zero-length response appended changes nothing (not counted as a sequence in seq_mean)
    per_token = torch.cat([PER_TOKEN, t([[NAN, NAN, NAN]])])
    mask = torch.cat([MASK, torch.zeros(1, 3, dtype=torch.bool)])
    torch.testing.assert_close(aggregate(per_token, mask, mode, const), torch.tensor(expected, dtype=F64))


def test_aggregate_gradients_by_hand():
    # seq_mean: d/dx_bt = 1 / (n_b * S): row 0 -> 1/(3*2) = 1/6, row 1 -> 1/(2*2) = 1/4
    x = PER_TOKEN.clone().requires_grad_(True)
    aggregate(x, MASK, "seq_mean").backward()
    torch.testing.assert_close(x.grad, t([[1 / 6, 1 / 6, 1 / 6], [0.25, 0.25, 0.0]]))
    x = PER_TOKEN.clone().requires_grad_(True)
    aggregate(x, MASK, "seq_sum_const", const=10.0).backward()
    torch.testing.assert_close(x.grad, t([[0.1, 0.1, 0.1], [0.1, 0.1, 0.0]]))


def test_aggregate_normalizer_for_micro_batches():
    # seq_mean with the whole batch's sequence count 4: (2 + 4.5) / 4; token_mean with 10 tokens: 15 / 10
    torch.testing.assert_close(aggregate(PER_TOKEN, MASK, "seq_mean", normalizer=4), torch.tensor(1.625, dtype=F64))
    torch.testing.assert_close(aggregate(PER_TOKEN, MASK, "token_mean", normalizer=10), torch.tensor(1.5, dtype=F64))
    # row by row with the global S = 2 adds up to the whole-batch seq_mean 3.25: 2/2 + 4.5/2
    halves = [aggregate(PER_TOKEN[i:i + 1], MASK[i:i + 1], "seq_mean", normalizer=2) for i in range(2)]
    torch.testing.assert_close(halves[0] + halves[1], torch.tensor(3.25, dtype=F64))


@pytest.mark.parametrize("kwargs, name", [
    ({"mode": "sum"}, "mode"),
    ({"mode": "seq_sum_const"}, "const"),
    ({"mode": "seq_sum_const", "const": 0.0}, "const"),
    ({"mode": "token_mean", "const": 5.0}, "const"),
    ({"mode": "seq_sum_const", "const": 5.0, "normalizer": 3}, "normalizer"),
    ({"mode": "seq_mean", "normalizer": -1}, "normalizer"),
])
def test_aggregate_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        aggregate(PER_TOKEN, MASK, **kwargs)
    with pytest.raises(ValueError, match="mask"):
        aggregate(PER_TOKEN, MASK[:1])


# ----------------------------------------------------------------------------- policy_loss: defaults, aggregation


def test_policy_loss_defaults_match_decoupled_ppo_loss_by_hand():
    # the capped 2x3 example from above: -0.49, gradient [[0, -0.88, 0], [0.18, -0.35, 0]]
    lp = example_logprobs()
    behav = PROX - torch.log(W_RAW)
    loss, stats = policy_loss(lp, PROX, behav, ADV, MASK)
    torch.testing.assert_close(loss, torch.tensor(-0.49, dtype=F64))
    loss.backward()
    torch.testing.assert_close(lp.grad, t([[0.0, -0.88, 0.0], [0.18, -0.35, 0.0]]))
    assert stats["behav_weight_mean"] == pytest.approx(2.7)
    assert stats["clip_fraction"] == pytest.approx(0.4)
    assert stats["dual_clip_fraction"] == 0.0


def test_policy_loss_without_behaviour_is_ppo_clip():
    # behaviour None: w = 1, the plain 2x3 PPO example -0.65
    lp = example_logprobs()
    loss, stats = policy_loss(lp, PROX, None, ADV, MASK)
    torch.testing.assert_close(loss, torch.tensor(-0.65, dtype=F64))
    loss.backward()
    torch.testing.assert_close(lp.grad, GRAD_W1)
    assert stats["behav_weight_mean"] == 1.0


def test_policy_loss_seq_mean_and_seq_sum_const_by_hand():
    # per-token losses (w = 1): row 0 (-2.4, -2.2, 0.8), row 1 (0.9, -0.35)
    # seq_mean: (-3.8/3 + 0.55/2) / 2 = (-1.266667 + 0.275) / 2 = -0.495833
    #   gradient -r A / (n_b * 2): (0,1) -2.2/6, (1,0) 0.9/4, (1,1) -0.35/4
    lp = example_logprobs()
    loss, _ = policy_loss(lp, PROX, None, ADV, MASK, agg_mode="seq_mean")
    torch.testing.assert_close(loss, torch.tensor((-3.8 / 3 + 0.55 / 2) / 2, dtype=F64))
    loss.backward()
    torch.testing.assert_close(lp.grad, t([[0.0, -2.2 / 6, 0.0], [0.9 / 4, -0.35 / 4, 0.0]]))
    # seq_sum_const 10: -3.25 / 10; gradient -r A / 10
    lp = example_logprobs()
    loss, _ = policy_loss(lp, PROX, None, ADV, MASK, agg_mode="seq_sum_const", agg_const=10.0)
    torch.testing.assert_close(loss, torch.tensor(-0.325, dtype=F64))
    loss.backward()
    torch.testing.assert_close(lp.grad, t([[0.0, -0.22, 0.0], [0.09, -0.035, 0.0]]))


# ----------------------------------------------------------------------------- dual clip

# one row, four tokens and a padding position; dual clip c = 3, eps 0.2
#   token  A    r     -rA    -clip(r)A   PPO max   -cA (A<0)   dual   d/dlogprob (dual)
#   0     -1    4.0   4.0    1.2         4.0       3.0         3.0    0 (capped)
#   1     -1    2.5   2.5    1.2         2.5       3.0         2.5    -rA / 4 = 0.625
#   2      2    4.0  -8.0   -2.4        -2.4       -          -2.4    0 (clipped, A > 0 never dual-clipped)
#   3     -1    0.5   0.5    0.8         0.8       3.0         0.8    0 (clipped)
#   dual sum 3.9 / 4 = 0.975; plain PPO sum 4.9 / 4 = 1.225 (token 0 then has gradient -rA/4 = 1.0)
DC_PROX = t([[-1.0, -1.0, -2.0, -0.5, NAN]])
DC_RATIO = t([[4.0, 2.5, 4.0, 0.5, 1.0]])
DC_ADV = t([[-1.0, -1.0, 2.0, -1.0, NAN]])
DC_MASK = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)


def dc_logprobs():
    return leaf(torch.where(DC_MASK, DC_PROX + torch.log(DC_RATIO), 0.0))


def test_dual_clip_by_hand():
    lp = dc_logprobs()
    loss, stats = policy_loss(lp, DC_PROX, None, DC_ADV, DC_MASK, dual_clip_c=3.0)
    torch.testing.assert_close(loss, torch.tensor(0.975, dtype=F64))
    loss.backward()
    torch.testing.assert_close(lp.grad, t([[0.0, 0.625, 0.0, 0.0, 0.0]]))
    assert stats["dual_clip_fraction"] == pytest.approx(1 / 4)
    assert stats["clip_fraction"] == pytest.approx(2 / 4)
    # without dual clip: plain PPO clip
    lp = dc_logprobs()
    loss, stats = policy_loss(lp, DC_PROX, None, DC_ADV, DC_MASK)
    torch.testing.assert_close(loss, torch.tensor(1.225, dtype=F64))
    loss.backward()
    torch.testing.assert_close(lp.grad, t([[1.0, 0.625, 0.0, 0.0, 0.0]]))
    assert stats["dual_clip_fraction"] == 0.0


def test_dual_clip_scales_with_the_behaviour_weight():
    # w = 2 on token 0 (behaviour logprob = prox - log 2): its capped loss 3.0 becomes 6.0;
    # others w = 1 -> (6 + 2.5 - 2.4 + 0.8) / 4 = 1.725
    behav = DC_PROX - torch.log(t([[2.0, 1.0, 1.0, 1.0, 1.0]]))
    loss, _ = policy_loss(dc_logprobs(), DC_PROX, behav, DC_ADV, DC_MASK, dual_clip_c=3.0)
    torch.testing.assert_close(loss, torch.tensor(1.725, dtype=F64))


@pytest.mark.parametrize("eps_clip_high", [None, 0.28])
def test_dual_clip_reduces_to_ppo_clip_when_not_active(eps_clip_high):
    # on the 2x3 example the A < 0 tokens have PPO losses 0.8 and 0.9, far under -cA = 3: nothing capped
    lp = example_logprobs()
    loss, stats = policy_loss(lp, PROX, PROX, ADV, MASK, dual_clip_c=3.0)
    torch.testing.assert_close(loss, torch.tensor(-0.65, dtype=F64))
    loss.backward()
    torch.testing.assert_close(lp.grad, GRAD_W1)
    assert stats["dual_clip_fraction"] == 0.0
    # and on random data with a cap no ratio reaches (r < e^2 < 10): same loss and gradient as ppo_clip_loss
    gen = torch.Generator().manual_seed(1)
    old = -torch.rand(4, 7, generator=gen, dtype=F64) * 3
    lp_values = old + (0.4 * torch.randn(4, 7, generator=gen, dtype=F64)).clamp(-2, 2)
    adv = torch.randn(4, 7, generator=gen, dtype=F64)
    mask = torch.rand(4, 7, generator=gen) > 0.3
    lp1, lp2 = leaf(lp_values), leaf(lp_values)
    l1, s1 = ppo_clip_loss(lp1, old, adv, mask, eps_clip_high=eps_clip_high)
    l2, s2 = policy_loss(lp2, old, old, adv, mask, eps_clip_high=eps_clip_high, dual_clip_c=10.0)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(lp1.grad, lp2.grad)
    assert s2["dual_clip_fraction"] == 0.0 and s1["clip_fraction"] == pytest.approx(s2["clip_fraction"])


@pytest.mark.parametrize("kwargs, name", [
    ({"dual_clip_c": 1.0}, "dual_clip_c"),
    ({"dual_clip_c": 0.5}, "dual_clip_c"),
    ({"agg_mode": "mean"}, "mode"),
    ({"agg_mode": "seq_sum_const"}, "const"),
    ({"behav_mode": "drop"}, "behav_mode"),
    ({"eps_clip": 1.5}, "eps_clip"),
])
def test_policy_loss_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        policy_loss(example_logprobs(), PROX, PROX, ADV, MASK, **kwargs)


# ----------------------------------------------------------------------------- GSPO

# seq 0: 3 tokens, log-ratios (0.3, -0.1, 0.1), mean 0.1 -> s = e^0.1 = 1.105171, A = 1  (inside [0.8, 1.2])
# seq 1: 2 tokens + padding, log-ratios (0.5, 0.3), mean 0.4 -> s = e^0.4 = 1.491825, A = 2 (clipped at 1.2)
# eps 0.2: loss = -(1 * 1.105171 + 2 * 1.2) / 2 = -1.752585
#   gradient: seq 0 tokens -A s / (|y| S) = -1.105171 / 6 = -0.184195; seq 1 clipped: 0
GS_OLD = t([[-1.0, -2.0, -0.5], [-1.0, -0.7, NAN]])
GS_LOG_RATIO = t([[0.3, -0.1, 0.1], [0.5, 0.3, 0.0]])
GS_ADV = t([1.0, 2.0])


def gs_logprobs():
    return leaf(torch.where(MASK, GS_OLD, 0.0) + GS_LOG_RATIO)


def test_gspo_by_hand():
    lp = gs_logprobs()
    loss, stats = gspo_loss(lp, GS_OLD, GS_ADV, MASK, eps_clip=0.2, eps_clip_high=None)
    torch.testing.assert_close(loss, torch.tensor(-(1.105171 + 2.4) / 2, dtype=F64), atol=1e-6, rtol=0)
    loss.backward()
    g = -1.105171 / 6
    torch.testing.assert_close(lp.grad, t([[g, g, g], [0.0, 0.0, 0.0]]), atol=1e-6, rtol=0)
    assert stats["clip_fraction"] == 0.5
    assert stats["seq_ratio_mean"] == pytest.approx((1.105171 + 1.491825) / 2, abs=1e-6)
    assert stats["approx_kl"] == pytest.approx(-(0.3 - 0.1 + 0.1 + 0.5 + 0.3) / 5)


def test_gspo_paper_clip_range_and_negative_advantage():
    # the paper's (3e-4, 4e-4): both ratios are above 1.0004 with A > 0 -> -(1 + 2) * 1.0004 / 2, no gradient
    lp = gs_logprobs()
    loss, stats = gspo_loss(lp, GS_OLD, GS_ADV, MASK, eps_clip=3e-4, eps_clip_high=4e-4)
    torch.testing.assert_close(loss, torch.tensor(-1.5006, dtype=F64))
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros(2, 3, dtype=F64)) and stats["clip_fraction"] == 1.0
    # A = -1 on both, eps 0.2: seq 0 s = 1.105171 inside [0.8, 1.2], r A = clip(r) A = -1.105171;
    # seq 1 s = 1.491825 > 1.2 but A < 0: min(-1.491825, -1.2) = -1.491825, the unclipped branch
    # loss = (1.105171 + 1.491825) / 2 = 1.298498
    loss, stats = gspo_loss(gs_logprobs(), GS_OLD, t([-1.0, -1.0]), MASK, eps_clip=0.2)
    torch.testing.assert_close(loss, torch.tensor(1.298498, dtype=F64), atol=1e-6, rtol=0)
    assert stats["clip_fraction"] == 0.0


def test_gspo_zero_length_sequence_and_normalizer():
    mask = torch.cat([MASK, torch.zeros(1, 3, dtype=torch.bool)])
    old = torch.cat([GS_OLD, t([[NAN, NAN, NAN]])])
    lp = leaf(torch.cat([gs_logprobs().detach(), t([[5.0, 5.0, 5.0]])]))
    loss, stats = gspo_loss(lp, old, t([1.0, 2.0, 7.0]), mask, eps_clip=0.2)
    torch.testing.assert_close(loss, torch.tensor(-(1.105171 + 2.4) / 2, dtype=F64), atol=1e-6, rtol=0)
    loss.backward()
    assert torch.equal(lp.grad[2], torch.zeros(3, dtype=F64)) and stats["clip_fraction"] == 0.5
    # global sequence count 4 (micro-batching): -(1.105171 + 2.4) / 4
    loss, _ = gspo_loss(gs_logprobs(), GS_OLD, GS_ADV, MASK, eps_clip=0.2, normalizer=4)
    torch.testing.assert_close(loss, torch.tensor(-(1.105171 + 2.4) / 4, dtype=F64), atol=1e-6, rtol=0)


def test_gspo_on_one_token_sequences_equals_token_level_ppo_clip():
    # the five valid tokens of the 2x3 example as five one-token sequences at varying positions:
    # s_i = r_i, so the loss is the token-level PPO value -3.25 / 5 = -0.65
    ratio = t([1.5, 1.1, 0.5, 0.9, 0.7])
    adv = t([2.0, 2.0, -1.0, -1.0, 0.5])
    mask = torch.zeros(5, 3, dtype=torch.bool)
    for i, pos in enumerate([0, 2, 1, 0, 2]):
        mask[i, pos] = True
    old = torch.full((5, 3), -1.3, dtype=F64)
    lp_values = torch.where(mask, old + torch.log(ratio)[:, None], 0.0)
    lp1, lp2 = leaf(lp_values), leaf(lp_values)
    l_gspo, s_gspo = gspo_loss(lp1, old, adv, mask, eps_clip=0.2, eps_clip_high=None)
    l_ppo, s_ppo = ppo_clip_loss(lp2, old, adv[:, None] * mask, mask)
    torch.testing.assert_close(l_gspo, torch.tensor(-0.65, dtype=F64))
    torch.testing.assert_close(l_gspo, l_ppo)
    l_gspo.backward()
    l_ppo.backward()
    torch.testing.assert_close(lp1.grad, lp2.grad)
    # the hand gradient: -r A / 5 on unclipped tokens (1.1 * 2, 0.9 * -1, 0.7 * 0.5), 0 on clipped ones
    expected = torch.zeros(5, 3, dtype=F64)
    expected[1, 2], expected[3, 0], expected[4, 2] = -0.44, 0.18, -0.07
    torch.testing.assert_close(lp1.grad, expected)
    assert s_gspo["clip_fraction"] == pytest.approx(s_ppo["clip_fraction"]) == pytest.approx(0.4)


def test_gspo_bad_arguments():
    with pytest.raises(ValueError, match="advantages"):
        gspo_loss(gs_logprobs(), GS_OLD, GS_ADV[:, None] * MASK, MASK)
    with pytest.raises(ValueError, match="old_logprobs"):
        gspo_loss(gs_logprobs(), GS_OLD[:1], GS_ADV, MASK)
    with pytest.raises(ValueError, match="eps_clip"):
        gspo_loss(gs_logprobs(), GS_OLD, GS_ADV, MASK, eps_clip=0.0)


# ----------------------------------------------------------------------------- rounding ties at the edges
# A ratio one ulp outside an edge can make the two branches round to the same float64
# (3 * LOW == 3 * 0.7, 1.72 * HIGH == 1.72 * 1.3, 1.35 * ABOVE_3 == 1.35 * 3): the loss values tie,
# but the gradient must still be the branch the ratio is on, -r A / N where the loss is smooth and
# 0 where it is clipped, not half of each.
LOW = math.nextafter(0.7, 0)        # 0.6999999999999998, just below 1 - eps for eps = 0.3
HIGH = math.nextafter(1.3, 2)       # 1.3000000000000003, just above 1 + eps
ABOVE_3 = math.nextafter(3.0, 4)    # 3.0000000000000004, just above dual_clip_c = 3
EDGE_TIES = [
    (LOW, 3.0, -2.1),               # A > 0 under the lower edge: unclipped, -r A = -0.7 * 3
    (HIGH, -1.72, 2.236),           # A < 0 over the upper edge: unclipped, -r A = 1.3 * 1.72
    (LOW, -3.0, 0.0),               # A < 0 under the lower edge: clipped
    (HIGH, 1.72, 0.0),              # A > 0 over the upper edge: clipped
]


@pytest.mark.parametrize("ratio, adv, grad", EDGE_TIES)
def test_ppo_clip_gradient_at_edge_rounding_ties(ratio, adv, grad):
    edge = 0.7 if ratio < 1 else 1.3
    assert -adv * ratio == -adv * edge                       # the two branches do tie
    lp = leaf(t([[math.log(ratio)]]))
    assert math.exp(lp.item()) == ratio
    loss, stats = ppo_clip_loss(lp, t([[0.0]]), t([[adv]]), torch.ones(1, 1, dtype=torch.bool), eps_clip=0.3)
    loss.backward()
    assert lp.grad.item() == pytest.approx(grad, rel=1e-12, abs=0.0)
    assert stats["clip_fraction"] == (1.0 if grad == 0.0 else 0.0)


@pytest.mark.parametrize("ratio, adv, grad", EDGE_TIES)
def test_gspo_gradient_at_edge_rounding_ties(ratio, adv, grad):
    lp = leaf(t([[math.log(ratio)]]))                        # one token: s = r
    loss, stats = gspo_loss(lp, t([[0.0]]), t([adv]), torch.ones(1, 1, dtype=torch.bool), eps_clip=0.3)
    loss.backward()
    assert lp.grad.item() == pytest.approx(grad, rel=1e-12, abs=0.0)
    assert stats["clip_fraction"] == (1.0 if grad == 0.0 else 0.0)


def test_dual_clip_gradient_at_rounding_tie():
    # A = -1.35, r just above c = 3: -r A == -c A in float64, and r > c means capped: gradient 0
    assert 1.35 * ABOVE_3 == 1.35 * 3.0
    lp = leaf(t([[math.log(ABOVE_3)]]))
    assert math.exp(lp.item()) == ABOVE_3
    loss, stats = policy_loss(lp, t([[0.0]]), None, t([[-1.35]]), torch.ones(1, 1, dtype=torch.bool),
                              dual_clip_c=3.0)
    loss.backward()
    assert loss.item() == pytest.approx(4.05, rel=1e-12)
    assert lp.grad.item() == 0.0
    assert stats["dual_clip_fraction"] == 1.0
