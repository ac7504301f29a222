"""PPO losses for asynchronous RL: AReaL's decoupled objective and the standard clipped one.

In asynchronous training each token has three policies: the behaviour policy ``pi_behav`` that
sampled it (any recent version; an interrupted trajectory mixes several), the proximal policy
``pi_prox`` (the trainer's weights before this update, logprobs recomputed), and the current
policy ``pi_theta`` being optimised. The decoupled objective (AReaL, arXiv 2505.24298) clips
the trust region around ``pi_prox`` instead of around the stale ``pi_behav``, and corrects for
the off-policy sampling with an importance weight that carries no gradient:

    r_t  = pi_theta(a_t) / pi_prox(a_t)
    w_t  = pi_prox(a_t)  / pi_behav(a_t)             (bounded: trainer/algo/offpolicy.py)
    loss = -(1/N) sum_t w_t * min(r_t A_t, clip(r_t, 1 - eps, 1 + eps_high) A_t)

When ``pi_prox == pi_behav`` (on-policy, no interruption) every ``w_t = 1`` and this is standard
PPO (``ppo_clip_loss``).

Token-mean reduction: the sum runs over all valid tokens of the batch and N is their count. A
trainer that splits a batch into micro-batches passes the whole batch's token count as
``normalizer`` so the accumulated gradient equals the whole-batch token-mean.

Masked positions (prompt, padding) never reach the loss, its gradient or the statistics, even
when they hold -inf or NaN: they are replaced before any arithmetic, not multiplied by 0
afterwards (0 * inf is NaN, in the forward and in the backward pass).

Functions:

    clipped_surrogate   PPO's clipped surrogate per element: the one place the clipping is written
    policy_loss         the decoupled loss plus dual clip (Ye et al. 2020) and a choice of aggregation
                        (trainer/algo/aggregation.py)
    decoupled_ppo_loss  policy_loss with token-mean aggregation and no dual clip: the paper's formula
    ppo_clip_loss       policy_loss with no behaviour weight: standard PPO
    gspo_loss           GSPO (Zheng et al. 2025): one length-normalised importance ratio per sequence
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from trainer.algo.aggregation import AggMode, aggregate, normalizer_or_count
from trainer.algo.offpolicy import BehaviourWeight, OffPolicySpec, behaviour_trust_clip, offpolicy_weight
from trainer.algo.shapes import require_matrix, require_shape

__all__ = ["BEHAV_MODES", "behaviour_weight", "clipped_surrogate", "decoupled_ppo_loss", "gspo_loss", "legacy_spec",
           "policy_loss", "ppo_clip_loss"]

BehavMode = Literal["cap", "mask", "none"]
BEHAV_MODES: tuple[str, ...] = ("cap", "mask", "none")


# ----------------------------------------------------------------------------- argument checks

def _valid_mask(mask: torch.Tensor, shape: torch.Size, **tensors: torch.Tensor) -> torch.Tensor:
    """The mask as bool after checking every tensor has the mask's shape."""
    for name, t in {"mask": mask, **tensors}.items():
        require_shape(name, t, shape, f"{tuple(shape)} (same as logprobs)")
    return mask.bool()


def _clip_range(eps_clip: float, eps_clip_high: float | None) -> tuple[float, float]:
    if not (isinstance(eps_clip, (int, float)) and 0 < eps_clip < 1):
        raise ValueError(f"eps_clip must be a number in (0, 1), got {eps_clip!r}")
    if eps_clip_high is None:
        return float(eps_clip), float(eps_clip)
    if not (isinstance(eps_clip_high, (int, float)) and math.isfinite(eps_clip_high) and eps_clip_high > 0):
        raise ValueError(f"eps_clip_high must be None or a finite number > 0, got {eps_clip_high!r}")
    return float(eps_clip), float(eps_clip_high)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """At least float32: exp of logprob differences in bf16 is too coarse for a ratio near 1."""
    return torch.promote_types(t.dtype, torch.float32)


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> float:
    """Mean of ``x`` over valid positions as a Python float; 0.0 when nothing is valid."""
    count = int(valid.sum())
    if count == 0:
        return 0.0
    return float(x.detach().to(torch.float64)[valid].sum()) / count


