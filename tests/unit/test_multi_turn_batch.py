"""A multi-turn sample on the wire and in the trainer: the loss mask is validated, collated, and every loss
term, the proximal logprobs and the staleness statistics see the model's tokens only (hand-computed)."""
from __future__ import annotations

import math

import pytest
import torch

from areal_py.wire import protocol as P
from controller.batching import pick_batch
from trainer.algo.aggregation import aggregate
from trainer.algo.kl import kl_estimate
from trainer.algo.policy_loss import policy_loss
from trainer.algo.proximal import loglinear_proximal
from trainer.rollout_batch import collate
from trainer.step_metrics import staleness

# response: model tokens 7 8 (versions 2, 3), tool output 9 9 (mask 0, carrying version 3), model token 6 (v 3)
MULTI = P.Sample(output_ids=[7, 8, 9, 9, 6], logprobs=[-0.5, -1.0, 0.0, 0.0, -2.0], versions=[2, 3, 3, 3, 3],
                 finish_reason="stop", reward=1.0, loss_mask=[1, 1, 0, 0, 1])
SINGLE = P.Sample(output_ids=[7, 8], logprobs=[-0.5, -1.0], versions=[4, 4], finish_reason="stop", reward=0.0)


def test_sample_mask_is_validated_and_absent_for_single_turn_on_the_wire() -> None:
    with pytest.raises(ValueError, match="5 output_ids.*4 loss_mask"):
        P.Sample(**{**MULTI.model_dump(), "loss_mask": [1, 1, 0, 0]})
    with pytest.raises(ValueError, match="less than or equal to 1"):
        P.Sample(**{**MULTI.model_dump(), "loss_mask": [1, 1, 2, 0, 1]})
    with pytest.raises(ValueError, match="3 logprobs"):
        P.Sample(**{**SINGLE.model_dump(), "logprobs": [0.0, 0.0, 0.0]})
    assert "loss_mask" not in SINGLE.model_dump()  # single-turn samples are the bytes they were
    group = P.Group(gid=0, prompt_index=0, prompt_ids=[1, 2], samples=[MULTI, SINGLE])
    batch = P.Batch(version=3, groups=[group], state=P.ControllerState())
    back = P.decode(P.encode(batch)).body
    assert back.groups[0].samples == [MULTI, SINGLE]
    assert MULTI.model_versions() == [2, 3, 3] and SINGLE.model_versions() == [4, 4]


def test_collate_masks_tool_tokens_out_of_every_trained_tensor() -> None:
    b = collate([P.Group(gid=0, prompt_index=0, prompt_ids=[1, 2], samples=[MULTI, SINGLE])], pad_id=0)
    # positions are those of the predicted token: the response starts at prompt length - 1 = 1
    assert b.input_ids[0].tolist() == [1, 2, 7, 8, 9, 9, 6]
    assert b.loss_mask.tolist() == [[0, 1, 1, 0, 0, 1], [0, 1, 1, 0, 0, 0]]
    assert b.behav_logprobs[0].tolist() == [0.0, -0.5, -1.0, 0.0, 0.0, -2.0]
    assert b.token_versions.tolist() == [[-1, 2, 3, -1, -1, 3], [-1, 4, 4, -1, -1, -1]]
    token_stale, hist = staleness(b, trained_version=4)
    assert token_stale.tolist() == [2, 1, 1, 0, 0] and hist == {2: 1, 0: 1}


def test_loss_kl_entropy_and_proximal_ignore_masked_tokens() -> None:
    """Hand-computed: on the row's three model tokens r = 1.1, 0.5, 1.0 with A = 1 and eps 0.2 the clipped
    objective min(r A, clip(r, 0.8, 1.2) A) is 1.1, 0.5, 1.0, so the token-mean loss is -(1.1 + 0.5 + 1.0) / 3.
    Wild values on the tool tokens change neither it nor any gradient."""
    b = collate([P.Group(gid=0, prompt_index=0, prompt_ids=[1, 2], samples=[MULTI])], pad_id=0)
    mask, behav = b.loss_mask, b.behav_logprobs
    shift = torch.tensor([[0.0, math.log(1.1), math.log(0.5), 0.0, 0.0, 0.0]])
    adv = torch.ones_like(mask)

    def loss_with(tool_value: float) -> tuple[float, torch.Tensor]:
        logp = (behav + shift).clone()
        logp[0, 3:5] = tool_value  # the tool tokens' positions
        logp.requires_grad_(True)
        loss, _ = policy_loss(logp, behav, behav, adv, mask, eps_clip=0.2)
        loss.backward()
        return float(loss.detach()), logp.grad

    expected = -(1.1 + 0.5 + 1.0) / 3
    for wild in (0.0, 5.0, -30.0):
        value, grad = loss_with(wild)
        assert value == pytest.approx(expected, abs=1e-6)
        assert grad[0, 3:5].abs().sum() == 0 and grad[0, 0] == 0
    # KL and entropy terms: tool positions with huge values leave the token-mean over model tokens unchanged
    ref = behav.clone()
    ref[0, 3:5] = -50.0
    per_token = torch.tensor([[9.0, 1.0, 2.0, 99.0, 99.0, 3.0]])
    assert float(aggregate(per_token, mask)) == pytest.approx(2.0)
    assert float(aggregate(kl_estimate(behav, ref, "k1", mask), mask)) == pytest.approx(0.0)
    # loglinear proximal: the tool tokens (version -1) keep the behaviour value, as the prompt does
    prox = loglinear_proximal(behav, behav - 1.0, b.token_versions, 3, 4)
    assert prox[0, 3:5].tolist() == [0.0, 0.0]


def test_batching_counts_staleness_over_model_tokens() -> None:
    old = P.Sample(**{**MULTI.model_dump(), "versions": [1, 3, 3, 3, 3]})  # oldest model token: version 1
    groups = [P.Group(gid=i, prompt_index=i, prompt_ids=[1], samples=[s]) for i, s in enumerate([MULTI, old])]
    pick = pick_batch(groups, batch_version=4, batch_size=1, max_token_staleness=2)
    assert pick.ages == [2] and pick.groups[0].gid == 0 and pick.dropped == 1
