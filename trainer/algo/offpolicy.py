"""The off-policy correction family: the behaviour weight w_t that scales the decoupled PPO loss.

In asynchronous training a token was sampled by the behaviour policy ``pi_behav`` (a stale
version), the trust region is centred on the proximal policy ``pi_prox``, and the per-token
importance weight of the decoupled objective (trainer/algo/policy_loss.py) is

    w_t = pi_prox(a_t) / pi_behav(a_t) = exp(log_prox_t - log_behav_t)

Every method here maps (log_prox, log_behav, mask) to a bounded weight, without gradient:

    none     w_t = 1                                           no correction (AReaL's default when
                                                               ``rejection_sampling`` is unset)
    filter   AReaL's rejection-sampling filter, below          mask or clamp by a bound on a metric
    tis      truncated importance sampling:                    keeps every token, bounds the weight
               token     w_t = min(w_t, C)
               sequence  w_t = min(prod_{s in y_i} w_s, C)     one weight per sequence (the full
                                                               product, not the geometric mean)
    icepop   w_t if 1/C <= w_t <= C else 0                     IcePop's token mask (lower = 1/C
                                                               unless given)

with C = ``upper``. ``filter`` is AReaL's ``apply_rejection_sampling``
(areal/utils/functional/functional.py, inclusionAI/AReaL commit
4aef98d8d818af55b43621aaadba047ae10f4e77, config ``RejectionSamplingConfig`` in
areal/api/cli_args.py), re-implemented for [B, T] padded tensors:

    metric    m_t = w_t (ratio)  |  k1 = x  |  k2 = x^2 / 2  |  k3 = exp(-x) - 1 + x,   x = log w_t
              (AReaL's KLEstimator with log_probs = prox, base = behav: kl_estimate(prox, behav))
    in bounds lower <= m <= upper   (lower = None: m <= upper; upper = None: no upper bound)
    token     each valid token judged by m_t
    sequence  one verdict per sequence from the aggregate of its valid tokens:
                ratio:  agg of log w_t, then exp   (mean: geometric mean, sum: product, max: max w_t)
                KL:     agg of m_t, arithmetic     (mean, sum, max)
              and, for the ratio metric only, the weight itself becomes the sequence's geometric
              mean exp(mean_t log w_t) on every token of it (KL metrics keep the per-token w_t)
    mask      out-of-bounds tokens (sequences) get w = 0; kept ones keep the weight above unclamped
    clamp     out-of-bounds tokens (sequences) get w clamped to [lower or 0, upper]; ratio metric only

Dropped tokens stay in the loss's denominator (the decoupled loss's N is the valid-token count
before filtering, as in AReaL's ``ppo_actor_loss_fn``), so the loss scale does not depend on how
many were dropped.

Deliberate differences from that AReaL version: masked positions (prompt, padding) are replaced
before any arithmetic, so -inf/NaN there never reach the weight; but a non-finite log-ratio at a
*valid* position is not silently mapped to w = 1 as AReaL does: +inf is out of any upper bound
(dropped or clamped), NaN fails every bound (dropped by mask; propagates under clamp, so the
learner skips the update). The trainer rejects groups with non-finite logprobs before this.
``upper = None`` (no upper bound) is allowed here; AReaL requires a number. The pure function
accepts any positive ratio bound; the config additionally requires a ratio ``upper`` > 1 as AReaL
does (a bound <= 1 would drop or clamp every token the stale policy liked less).

The behaviour trust region (``behav_clip``, this project's variant, composable with every method):
naive PPO clips around pi_behav, decoupled PPO around pi_prox. With one update per batch the
proximal ratio is exactly 1, so the decoupled clip never acts and nothing stops a stale token that
the intervening updates already pushed far in its advantage's direction from being pushed again.
``behaviour_trust_clip`` restores naive PPO's sign-aware stop, centred on the behaviour policy,
while the decoupled loss keeps its bounded weight and its proximal clip:

    rho_t = pi_theta(a_t) / pi_behav(a_t)
    b_t   = (A_t > 0 and rho_t > 1 + delta) or (A_t < 0 and rho_t < 1 - delta)
    l_t   = stop_gradient(l_t) where b_t                     (the token's loss value is kept)

so a token moved more than delta since it was sampled, in the direction its advantage asks for,
gets no gradient; tokens moved against their advantage keep theirs. On-policy (pi_behav =
pi_prox) with delta = eps_clip it coincides with the proximal clip and changes nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from trainer.algo.kl import kl_estimate
from trainer.algo.shapes import require_matrix, require_shape

__all__ = ["OFFPOLICY_METHODS", "BehaviourWeight", "OffPolicySpec", "behaviour_trust_clip", "offpolicy_weight"]

Method = Literal["none", "filter", "tis", "icepop"]
OFFPOLICY_METHODS: tuple[str, ...] = ("none", "filter", "tis", "icepop")
_LEVELS = ("token", "sequence")
_ACTIONS = ("mask", "clamp")
_METRICS = ("ratio", "kl_k1", "kl_k2", "kl_k3")
_AGGS = ("mean", "sum", "max")


def _bound(name: str, value: float | None) -> None:
    if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                  and math.isfinite(value)):
        raise ValueError(f"offpolicy {name} must be None or a finite number, got {value!r}")


@dataclass(frozen=True)
class OffPolicySpec:
    """Which correction and its bounds; the fields of ``algo.offpolicy`` (areal_py/config/training.py).

    ``level``: token | sequence (filter, tis); ``action``: mask | clamp, ``metric``: ratio | kl_k1 |
    kl_k2 | kl_k3 and ``agg``: mean | sum | max (filter only); ``upper``: C for tis/icepop, the upper
    bound for filter (None = none); ``lower``: filter's lower bound, icepop's (None = 1/C);
    ``behav_clip``: delta of the behaviour trust region (``behaviour_trust_clip``; None = off).
    The default is the token-level clamp of the ratio at 5: the loss before this module existed.
    """
    method: Method = "filter"
    level: Literal["token", "sequence"] = "token"
    action: Literal["mask", "clamp"] = "clamp"
    metric: Literal["ratio", "kl_k1", "kl_k2", "kl_k3"] = "ratio"
    agg: Literal["mean", "sum", "max"] = "mean"
    upper: float | None = 5.0
    lower: float | None = None
    behav_clip: float | None = None

    def __post_init__(self) -> None:
        for name, value, allowed in (("method", self.method, OFFPOLICY_METHODS), ("level", self.level, _LEVELS),
                                     ("action", self.action, _ACTIONS), ("metric", self.metric, _METRICS),
                                     ("agg", self.agg, _AGGS)):
            if value not in allowed:
                raise ValueError(f"offpolicy {name} must be one of {allowed}, got {value!r}")
        _bound("upper", self.upper)
        _bound("lower", self.lower)
        _bound("behav_clip", self.behav_clip)
        if self.behav_clip is not None and not 0 < self.behav_clip < 1:
            raise ValueError(f"offpolicy behav_clip is the delta of [1 - delta, 1 + delta]: it must be in (0, 1), "
                             f"got {self.behav_clip!r}")
        ratio_bounds = self.method in ("tis", "icepop") or (self.method == "filter" and self.metric == "ratio")
        if ratio_bounds:
            for name, value in (("upper", self.upper), ("lower", self.lower)):
                if value is not None and value <= 0:
                    raise ValueError(f"offpolicy {name} bounds the ratio pi_prox/pi_behav: it must be > 0, "
                                     f"got {value!r}")
        if self.method in ("tis", "icepop") and self.upper is None:
            raise ValueError(f"offpolicy method={self.method} needs upper (its C), got None")
        if self.method == "tis" and self.lower is not None:
            raise ValueError("offpolicy method=tis has no lower bound (w = min(w, C)); set lower to None")
        if self.method == "icepop" and self.level != "token":
            raise ValueError("offpolicy method=icepop is a token mask: level must be 'token'")
        if self.method == "filter" and self.action == "clamp" and self.metric != "ratio":
            raise ValueError(f"offpolicy action=clamp clamps the ratio itself: metric must be 'ratio', "
                             f"got {self.metric!r} (use action=mask for a KL bound)")
        lo, hi = self.bounds()
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"offpolicy lower ({lo}) is above upper ({hi})")

    def bounds(self) -> tuple[float | None, float | None]:
        """(lower, upper) as applied: icepop's lower defaults to 1/C."""
        if self.method == "icepop" and self.lower is None:
            return 1.0 / self.upper, self.upper
        return self.lower, self.upper


