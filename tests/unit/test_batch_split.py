"""trainer.batch_split: whole groups per rank, balanced by real tokens; pack/unpack round trip."""
from __future__ import annotations

import pytest
import torch

from trainer.batch_split import balance_groups, group_rows, group_tokens, pack_rows, unpack_rows
from trainer.rollout_batch import RolloutBatch


def test_balance_by_tokens_worked_by_hand():
    # descending: g0(5) -> r0 [5,0]; g1(3) -> r1 [5,3]; g2(3) -> r1 [5,6]; g3(2) -> r0 [7,6]; g4(1) -> r1 [7,7]
    assert balance_groups([5, 3, 3, 2, 1], 2) == [[0, 3], [1, 2, 4]]
    # one long group against many short ones: the long one alone on a rank
    assert balance_groups([1, 1, 10, 1, 1], 2) == [[2], [0, 1, 3, 4]]
    # ties go to the lower index and the lower rank
    assert balance_groups([4, 4, 4], 3) == [[0], [1], [2]]
    assert balance_groups([4, 4], 1) == [[0, 1]]


def test_fewer_groups_than_ranks_leaves_a_rank_empty():
    assert balance_groups([7], 2) == [[0], []]
    assert balance_groups([], 2) == [[], []]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="world_size"):
        balance_groups([1], 0)
    with pytest.raises(ValueError, match=">= 0"):
        balance_groups([1, -1], 2)


def _batch() -> RolloutBatch:
    # 2 groups of 2: real lengths 3, 4 | 2, 4
    attn = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    ids = torch.arange(16).view(4, 4) * attn
    loss = torch.tensor([[0, 1, 0], [0, 1, 1], [1, 0, 0], [0, 1, 1]], dtype=torch.float32)
    return RolloutBatch(ids, attn, loss, -loss * 0.5, (loss * 3 - 1).long(), torch.tensor([1, 2, 1, 2]),
                        torch.tensor([False, True, False, False]), torch.tensor([0.0, 1.0, 1.0, 0.0]), group_size=2)


def test_group_tokens_and_rows():
    b = _batch()
    assert group_tokens(b) == [7, 6]
    assert group_rows([1], 2).tolist() == [2, 3]
    assert group_rows([0, 1], 2).tolist() == [0, 1, 2, 3]


def test_pack_unpack_round_trip_is_exact():
    b = _batch()
    shaped = torch.tensor([0.5, -0.5, 1e-7, 3.0])
    adv = torch.randn(4, 3)
    packed = pack_rows(b, shaped, adv)
    assert packed.dtype == torch.float64 and packed.shape == (4, 2 * 4 + 4 * 3 + 3)
    padded = torch.cat([packed, torch.zeros(4, 5, dtype=torch.float64)], dim=1)  # scatter pads to the widest share
    back, adv_back = unpack_rows(padded, 4, 2)
    for name in ("input_ids", "attention_mask", "loss_mask", "behav_logprobs", "token_versions", "response_lengths",
                 "truncated"):
        x, y = getattr(back, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert torch.equal(back.rewards, shaped) and torch.equal(adv_back, adv) and back.group_size == 2
    with pytest.raises(ValueError, match="columns"):
        unpack_rows(packed[:, :10], 4, 2)