# ----------------------------------------------------------------------------- behaviour weight

def legacy_spec(cap: float | None, mode: str) -> OffPolicySpec:
    """The correction the ``behav_cap``/``behav_mode`` arguments name, as an OffPolicySpec.

        "cap"  -> filter, token, clamp, ratio, upper=cap      min(w_t, cap)
        "mask" -> filter, token, mask,  ratio, upper=cap      w_t if w_t <= cap else 0
        "none" -> filter with no bound                         w_t (unbiased, unbounded variance)

    ``cap=None`` is unbounded in every mode (the raw weight).
    """
    if mode not in BEHAV_MODES:
        raise ValueError(f"behav_mode must be one of {BEHAV_MODES}, got {mode!r}")
    if cap is not None and not (isinstance(cap, (int, float)) and math.isfinite(cap) and cap > 0):
        raise ValueError(f"behav_cap must be None (unbounded) or a finite number > 0, got {cap!r}")
    if mode == "none" or cap is None:
        return OffPolicySpec(method="filter", upper=None)
    return OffPolicySpec(method="filter", action="clamp" if mode == "cap" else "mask", upper=float(cap))


def _correction(offpolicy: OffPolicySpec | None, behav_cap: float | None, behav_mode: str) -> OffPolicySpec:
    """``offpolicy`` if given (then behav_cap/behav_mode must be left at their defaults), else the legacy pair."""
    if offpolicy is None:
        return legacy_spec(behav_cap, behav_mode)
    if (behav_cap, behav_mode) != (5.0, "cap"):
        raise ValueError(f"pass either offpolicy or behav_cap/behav_mode, not both (got offpolicy={offpolicy}, "
                         f"behav_cap={behav_cap!r}, behav_mode={behav_mode!r})")
    return offpolicy


def behaviour_weight(proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                     cap: float | None, mode: BehavMode) -> torch.Tensor:
    """Off-policy correction ``w_t = exp(log pi_prox - log pi_behav)``, bounded, without gradient.

        "cap":  min(w_t, cap)                     keeps every token, bounds its influence
        "mask": w_t if w_t <= cap else 0          drops tokens the stale policy liked far less
        "none": w_t                               unbiased, unbounded variance

    ``cap=None`` means unbounded (every mode returns the raw weight). Zero where ``mask`` is 0.
    The whole family (TIS, IcePop, AReaL's filter, none): trainer/algo/offpolicy.py.
    """
    valid = _valid_mask(mask, proximal_logprobs.shape, proximal_logprobs=proximal_logprobs,
                        behaviour_logprobs=behaviour_logprobs)
    return offpolicy_weight(proximal_logprobs, behaviour_logprobs, valid, legacy_spec(cap, mode)).weight


# ----------------------------------------------------------------------------- clipped surrogate

