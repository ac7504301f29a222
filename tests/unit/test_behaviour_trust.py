"""The behaviour trust region (algo.offpolicy.behav_clip; trainer/algo/offpolicy.py), by hand.

One row of five tokens plus a padding position holding NaN, delta = 0.2, built from chosen
rho = pi_theta / pi_behav (behav = logprobs - log rho):

    rho = [1.5, 0.7, 1.1, 0.5, 1.3, -]       A = [+1, -1, +1, +1, -1, (+1)]
    token 0: A > 0, rho 1.5 > 1.2   stopped   (already pushed up past the region)
    token 1: A < 0, rho 0.7 < 0.8   stopped   (already pushed down past it)
    token 2: A > 0, rho 1.1         inside
    token 3: A > 0, rho 0.5         moved against its advantage: keeps its gradient
    token 4: A < 0, rho 1.3         moved against its advantage: keeps its gradient
"""
import math

import pytest
import torch

from trainer.algo.offpolicy import OffPolicySpec, behaviour_trust_clip
from trainer.algo.policy_loss import policy_loss

F64 = torch.float64
LOGP = torch.tensor([[-1.0, -2.0, -0.5, -1.5, -3.0, -1.0]], dtype=F64)
RHO = torch.tensor([[1.5, 0.7, 1.1, 0.5, 1.3, 1.0]], dtype=F64)
BEHAV = (LOGP - torch.log(RHO)).index_put((torch.tensor([0]), torch.tensor([5])), torch.tensor(math.nan, dtype=F64))
ADV = torch.tensor([[1.0, -1.0, 1.0, 1.0, -1.0, 1.0]], dtype=F64)
MASK = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
STOPPED = [[True, True, False, False, False, False]]


def test_the_stopped_tokens_by_hand():
    assert behaviour_trust_clip(LOGP, BEHAV, ADV, MASK, 0.2).tolist() == STOPPED


def test_zero_advantage_and_a_wider_region_stop_nothing():
    assert not behaviour_trust_clip(LOGP, BEHAV, torch.zeros_like(ADV), MASK, 0.2).any()
    assert not behaviour_trust_clip(LOGP, BEHAV, ADV, MASK, 0.6).any()      # 1.5 < 1.6 and 0.7 > 0.4
    assert behaviour_trust_clip(LOGP, BEHAV, ADV, MASK, 0.45).tolist() == [[True, False, False, False, False, False]]


@pytest.mark.parametrize("delta", [0.0, 1.0, -0.1, math.nan, True])
def test_delta_outside_0_1_is_an_error(delta):
    with pytest.raises(ValueError, match="delta"):
        behaviour_trust_clip(LOGP, BEHAV, ADV, MASK, delta)
    with pytest.raises(ValueError, match="behav_clip"):
        OffPolicySpec(behav_clip=delta)


def test_in_the_loss_stopped_tokens_keep_their_value_and_lose_their_gradient():
    """One update per batch: prox = logprobs (r = 1), no behaviour weight (method none), token mean over
    N = 5. loss = -(1/5) sum_t A_t = -(1 - 1 + 1 + 1 - 1)/5 = -0.2 with or without the region;
    d loss / d logp_t = -A_t / 5 = [-0.2, 0.2, -0.2, -0.2, 0.2], with tokens 0 and 1 zeroed."""
    grads, losses = {}, {}
    for delta in (None, 0.2):
        logp = LOGP.clone().requires_grad_(True)
        loss, stats = policy_loss(logp, LOGP, BEHAV, ADV, MASK,
                                  offpolicy=OffPolicySpec(method="none", behav_clip=delta))
        loss.backward()
        grads[delta], losses[delta] = logp.grad[0, :5].tolist(), float(loss.detach())
    assert losses[None] == pytest.approx(-0.2) and losses[0.2] == pytest.approx(-0.2)
    assert grads[None] == pytest.approx([-0.2, 0.2, -0.2, -0.2, 0.2])
    assert grads[0.2] == pytest.approx([0.0, 0.0, -0.2, -0.2, 0.2])
    assert stats["behav_clip_fraction"] == pytest.approx(2 / 5)
    assert stats["clip_fraction"] == pytest.approx(2 / 5)     # r = 1: only the behaviour region stops tokens


def test_on_policy_with_delta_eps_it_changes_nothing():
    """pi_behav = pi_prox: rho = r, so the region stops exactly the tokens the proximal clip already does."""
    g = torch.Generator().manual_seed(0)
    prox = -torch.rand(4, 7, generator=g, dtype=F64) * 3
    logp0 = prox + torch.randn(4, 7, generator=g, dtype=F64) * 0.3   # after some updates: r spread around 1
    adv = torch.randn(4, 7, generator=g, dtype=F64)
    mask = torch.rand(4, 7, generator=g) > 0.2
    out = {}
    for delta in (None, 0.2):
        logp = logp0.clone().requires_grad_(True)
        loss, stats = policy_loss(logp, prox, prox, adv, mask, eps_clip=0.2,
                                  offpolicy=OffPolicySpec(behav_clip=delta))
        loss.backward()
        out[delta] = (float(loss.detach()), logp.grad.clone(), stats["clip_fraction"])
    assert out[0.2][0] == pytest.approx(out[None][0])
    torch.testing.assert_close(out[0.2][1], out[None][1])
    assert out[0.2][2] == pytest.approx(out[None][2]) and out[None][2] > 0   # the clip did act


def test_with_the_default_weight_stale_tokens_are_weighted_and_stopped():
    """Default weight min(w, 5) with w = pi_prox / pi_behav = rho here (prox = logprobs): the loss is
    -(1/5) sum_t w_t A_t = -(1.5 - 0.7 + 1.1 + 0.5 - 1.3)/5 = -0.22; tokens 0 and 1 get no gradient,
    the others -w_t A_t / 5 = [-0.22, -0.1, 0.26]."""
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, LOGP, BEHAV, ADV, MASK, offpolicy=OffPolicySpec(behav_clip=0.2))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(-0.22)
    assert logp.grad[0, :5].tolist() == pytest.approx([0.0, 0.0, -0.22, -0.1, 0.26])
