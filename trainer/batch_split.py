"""Splitting a batch across trainer ranks: whole groups, balanced by real tokens. Pure functions.

The unit of the split is a GROUP (the n samples of one prompt), never a sample: anything computed
per group on a rank (GRPO/RLOO advantages with a KL reward penalty, which need the reference
logprobs each rank computes for its own rows) then sees the whole group, exactly as one process
would. The balance is by real tokens (prompt + response, the attention mask's sum), what the
forward and backward passes cost, not by sample count: long-tailed responses would otherwise leave
one rank with most of the work.

`pack_rows` / `unpack_rows` turn a share into one float64 matrix and back, so a share crosses
ranks as one tensor collective (no pickle). float64 holds every int64 token id and version below
2**53 and every float32 value exactly.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from trainer.rollout_batch import RolloutBatch


def balance_groups(group_tokens: Sequence[int], world_size: int) -> list[list[int]]:
    """Group indices per rank: groups in descending token order (ties: lower index first), each to the rank
    holding the fewest tokens so far (ties: the lower rank); each rank's list in ascending order, so a
    share keeps the batch's order. A rank gets no group when there are fewer groups than ranks."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if any(t < 0 for t in group_tokens):
        raise ValueError(f"group token counts must be >= 0, got {list(group_tokens)}")
    load = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for g in sorted(range(len(group_tokens)), key=lambda i: (-group_tokens[i], i)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        shares[r].append(g)
        load[r] += group_tokens[g]
    return [sorted(s) for s in shares]


def group_rows(groups: Sequence[int], group_size: int) -> torch.Tensor:
    """Row indices of ``groups`` in a batch whose rows g*n .. g*n+n-1 are group g."""
    return torch.tensor([g * group_size + i for g in groups for i in range(group_size)], dtype=torch.long)


def group_tokens(batch: RolloutBatch) -> list[int]:
    """Real tokens (prompt + response) of each group of ``batch``."""
    return batch.attention_mask.sum(dim=1).view(-1, batch.group_size).sum(dim=1).tolist()


def _columns(width: int) -> int:
    """Packed columns for a share of padded width ``width``: input_ids and attention_mask (width each),
    loss_mask, behav_logprobs, token_versions and advantages (width - 1 each), and three per-row values."""
    return 2 * width + 4 * (width - 1) + 3


def pack_rows(batch: RolloutBatch, rewards: torch.Tensor, advantages: torch.Tensor | None) -> torch.Tensor:
    """[S, _columns(L)] float64: ``batch``'s rows, their shaped ``rewards`` in place of the raw ones, and the
    per-token ``advantages`` (zeros when None)."""
    S, L = batch.input_ids.shape
    adv = advantages if advantages is not None else torch.zeros(S, L - 1)
    parts = [batch.input_ids, batch.attention_mask, batch.loss_mask, batch.behav_logprobs, batch.token_versions, adv,
             batch.response_lengths[:, None], batch.truncated[:, None], rewards[:, None]]
    return torch.cat([p.to(torch.float64) for p in parts], dim=1)


def unpack_rows(packed: torch.Tensor, width: int, group_size: int) -> tuple[RolloutBatch, torch.Tensor]:
    """The inverse of `pack_rows` for a share of padded width ``width`` (extra padding columns of ``packed``
    are ignored): (the batch, with the shaped rewards in ``rewards``; its [S, width-1] advantages)."""
    if packed.shape[1] < _columns(width):
        raise ValueError(f"packed share has {packed.shape[1]} columns, a width of {width} needs {_columns(width)}")
    cuts = [width, width, width - 1, width - 1, width - 1, width - 1, 1, 1, 1]
    ids, attn, loss, behav, versions, adv, lengths, truncated, rewards = packed[:, : sum(cuts)].split(cuts, dim=1)
    batch = RolloutBatch(ids.long(), attn.long(), loss.float(), behav.float(), versions.long(),
                         response_lengths=lengths[:, 0].long(), truncated=truncated[:, 0].bool(),
                         rewards=rewards[:, 0].float(), group_size=group_size)
    return batch, adv.float()
