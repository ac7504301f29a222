"""Group-relative advantages (GRPO / Dr.GRPO): the group of samples of one prompt is its own baseline.

GRPO replaces PPO's learned value function by the statistics of the n samples drawn for the
same prompt, so no critic is trained:

    A_i = (r_i - mean(r)) / (std(r) + eps)      (GRPO)
    A_i =  r_i - mean(r)                        (Dr.GRPO: no std division, which otherwise
                                                 up-weights prompts that are almost always
                                                 right or almost always wrong)

The advantage is per sequence; every token of the response gets the same value
(``expand_to_tokens``).
"""
from __future__ import annotations

import math

import torch

__all__ = ["grpo_advantages", "expand_to_tokens"]


def grpo_advantages(rewards: torch.Tensor, std_normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample advantages for ``rewards`` of shape [G, n] (G prompts, n samples each) -> [G, n].

        mean_g = (1/n) sum_i r_gi
        std_g  = sqrt((1/n) sum_i (r_gi - mean_g)^2)      population std (unbiased=False)
        A_gi   = (r_gi - mean_g) / (std_g + eps)          if std_normalize
        A_gi   =  r_gi - mean_g                           otherwise (Dr.GRPO)

    The population std is used because it is defined for every group size: with n = 1 the
    unbiased std divides by n - 1 = 0. A group whose rewards are all equal (including any
    one-sample group) carries no learning signal and gets exactly 0, not the rounding noise of
    ``r - mean`` amplified by ``1 / eps``.
    """
    if not isinstance(rewards, torch.Tensor):
        raise ValueError(f"rewards must be a torch.Tensor of shape [G, n], got {type(rewards).__name__}")
    if rewards.dim() != 2 or rewards.shape[1] == 0:
        raise ValueError(f"rewards must have shape [G, n] with n >= 1, got {tuple(rewards.shape)}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())

    mean = rewards.mean(dim=1, keepdim=True)
    centred = rewards - mean
    if std_normalize:
        std = rewards.std(dim=1, unbiased=False, keepdim=True)
        advantages = centred / (std + eps)
    else:
        advantages = centred
    all_equal = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    return torch.where(all_equal, torch.zeros_like(advantages), advantages)


def expand_to_tokens(seq_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcast one value per sequence [B] over its tokens: ``out[b, t] = seq_values[b] * mask[b, t]``.

    Padding and prompt positions (mask 0) get 0, so the advantage lives only on response tokens.
    """
    if seq_values.dim() != 1:
        raise ValueError(f"seq_values must have shape [B], got {tuple(seq_values.shape)}")
    if mask.dim() != 2 or mask.shape[0] != seq_values.shape[0]:
        raise ValueError(
            f"mask must have shape [B, T] with B = {seq_values.shape[0]} (len(seq_values)), got {tuple(mask.shape)}")
    values = seq_values if seq_values.is_floating_point() else seq_values.to(torch.get_default_dtype())
    return values[:, None] * mask.to(values.dtype)