def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                      eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate as a loss, elementwise, and where the clipped branch is taken.

        l_t       = max(-r_t A_t, -clip(r_t, 1 - eps_low, 1 + eps_high) A_t)   = -min(r A, clip(r) A)
        clipped_t = (A_t > 0 and r_t > 1 + eps_high) or (A_t < 0 and r_t < 1 - eps_low)
        l_t       = -clip(r_t) A_t if clipped_t (constant in r_t: no gradient) else -r_t A_t

    ``ratio`` and ``advantages`` have the same shape: per token, or per sequence (GSPO).

    The branch is chosen from the ratio's side of the edge, not by comparing the two losses:
    within an ulp of an edge ``-r A`` and ``-clip(r) A`` can round to the same number, and
    ``torch.max`` then splits the gradient between them (half the gradient where the loss is
    smooth, half a gradient where it is clipped). In exact arithmetic both rules select the same
    branch. Comparing ``r`` with ``clip(r)`` keeps the test in the ratio's dtype, where the clamp
    happens. At exactly the edge the unclipped branch is taken.
    """
    clamped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    clipped = ((advantages > 0) & (ratio > clamped)) | ((advantages < 0) & (ratio < clamped))
    return torch.where(clipped, -advantages * clamped, -advantages * ratio), clipped


# ----------------------------------------------------------------------------- losses

def decoupled_ppo_loss(
    logprobs: torch.Tensor,
    proximal_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_clip: float = 0.2,
    eps_clip_high: float | None = None,
    behav_cap: float | None = 5.0,
    behav_mode: str = "cap",
    offpolicy: OffPolicySpec | None = None,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """AReaL's decoupled PPO loss, token-mean over valid tokens. All inputs [B, T].

        r_t  = exp(logprobs_t - proximal_t)
        w_t  = offpolicy_weight(proximal, behaviour, mask, offpolicy).weight
               (offpolicy None: behaviour_weight(proximal, behaviour, mask, behav_cap, behav_mode))
        loss = -(1/N) sum_t mask_t * w_t * min(r_t A_t, clip(r_t, 1 - eps_clip, 1 + eps_high) A_t)

    ``eps_high = eps_clip_high`` if given else ``eps_clip``. Only ``logprobs`` carries gradient;
    the other tensors are treated as constants. ``N = normalizer`` if given, else the number of
    valid tokens. Tokens dropped by a mask (``behav_mode="mask"``, or a masking ``offpolicy``) stay
    in N: they contribute 0, they do not shrink the denominator, so the loss scale does not depend
    on how many were dropped and N can be fixed before the weights are known (as micro-batch
    accumulation requires, and as AReaL's ``ppo_actor_loss_fn`` does).

    Stats (Python floats; 0.0 when nothing is counted): over the *kept* tokens (the valid ones
    the correction did not drop; every valid token unless a mask acted): ``clip_fraction``
    (clipped branch active, or stopped by ``offpolicy.behav_clip``: no gradient),
    ``behav_clip_fraction`` (stopped by the behaviour trust region), ``ratio_mean`` (mean r); over the valid tokens:
    ``behav_weight_mean`` (w after the bound, dropped tokens as 0), ``behav_masked_fraction`` (w
    changed by the bound: clamped or dropped), ``approx_kl`` (mean of proximal - logprobs: the k1
    estimate of KL(pi_prox || pi_theta), >= 0 in expectation, growing as the update moves the
    policy away from the proximal one; AReaL logs the opposite sign, logprobs - proximal).
    """
    loss, stats = policy_loss(logprobs, proximal_logprobs, behaviour_logprobs, advantages, mask,
                              eps_clip=eps_clip, eps_clip_high=eps_clip_high, behav_cap=behav_cap,
                              behav_mode=behav_mode, offpolicy=offpolicy, normalizer=normalizer)
    stats.pop("dual_clip_fraction")  # always 0 here: no dual clip
    return loss, stats


def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_clip: float = 0.2,
    eps_clip_high: float | None = None,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Standard PPO clipped surrogate (old policy = behaviour policy), token-mean. All inputs [B, T].

        r_t  = exp(logprobs_t - old_t)
        loss = -(1/N) sum_t mask_t * min(r_t A_t, clip(r_t, 1 - eps_clip, 1 + eps_high) A_t)

    Naive PPO for asynchronous data, and what the decoupled loss reduces to when proximal ==
    behaviour: ``policy_loss`` with ``old_logprobs`` as the proximal policy and no behaviour
    weight. Stats: ``clip_fraction``, ``approx_kl`` (mean old - logprobs), ``ratio_mean``.
    """
    # checked here too so that a wrong shape is reported as old_logprobs, the name the caller used
    _valid_mask(mask, logprobs.shape, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    loss, stats = policy_loss(logprobs, old_logprobs, None, advantages, mask, eps_clip=eps_clip,
                              eps_clip_high=eps_clip_high, normalizer=normalizer)
    return loss, {k: stats[k] for k in ("clip_fraction", "approx_kl", "ratio_mean")}


# ----------------------------------------------------------------------------- policy loss with options

def policy_loss(
    logprobs: torch.Tensor,
    proximal_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_clip: float = 0.2,
    eps_clip_high: float | None = None,
    dual_clip_c: float | None = None,
    behav_cap: float | None = 5.0,
    behav_mode: str = "cap",
    offpolicy: OffPolicySpec | None = None,
    agg_mode: AggMode = "token_mean",
    agg_const: float | None = None,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Decoupled PPO with dual clip and a choice of aggregation. All tensors [B, T].

        r_t  = exp(logprobs_t - proximal_t)
        w_t  = offpolicy_weight(proximal, behaviour, mask, offpolicy).weight        (1 if behaviour is None;
               offpolicy None: behaviour_weight(proximal, behaviour, mask, behav_cap, behav_mode))
        l_t  = max(-r_t A_t, -clip(r_t, 1 - eps_clip, 1 + eps_high) A_t)            (PPO clip)
        l_t  = min(l_t, -c A_t)                  if A_t < 0 and dual_clip_c = c    (dual clip)
        l_t  = stop_gradient(l_t)                where behaviour_trust_clip(...)   (offpolicy.behav_clip set)
        loss = aggregate(w_t * l_t, mask, agg_mode, agg_const, normalizer)

    Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games"): with A < 0 and a
    ratio far above 1 (the current policy now much prefers an action that was bad), the PPO
    loss -r A grows without bound; dual clip caps it at -c A (c > 1), with zero gradient there.
    It never changes tokens with A >= 0, nor tokens with r <= c, so with ``dual_clip_c=None``
    or when no token exceeds the cap this is exactly ``decoupled_ppo_loss`` (token_mean) and,
    with ``behaviour_logprobs=None`` or equal to ``proximal_logprobs``, ``ppo_clip_loss``.

    ``offpolicy`` (trainer/algo/offpolicy.py: none | filter | tis | icepop) replaces the legacy
    ``behav_cap``/``behav_mode`` pair, which must then stay at its defaults.

    Stats as ``decoupled_ppo_loss`` plus ``dual_clip_fraction`` (kept tokens capped at -c A) and
    ``behav_clip_fraction`` (kept tokens the behaviour trust region stopped). ``clip_fraction``
    counts a token stopped by either trust region (it gets no gradient from this loss).
    """
    tensors = {"logprobs": logprobs, "proximal_logprobs": proximal_logprobs, "advantages": advantages}
    if behaviour_logprobs is not None:
        tensors["behaviour_logprobs"] = behaviour_logprobs
    valid = _valid_mask(mask, logprobs.shape, **tensors)
    lo, hi = _clip_range(eps_clip, eps_clip_high)
    if dual_clip_c is not None and not (isinstance(dual_clip_c, (int, float)) and math.isfinite(dual_clip_c)
                                        and dual_clip_c > 1):
        raise ValueError(f"dual_clip_c must be None or a finite number > 1, got {dual_clip_c!r}")
    spec = _correction(offpolicy, behav_cap, behav_mode)
    if behaviour_logprobs is None:
        one = torch.where(valid, 1.0, 0.0).to(_compute_dtype(logprobs))
        bw = BehaviourWeight(one, one, valid, torch.zeros_like(valid))
    else:
        bw = offpolicy_weight(proximal_logprobs, behaviour_logprobs, valid, spec)
    w, kept = bw.weight, bw.kept

    dtype = _compute_dtype(logprobs)
    logprobs = torch.where(valid, logprobs.to(dtype), 0.0)
    prox = torch.where(valid, proximal_logprobs.detach().to(dtype), 0.0)
    adv = torch.where(valid, advantages.detach().to(dtype), 0.0)

    ratio = torch.exp(logprobs - prox)                           # r_t = pi_theta / pi_prox
    pg_loss, clipped = clipped_surrogate(ratio, adv, lo, hi)     # -min(r A, clip(r) A)
    if dual_clip_c is not None:
        # A < 0 and r > c > 1 - eps_low puts l_t on its -r A branch, so -c A < l_t exactly when
        # r > c: selecting on r (as clipped_surrogate does) keeps a rounding tie from splitting
        # the gradient
        dual_clipped = (adv < 0) & (ratio > dual_clip_c)
        pg_loss = torch.where(dual_clipped, -adv * dual_clip_c, pg_loss)     # the cap -c A
    else:
        dual_clipped = torch.zeros_like(valid)
    behav_clipped = torch.zeros_like(valid)
    if behaviour_logprobs is not None and spec.behav_clip is not None:
        behav_clipped = behaviour_trust_clip(logprobs, behaviour_logprobs, adv, valid, spec.behav_clip)
        pg_loss = torch.where(behav_clipped, pg_loss.detach(), pg_loss)   # value kept, gradient stopped
    loss = aggregate(w * pg_loss, valid, agg_mode, agg_const, normalizer)

    stats = {  # clipping and ratio over the tokens that train (AReaL: kept tokens); see decoupled_ppo_loss
        "clip_fraction": _masked_mean(clipped | behav_clipped, kept),
        "behav_clip_fraction": _masked_mean(behav_clipped, kept),
        "dual_clip_fraction": _masked_mean(dual_clipped, kept),
        "behav_weight_mean": _masked_mean(w, valid),
        "behav_masked_fraction": _masked_mean(bw.changed, valid),
        "approx_kl": _masked_mean(prox - logprobs, valid),   # k1 of KL(pi_prox || pi_theta); AReaL: the negative
        "ratio_mean": _masked_mean(ratio, kept),
    }
    return loss, stats


# ----------------------------------------------------------------------------- GSPO

def gspo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_clip: float = 3e-4,
    eps_clip_high: float | None = None,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO (Group Sequence Policy Optimization, Zheng et al. 2025, arXiv 2507.18071).

    ``logprobs``, ``old_logprobs``, ``mask``: [B, T]; ``advantages``: [B], one per sequence.

        s_i  = exp((1/|y_i|) sum_t (logprobs_it - old_it))     = (pi_theta(y_i) / pi_old(y_i))^(1/|y_i|)
        loss = -(1/S) sum_i min(s_i A_i, clip(s_i, 1 - eps_clip, 1 + eps_high) A_i)

    The ratio, and so the clip, is per sequence: one response is kept or clipped as a whole.
    The length normalisation keeps s_i on the scale of one token's ratio. ``eps_high`` is
    ``eps_clip_high`` if given, else ``eps_clip`` (as in the token-level losses). The paper
    clips at (3e-4, 4e-4), far tighter than token-level PPO's 0.2 because s_i averages out
    per-token noise: the default ``eps_clip`` is 3e-4, pass ``eps_clip_high=4e-4`` for its
    upper side. S = ``normalizer`` if given (the whole batch's count when
    micro-batching) else the number of sequences with at least one valid token; a zero-length
    sequence has no ratio and contributes nothing. The gradient flows through every token of
    s_i. In asynchronous training pass the proximal logprobs as ``old_logprobs``; no
    behaviour-policy weight is applied here. For one-token sequences s_i is the token ratio and
    this equals ``ppo_clip_loss``.

    Stats: ``clip_fraction`` (fraction of non-empty sequences clipped), ``seq_ratio_mean``,
    ``approx_kl`` (token mean of old - logprobs).
    """
    valid = _valid_mask(mask, logprobs.shape, logprobs=logprobs, old_logprobs=old_logprobs)
    require_matrix("logprobs", logprobs)
    require_shape("advantages", advantages, logprobs.shape[:1], f"[B] = {tuple(logprobs.shape[:1])} (one per sequence)")
    lo, hi = _clip_range(eps_clip, eps_clip_high)

    dtype = _compute_dtype(logprobs)
    logprobs = torch.where(valid, logprobs.to(dtype), 0.0)
    old = torch.where(valid, old_logprobs.detach().to(dtype), 0.0)
    tokens_per_seq = valid.sum(dim=1)
    nonempty = tokens_per_seq > 0
    adv = torch.where(nonempty, advantages.detach().to(dtype), 0.0)
    n = normalizer_or_count(normalizer, nonempty)

    log_seq_ratio = (logprobs - old).sum(dim=1) / tokens_per_seq.clamp(min=1)   # mean over the response
    seq_ratio = torch.exp(log_seq_ratio)                                        # s_i (1 for an empty row)
    per_seq, clipped = clipped_surrogate(seq_ratio, adv, lo, hi)
    loss = torch.where(nonempty, per_seq, 0.0).sum() / n

    stats = {
        "clip_fraction": _masked_mean(clipped, nonempty),
        "seq_ratio_mean": _masked_mean(seq_ratio, nonempty),
        "approx_kl": _masked_mean(old - logprobs, valid),
    }
    return loss, stats