@dataclass(frozen=True)
class BehaviourWeight:
    """The correction of one [B, T] batch; all tensors [B, T], no gradient.

    ``weight``: w_t as it multiplies the loss, 0 at invalid and dropped positions.
    ``raw``: the unbounded per-token ratio exp(log_prox - log_behav) at valid positions, 0 elsewhere.
    ``kept``: valid and not dropped (every valid token unless a mask acted).
    ``changed``: valid tokens whose weight the bound changed: dropped, or clamped.
    Invariants: kept <= valid; changed <= valid; weight == 0 wherever not kept.
    """
    weight: torch.Tensor
    raw: torch.Tensor
    kept: torch.Tensor
    changed: torch.Tensor

    @property
    def dropped(self) -> torch.Tensor:
        """Valid tokens the mask removed from the loss."""
        return self.changed & ~self.kept

    @property
    def clamped(self) -> torch.Tensor:
        """Kept tokens whose weight the bound moved."""
        return self.changed & self.kept


def _in_bounds(m: torch.Tensor, lower: float | None, upper: float | None) -> torch.Tensor:
    """lower <= m <= upper, a missing side unbounded; NaN is out of bounds."""
    ok = ~torch.isnan(m)
    if upper is not None:
        ok = ok & (m <= upper)
    if lower is not None:
        ok = ok & (m >= lower)
    return ok


