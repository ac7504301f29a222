"""Reward shaping between the verifier and the advantage estimator: pure functions on tensors.

    scale_rewards          r * scale
    clip_rewards           clip(r, low, high)
    batch_normalize        (r - mean) / (std + eps) over the whole batch
    group_normalize        the same within each prompt's group (GRPO's normalisation)
    overlong_penalty       DAPO's soft length penalty, added to the reward
    zero_truncated         reward 0 for responses cut off at the length limit
    uniform_groups         groups whose rewards are all equal (DAPO dynamic sampling drops them)

Standard deviations are population stds (unbiased=False), as in ``grpo_advantages``; a set of
rewards that are all equal normalises to exactly 0.
"""
from __future__ import annotations

import math

import torch

from trainer.algo.advantages import grpo_advantages
from trainer.algo.shapes import require_shape

__all__ = [
    "batch_normalize",
    "clip_rewards",
    "group_normalize",
    "overlong_penalty",
    "scale_rewards",
    "uniform_groups",
    "zero_truncated",
]


def _rewards(rewards: torch.Tensor) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor):
        raise ValueError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    return rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())


def _finite(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def scale_rewards(rewards: torch.Tensor, scale: float) -> torch.Tensor:
    """``r * scale`` (any shape)."""
    return _rewards(rewards) * _finite("scale", scale)


def clip_rewards(rewards: torch.Tensor, low: float | None = None, high: float | None = None) -> torch.Tensor:
    """``clip(r, low, high)`` (any shape); ``None`` leaves that side open.

    Always a new tensor, also with both sides open (``torch.clamp`` refuses two ``None`` bounds).
    """
    rewards = _rewards(rewards)
    lo = None if low is None else _finite("low", low)
    hi = None if high is None else _finite("high", high)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"low must be <= high, got low={low!r}, high={high!r}")
    if lo is None and hi is None:
        return rewards.clone()
    return rewards.clamp(min=lo, max=hi)


def batch_normalize(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(r - mean) / (std + eps)`` with mean and population std over every element (any shape).

    All-equal rewards (including a single one) give exactly 0.
    """
    rewards = _rewards(rewards)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if rewards.numel() == 0 or bool((rewards == rewards.reshape(-1)[0]).all()):
        return torch.zeros_like(rewards)
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)


def group_normalize(rewards: torch.Tensor, std_normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Per-group normalisation of ``rewards`` [G, n]: ``(r - mean_g) / (std_g + eps)``, or
    ``r - mean_g`` with ``std_normalize=False``. The same arithmetic as ``grpo_advantages``."""
    return grpo_advantages(rewards, std_normalize=std_normalize, eps=eps)


def overlong_penalty(lengths: torch.Tensor | list[int], max_len: int, cache_len: int,
                     factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476), to be *added* to the reward.

        L = |y|, start = max_len - cache_len
        penalty = 0                              if L <= start
                = factor * (start - L) / cache_len   if start < L <= max_len   (0 .. -factor, linear)
                = -factor                        if L > max_len

    A response that reaches ``max_len`` gets ``-factor``; one ``cache_len`` tokens shorter or
    less gets nothing. ``cache_len = 0`` leaves only the hard step beyond ``max_len``.
    ``lengths`` are response token counts, [B] (tensor or list) -> float penalties [B].
    """
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.tensor(lengths)
    if lengths.dim() != 1 or lengths.is_floating_point() or bool((lengths < 0).any()):
        raise ValueError(f"lengths must be non-negative integer token counts of shape [B], got {lengths!r}")
    if not (isinstance(max_len, int) and max_len > 0):
        raise ValueError(f"max_len must be an int > 0, got {max_len!r}")
    if not (isinstance(cache_len, int) and 0 <= cache_len <= max_len):
        raise ValueError(f"cache_len must be an int in [0, max_len={max_len}], got {cache_len!r}")
    factor = _finite("factor", factor)
    start = max_len - cache_len
    length = lengths.to(torch.get_default_dtype())
    soft = (start - length) / max(cache_len, 1)
    penalty = torch.where(length <= start, torch.zeros_like(length), soft)
    penalty = torch.where(length > max_len, torch.full_like(length, -1.0), penalty)
    return factor * penalty


def zero_truncated(rewards: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Reward 0 where ``truncated`` (the response hit the length limit without finishing), else r.

    ``truncated`` is a bool tensor of the rewards' shape. Often used instead of (or before)
    ``overlong_penalty``: a truncated answer is neither right nor wrong, so it teaches nothing.
    """
    rewards = _rewards(rewards)
    require_shape("truncated", truncated, rewards.shape, f"{tuple(rewards.shape)} (same as rewards)")
    return torch.where(truncated.bool(), torch.zeros_like(rewards), rewards)


def uniform_groups(rewards: torch.Tensor) -> torch.Tensor:
    """Bool [G]: True for groups of ``rewards`` [G, n] whose n rewards are all equal.

    Such a group has zero group-relative advantage and so no policy gradient; DAPO's dynamic
    sampling drops it and keeps sampling until the batch is full of informative groups. A
    one-sample group is uniform.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2 or rewards.shape[1] == 0:
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a torch.Tensor of shape [G, n] with n >= 1, got {shape}")
    return (rewards == rewards[:, :1]).all(dim=1)
