"""Offline preference losses on (prompt, chosen, rejected) pairs: DPO, IPO, conservative DPO, and their stats.

Notation, per pair: ``π_c, π_r`` the policy's sequence log-probabilities of the chosen and rejected
responses given the prompt (prompt tokens excluded, :func:`sequence_logprob`), ``ref_c, ref_r`` the same
under the frozen reference, and

    h = (π_c − ref_c) − (π_r − ref_r)                          (:func:`logratio_margin`)

the log-ratio margin. The implicit rewards of DPO are ``r_c = β (π_c − ref_c)`` and ``r_r = β (π_r − ref_r)``
(the reward under which the policy is the KL-regularised optimum), their margin ``r_c − r_r = β h``.

- DPO (Rafailov et al. 2023):      ``−log σ(β h)``
- conservative DPO / label smoothing ε (the preference label is flipped with probability ε):
                                   ``−(1 − ε) log σ(β h) − ε log σ(−β h)``;  ε = 0 is DPO
- IPO (Azar et al. 2023):          ``(h − 1/(2β))²``: regresses the margin to a finite target instead of
                                   pushing it to infinity, so it does not overfit deterministic preferences.

Every loss is returned per pair (callers average, weighting micro-batches by their share of the pairs).
``−log σ(x)`` is computed as ``softplus(−x)``, finite for any finite x. The Bradley-Terry reward-model loss
``−log σ(r_c − r_r)`` is :func:`areal_py.rewards.reward_model.bradley_terry_loss`, the same rule on a
reward model's scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

PreferenceLoss = Literal["dpo", "ipo"]


def check_settings(loss: str, beta: float, label_smoothing: float = 0.0) -> None:
    """β > 0 (IPO's target is 1/(2β); β = 0 makes DPO's loss constant), 0 ≤ ε < 0.5 (at ε = 0.5 the loss no
    longer prefers either response), and ε only with DPO. Raises ValueError naming the setting."""
    if loss not in ("dpo", "ipo"):
        raise ValueError(f"unknown preference loss {loss!r}: use dpo or ipo")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be finite and > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to the dpo loss (conservative DPO), not to ipo: set it to 0")


def sequence_logprob(token_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``Σ_t mask_t · logp_t`` per row: the log-probability of the response given the prompt.

    ``token_logprobs[i, t]`` is log π(token_{t+1} | tokens_≤t) (trainer.rollout_batch.token_logprobs) and
    ``response_mask[i, t]`` is 1 where token t+1 belongs to the response (EOS included), 0 on prompt tokens
    and padding. A masked position contributes exactly 0, even when its logprob is -inf (a padding id the
    model never predicts)."""
    if token_logprobs.shape != response_mask.shape:
        raise ValueError(f"token_logprobs {tuple(token_logprobs.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} differ in shape")
    mask = response_mask.bool()
    return torch.where(mask, token_logprobs, torch.zeros_like(token_logprobs)).sum(dim=-1)


def logratio_margin(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor) -> torch.Tensor:
    """``h = (π_c − ref_c) − (π_r − ref_r)`` per pair."""
    return (pi_c - ref_c) - (pi_r - ref_r)


def dpo_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """``−(1 − ε) log σ(β h) − ε log σ(−β h)`` per pair (ε = label_smoothing; ε = 0 is plain DPO)."""
    x = beta * h
    loss = F.softplus(-x)
    return (1.0 - label_smoothing) * loss + label_smoothing * F.softplus(x) if label_smoothing else loss


def ipo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """``(h − 1/(2β))²`` per pair."""
    return (h - 1.0 / (2.0 * beta)) ** 2


def preference_loss(h: torch.Tensor, loss: PreferenceLoss, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """The per-pair loss named by ``loss`` (dpo, with ``label_smoothing`` for conservative DPO, or ipo)."""
    check_settings(loss, beta, label_smoothing)
    return ipo_loss(h, beta) if loss == "ipo" else dpo_loss(h, beta, label_smoothing)


@dataclass(frozen=True)
class PreferenceStats:
    """Sums over a set of pairs (so micro-batches and ranks add up); :meth:`means` divides by ``pairs``.

    ``accuracy`` counts pairs whose implicit reward margin β h is > 0 (a tie counts as wrong: the policy
    has not yet preferred the chosen response; so it is 0 at the start, where the policy is the reference).
    ``ranked`` counts pairs the policy itself ranks right, π_c > π_r, whatever the reference says."""

    pairs: int
    loss: float
    reward_chosen: float
    reward_rejected: float
    margin: float
    accuracy: float
    ranked: float

    def __add__(self, other: PreferenceStats) -> PreferenceStats:
        return PreferenceStats(*(a + b for a, b in zip(self._values(), other._values())))

    def _values(self) -> tuple:
        return (self.pairs, self.loss, self.reward_chosen, self.reward_rejected, self.margin, self.accuracy,
                self.ranked)

    def means(self) -> dict[str, float]:
        """``{loss, reward_chosen, reward_rejected, margin, accuracy, ranked}`` averaged over the pairs."""
        n = max(1, self.pairs)
        return {"loss": self.loss / n, "reward_chosen": self.reward_chosen / n,
                "reward_rejected": self.reward_rejected / n, "margin": self.margin / n, "accuracy": self.accuracy / n, "ranked": self.ranked / n}


EMPTY_STATS = PreferenceStats(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


@torch.no_grad()
def preference_stats(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
                     losses: torch.Tensor, beta: float) -> PreferenceStats:
    """Summed implicit rewards ``r = β (π − ref)``, margins ``r_c − r_r``, accuracy ``[r_c > r_r]``, the policy's own
    ranking ``[π_c > π_r]`` and losses."""
    r_c, r_r = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    return PreferenceStats(int(pi_c.numel()), float(losses.sum()), float(r_c.sum()), float(r_r.sum()),
                           float((r_c - r_r).sum()), float((r_c > r_r).sum()), float((pi_c > pi_r).sum()))