def _metric(log_w: torch.Tensor, w: torch.Tensor, metric: str, prox: torch.Tensor, behav: torch.Tensor,
            valid: torch.Tensor) -> torch.Tensor:
    if metric == "ratio":
        return w
    return kl_estimate(prox, behav, metric.removeprefix("kl_"), valid)   # x = log prox - log behav


def _sequence_aggregate(values: torch.Tensor, valid: torch.Tensor, agg: str) -> torch.Tensor:
    """[B]: sum, mean or max of ``values`` over each row's valid positions (0 for a row with none)."""
    if agg == "max":
        top = torch.where(valid, values, -math.inf).amax(dim=1)
        return torch.where(valid.any(dim=1), top, 0.0)
    total = torch.where(valid, values, 0.0).sum(dim=1)
    return total if agg == "sum" else total / valid.sum(dim=1).clamp(min=1)


def offpolicy_weight(proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                     spec: OffPolicySpec) -> BehaviourWeight:
    """The behaviour weight of ``spec`` (formulas in the module docstring). Inputs [B, T].

    Only positions where ``mask`` is set are read; others may hold -inf or NaN. Computed in at
    least float32 (the dtype of the proximal logprobs promoted), on the inputs' device.
    """
    require_matrix("proximal_logprobs", proximal_logprobs)
    for name, x in (("behaviour_logprobs", behaviour_logprobs), ("mask", mask)):
        require_shape(name, x, proximal_logprobs.shape, f"{tuple(proximal_logprobs.shape)} (same as proximal_logprobs)")
    if not isinstance(spec, OffPolicySpec):
        raise ValueError(f"spec must be an OffPolicySpec, got {type(spec).__name__}")
    valid = mask.bool()
    dtype = torch.promote_types(proximal_logprobs.dtype, torch.float32)
    with torch.no_grad():
        prox = torch.where(valid, proximal_logprobs.detach().to(dtype), 0.0)
        behav = torch.where(valid, behaviour_logprobs.detach().to(dtype), 0.0)
        log_w = prox - behav                                         # x_t = log w_t, 0 where invalid
        w = torch.exp(log_w)
        raw = torch.where(valid, w, 0.0)
        nothing = torch.zeros_like(valid)
        lower, upper = spec.bounds()
        if spec.method == "none":
            return BehaviourWeight(torch.where(valid, 1.0, 0.0).to(dtype), raw, valid, nothing)
        if spec.method == "tis" and spec.level == "sequence":
            log_s = torch.where(valid, log_w, 0.0).sum(dim=1, keepdim=True)    # log prod_t w_t
            over = (log_s > math.log(upper)) & valid
            weight = torch.where(valid, torch.exp(log_s.clamp(max=math.log(upper))).expand_as(w), 0.0)
            return BehaviourWeight(weight, raw, valid, over)
        action = {"tis": "clamp", "icepop": "mask"}.get(spec.method, spec.action)
        metric = "ratio" if spec.method in ("tis", "icepop") else spec.metric
        if spec.level == "token" or spec.method != "filter":
            base = w
            in_bounds = _in_bounds(_metric(log_w, w, metric, prox, behav, valid), lower, upper)
        else:
            if metric == "ratio":
                seq = torch.exp(_sequence_aggregate(log_w, valid, spec.agg))
                base = torch.exp(_sequence_aggregate(log_w, valid, "mean")).unsqueeze(1).expand_as(w)
            else:
                seq = _sequence_aggregate(_metric(log_w, w, metric, prox, behav, valid), valid, spec.agg)
                base = w
            in_bounds = _in_bounds(seq, lower, upper).unsqueeze(1).expand_as(valid)
        if action == "mask":
            kept = valid & in_bounds
            return BehaviourWeight(torch.where(kept, base, 0.0), raw, kept, valid & ~in_bounds)
        # clamp: out-of-bounds tokens (sequences) clamped to [lower or 0, upper]; a clamp inside the
        # bounds is the identity, so the token level is a plain clamp
        clamped = base.clamp(max=upper) if upper is not None else base
        if lower is not None:
            clamped = clamped.clamp(min=lower)
        moved = ((base > upper) if upper is not None else nothing) | ((base < lower) if lower is not None else nothing)
        if spec.level == "sequence":
            clamped = torch.where(in_bounds, base, clamped)
            moved = moved & ~in_bounds
        return BehaviourWeight(torch.where(valid, clamped, 0.0), raw, valid, moved & valid)


