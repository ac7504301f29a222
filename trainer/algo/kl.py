"""KL control against a frozen reference policy: per-token estimators, coefficient controllers,
and the KL-penalised token reward.

Only the sampled token's logprob is known under each policy, so KL(pi_theta || pi_ref) is
estimated per token from the log-ratio ``x_t = log pi_theta(a_t) - log pi_ref(a_t)`` of a
sample a_t ~ pi_theta (J. Schulman, "Approximating KL Divergence", 2020):

    k1 = x                            unbiased, high variance, can be negative
    k2 = 0.5 * x^2                    biased (exact to second order), always >= 0
    k3 = exp(-x) - (-x) - 1           unbiased and >= 0 (GRPO's choice); in terms of the
       = exp(ref - logp) - (ref - logp) - 1          reference: the "ratio - 1 - log ratio" form

The penalty is used either in the reward (PPO/RLHF, REINFORCE++: ``kl_penalised_token_rewards``)
or as a loss term (GRPO: ``coef * aggregate(kl_estimate(...), mask)``). Its coefficient is fixed
(``FixedKLController``) or adapted towards a target KL (``AdaptiveKLController``, Ziegler et al.
2019, "Fine-Tuning Language Models from Human Preferences").
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from trainer.algo.shapes import require_matrix, require_shape

__all__ = ["KL_KINDS", "AdaptiveKLController", "FixedKLController", "kl_estimate", "kl_penalised_token_rewards"]

KLKind = Literal["k1", "k2", "k3"]
KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3")


def _check_same_shape(reference: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None:
            require_shape(name, t, reference.shape, f"{tuple(reference.shape)} (same as logprobs)")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLKind = "k3",
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled-token logprobs, same shape ([B, T]).

        x  = logprobs - ref_logprobs
        k1 = x;   k2 = 0.5 * x^2;   k3 = exp(-x) + x - 1 = exp(ref - logp) - (ref - logp) - 1

    ``logprobs`` keeps its gradient (the estimate can be a loss term); ``ref_logprobs`` is a
    constant. With ``mask`` given, masked positions are 0 and never reach the arithmetic (they
    may hold -inf or NaN). Computed in at least float32.
    """
    if not isinstance(logprobs, torch.Tensor):
        raise ValueError(f"logprobs must be a torch.Tensor, got {type(logprobs).__name__}")
    _check_same_shape(logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    lp, ref = logprobs.to(dtype), ref_logprobs.detach().to(dtype)
    if mask is not None:
        valid = mask.bool()
        lp, ref = torch.where(valid, lp, 0.0), torch.where(valid, ref, 0.0)
    log_ratio = lp - ref                                       # x = log pi_theta - log pi_ref
    if kind == "k1":
        kl = log_ratio
    elif kind == "k2":
        kl = 0.5 * log_ratio ** 2
    else:
        kl = torch.exp(-log_ratio) + log_ratio - 1.0           # exp(ref - logp) - (ref - logp) - 1
    return kl if mask is None else torch.where(valid, kl, 0.0)


def kl_penalised_token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                               coef: float) -> torch.Tensor:
    """Token rewards for PPO / REINFORCE++: the sequence score on the last valid token, minus the
    KL penalty on every valid token. ``score`` [B], ``kl`` and ``mask`` [B, T] -> [B, T].

        r_t = -coef * kl_t + [t == last valid token of the row] * score_b       (0 where masked)

    No gradient (rewards are targets). A row with no valid token (zero-length response) gets
    all zeros: its score has no token to sit on.
    """
    require_matrix("kl", kl)
    require_shape("mask", mask, kl.shape, f"{tuple(kl.shape)} (same as kl)")
    require_shape("score", score, kl.shape[:1], f"[B] = {tuple(kl.shape[:1])}")
    if not (isinstance(coef, (int, float)) and math.isfinite(coef) and coef >= 0):
        raise ValueError(f"coef must be a finite number >= 0, got {coef!r}")
    valid = mask.bool()
    dtype = torch.promote_types(torch.promote_types(kl.dtype, score.dtype), torch.float32)
    rewards = torch.where(valid, -coef * kl.detach().to(dtype), 0.0)
    T = kl.shape[1]
    positions = torch.arange(T).expand_as(valid)
    last = torch.where(valid, positions, -1).max(dim=1).values             # -1 for an empty row
    is_last = (positions == last[:, None]) & valid
    return rewards + torch.where(is_last, score.detach().to(dtype)[:, None], 0.0)


class FixedKLController:
    """A constant KL coefficient; ``update`` does nothing (same interface as the adaptive one)."""

    def __init__(self, coef: float) -> None:
        if not (isinstance(coef, (int, float)) and math.isfinite(coef) and coef >= 0):
            raise ValueError(f"coef must be a finite number >= 0, got {coef!r}")
        self.coef = float(coef)

    def update(self, observed_kl: float, n_steps: int) -> float:
        return self.coef


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019): steer the observed KL towards ``target``.

        error = clip(observed_kl / target - 1, -0.2, 0.2)
        coef  = coef * (1 + error * n_steps / horizon)

    ``observed_kl`` is the mean per-sequence (or per-token, consistently with ``target``) KL of
    the last batch, ``n_steps`` the number of samples (or steps) it covers; ``horizon`` sets how
    many such units it takes to change the coefficient by a factor of about e^0.2. The clip
    bounds the change per update: one wild KL reading cannot blow the coefficient up. The
    coefficient never goes below 0 (only reachable with n_steps > 5 * horizon).
    """

    def __init__(self, init_coef: float, target: float, horizon: float) -> None:
        if not (isinstance(init_coef, (int, float)) and math.isfinite(init_coef) and init_coef >= 0):
            raise ValueError(f"init_coef must be a finite number >= 0, got {init_coef!r}")
        if not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
            raise ValueError(f"target must be a finite number > 0, got {target!r}")
        if not (isinstance(horizon, (int, float)) and math.isfinite(horizon) and horizon > 0):
            raise ValueError(f"horizon must be a finite number > 0, got {horizon!r}")
        self.coef = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, observed_kl: float, n_steps: int) -> float:
        """Apply one update and return the new coefficient."""
        try:
            kl = float(observed_kl)
        except (TypeError, ValueError):
            raise ValueError(f"observed_kl must be a finite number, got {observed_kl!r}") from None
        if not math.isfinite(kl):
            raise ValueError(f"observed_kl must be a finite number, got {observed_kl!r}")
        if not (isinstance(n_steps, (int, float)) and math.isfinite(n_steps) and n_steps >= 0):
            raise ValueError(f"n_steps must be a finite number >= 0, got {n_steps!r}")
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef = max(0.0, self.coef * (1.0 + error * n_steps / self.horizon))
        return self.coef
