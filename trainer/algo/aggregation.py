"""Reducing a per-token loss to a scalar: token mean, sequence mean, or a constant (Dr.GRPO).

Kept apart from the losses because the choice is independent of the objective, and because
micro-batching depends on it: every micro-batch must divide by the *whole batch's* normaliser
for the accumulated gradient to equal the whole-batch loss's.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from trainer.algo.shapes import require_matrix, require_shape

__all__ = ["AGG_MODES", "AggMode", "aggregate"]

AggMode = Literal["token_mean", "seq_mean", "seq_sum_const"]
AGG_MODES: tuple[str, ...] = ("token_mean", "seq_mean", "seq_sum_const")


def normalizer_or_count(normalizer: float | torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor | float:
    """Default: the number of valid tokens (at least 1, so an all-masked batch gives 0, not NaN)."""
    if normalizer is None:
        return valid.sum().clamp(min=1)
    try:
        value = float(normalizer)
    except (TypeError, ValueError):
        raise ValueError(f"normalizer must be None or a finite number > 0, got {normalizer!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"normalizer must be None or a finite number > 0 (a token count), got {normalizer!r}")
    return value


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: AggMode = "token_mean", const: float | None = None,
              normalizer: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar. ``n_b`` is the number of valid tokens of row b.

        "token_mean":    sum_{b,t} m_bt x_bt / N           N = normalizer or sum_b n_b
        "seq_mean":      sum_b (sum_t m_bt x_bt / n_b) / S  S = normalizer or #rows with n_b > 0
        "seq_sum_const": sum_{b,t} m_bt x_bt / const        (Dr.GRPO: a constant, no length bias)

    token_mean weighs every token equally (long responses weigh more); seq_mean weighs every
    response equally (its tokens share 1/S, so long responses get smaller per-token weight, the
    length bias Dr.GRPO points out); seq_sum_const divides by a constant fixed for the whole
    run, e.g. ``batch_size * max_new_tokens`` to match the token_mean scale of full-length
    responses (Dr.GRPO writes it per sequence as sum_t x / L_max, averaged over the G samples:
    that is this with const = G * L_max). Rows with no valid token (a zero-length response) add
    nothing and are not counted in S. When micro-batching, pass the whole batch's N or S as
    ``normalizer`` so the micro-batch losses sum to the whole-batch loss; seq_sum_const needs no
    normalizer (its constant already is one) and rejects it.
    """
    require_matrix("per_token", per_token)
    require_shape("mask", mask, per_token.shape, f"{tuple(per_token.shape)} (same as per_token)")
    valid = mask.bool()
    if mode not in AGG_MODES:
        raise ValueError(f"mode must be one of {AGG_MODES}, got {mode!r}")
    if mode == "seq_sum_const":
        if not (isinstance(const, (int, float)) and math.isfinite(const) and const > 0):
            raise ValueError(f"const must be a finite number > 0 for mode 'seq_sum_const', got {const!r}")
        if normalizer is not None:
            raise ValueError("normalizer must be None for mode 'seq_sum_const' (const is the normalizer)")
    elif const is not None:
        raise ValueError(f"const is only used by mode 'seq_sum_const', got const={const!r} with mode {mode!r}")

    x = torch.where(valid, per_token, 0.0)
    if mode == "token_mean":
        return x.sum() / normalizer_or_count(normalizer, valid)
    if mode == "seq_sum_const":
        return x.sum() / float(const)
    tokens_per_seq = valid.sum(dim=1)
    nonempty = tokens_per_seq > 0
    seq_means = x.sum(dim=1) / tokens_per_seq.clamp(min=1)        # 0 for an empty row
    n_seqs = normalizer_or_count(normalizer, nonempty)
    return seq_means.sum() / n_seqs