def behaviour_trust_clip(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, advantages: torch.Tensor,
                         mask: torch.Tensor, delta: float) -> torch.Tensor:
    """[B, T] bool: the tokens the behaviour trust region stops (module docstring), without gradient.

        rho_t = exp(logprobs_t - behaviour_t)
        b_t   = valid_t and ((A_t > 0 and rho_t > 1 + delta) or (A_t < 0 and rho_t < 1 - delta))

    A token at exactly 1 +- delta, or with A_t = 0, is not stopped. Positions outside ``mask`` are
    never stopped and may hold -inf or NaN. NaN at a valid position compares false: not stopped
    (the loss propagates it and the learner skips the update).
    """
    require_matrix("logprobs", logprobs)
    for name, x in (("behaviour_logprobs", behaviour_logprobs), ("advantages", advantages), ("mask", mask)):
        require_shape(name, x, logprobs.shape, f"{tuple(logprobs.shape)} (same as logprobs)")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"behav_clip delta must be a number in (0, 1), got {delta!r}")
    valid = mask.bool()
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    with torch.no_grad():
        log_rho = torch.where(valid, logprobs.detach().to(dtype) - behaviour_logprobs.detach().to(dtype), 0.0)
        rho = torch.exp(log_rho)
        adv = torch.where(valid, advantages.detach().to(dtype), 0.0)
        return valid & (((adv > 0) & (rho > 1 + delta)) | ((adv < 0) & (rho < 1 - delta)))
