"""Off-policy statistics of one step: how far the behaviour policy is from the proximal one.

Per valid token t (sampled by pi_behav, the version that generated it), with

    x_t = log pi_prox(a_t) - log pi_behav(a_t),      w_t = exp(x_t)    (the importance weight)

the step reports, over the valid tokens (N of them):

    k3_t   = w_t - 1 - x_t   >= 0                 Schulman's k3 estimator of KL(pi_behav || pi_prox):
                                                  the tokens are drawn from pi_behav, where E[w] = 1 and
                                                  E[-x] = KL(pi_behav || pi_prox); adding w - 1 (mean 0)
                                                  makes every term >= 0. Direction: behaviour first.
    kl_mean = (1/N) sum_t k3_t,    kl_max = max_t k3_t
    ess     = (sum_t w_t)^2 / (N sum_t w_t^2)     ESS/N, in (0, 1]: 1 when every weight is equal
                                                  (on-policy: all 1), about 1/N when one weight dominates
    bounded_fraction = |changed| / N              tokens whose behaviour weight the bound in use
                                                  clamped or masked

and the same over the tokens of each staleness bucket, staleness s_t = trainer version - token
version: "0", "1", ..., "{TOP-1}" and "{TOP}+" (TOP = ``STALENESS_TOP``), a bounded set of keys so
that a Prometheus label never grows with the run. Only non-empty buckets are reported.

Invariants: only valid positions are read (padding and prompt may hold -inf or NaN); ``changed``
is taken as given, whatever produced it (``trainer.behav_cap``/``behav_mode`` today, an off-policy
filter tomorrow), and only its valid positions count. No valid token: kl 0, ess 1, fraction 0
(nothing to weigh). Weights are formed in float64 from x clamped to [-MAX_LOG_W, MAX_LOG_W], so w^2
cannot overflow; a log-ratio beyond that bound is far past any cap and counts as at the bound.
Tallies of several micro-batches merge exactly (sums, counts and maxima), so the step's numbers do
not depend on how the batch was split.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.algo.shapes import require_shape

__all__ = ["MAX_LOG_W", "STALENESS_TOP", "OffPolicyGroup", "OffPolicyStats", "OffPolicyTally", "cap_changed", "ess_fraction",
           "k3", "offpolicy_stats", "staleness_bucket", "staleness_keys"]

STALENESS_TOP = 3
MAX_LOG_W = 300.0   # exp(2 * 300) < float64 max (about exp(709))


def staleness_keys(top: int = STALENESS_TOP) -> tuple[str, ...]:
    """The bucket names, in order: "0", ..., f"{top-1}", f"{top}+"."""
    return (*(str(s) for s in range(top)), f"{top}+")


def staleness_bucket(staleness: int, top: int = STALENESS_TOP) -> str:
    """The bucket of one staleness value (versions >= 0)."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0 (a token cannot be newer than the trainer), got {staleness}")
    return str(staleness) if staleness < top else f"{top}+"


def _log_w(proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x_t in float64, clamped to +-MAX_LOG_W, 0 at invalid positions (never read there)."""
    prox = torch.where(valid, proximal_logprobs.detach().to(torch.float64), 0.0)
    behav = torch.where(valid, behaviour_logprobs.detach().to(torch.float64), 0.0)
    return (prox - behav).clamp(-MAX_LOG_W, MAX_LOG_W)


def k3(log_w: torch.Tensor) -> torch.Tensor:
    """Elementwise k3 = exp(x) - 1 - x >= 0 of log-weights x (0 at x = 0)."""
    return torch.expm1(log_w) - log_w


def ess_fraction(weights: torch.Tensor, valid: torch.Tensor) -> float:
    """ESS/N = (sum w)^2 / (N sum w^2) over the valid positions of ``weights`` (>= 0); 1.0 when none
    is valid or every valid weight is 0 (nothing to weigh)."""
    require_shape("valid", valid, weights.shape, f"{tuple(weights.shape)} (same as weights)")
    valid = valid.bool()
    w = torch.where(valid, weights.detach().to(torch.float64), 0.0)
    n, s1, s2 = int(valid.sum()), float(w.sum()), float((w * w).sum())
    return 1.0 if n == 0 or s2 == 0.0 else s1 * s1 / (n * s2)


@dataclass(frozen=True)
class OffPolicyGroup:
    """The statistics of one set of tokens (formulas in the module docstring)."""
    tokens: int
    kl_mean: float
    kl_max: float
    ess: float
    bounded_fraction: float


@dataclass(frozen=True)
class OffPolicyStats:
    """A step's statistics over every valid token, and per staleness bucket (non-empty ones, in order)."""
    all: OffPolicyGroup
    by_staleness: dict[str, OffPolicyGroup]


@dataclass
class _Sums:
    n: int = 0
    w: float = 0.0
    w2: float = 0.0
    k3: float = 0.0
    k3_max: float = 0.0
    changed: int = 0

    def add(self, x: torch.Tensor, changed: torch.Tensor) -> None:
        """x: the log-weights of this set's tokens (1-D); changed: bool of the same length."""
        if x.numel() == 0:
            return
        w, kl = torch.exp(x), k3(x)
        self.n += x.numel()
        self.w += float(w.sum())
        self.w2 += float((w * w).sum())
        self.k3 += float(kl.sum())
        self.k3_max = max(self.k3_max, float(kl.max()))
        self.changed += int(changed.sum())

    def group(self) -> OffPolicyGroup:
        if self.n == 0:
            return OffPolicyGroup(tokens=0, kl_mean=0.0, kl_max=0.0, ess=1.0, bounded_fraction=0.0)
        return OffPolicyGroup(tokens=self.n, kl_mean=self.k3 / self.n, kl_max=self.k3_max,
                              ess=self.w * self.w / (self.n * self.w2), bounded_fraction=self.changed / self.n)


@dataclass
class OffPolicyTally:
    """Running sums over the micro-batches of one step; ``summary()`` gives the step's numbers."""
    top: int = STALENESS_TOP
    total: _Sums = field(default_factory=_Sums)
    buckets: dict[str, _Sums] = field(default_factory=dict)

    def add(self, proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
            changed: torch.Tensor | None, staleness: torch.Tensor) -> None:
        """Count one micro-batch; every tensor [B, T]. ``mask``: the valid (loss) tokens; ``changed``:
        where the behaviour-weight bound clamped or masked (None: no bound in use); ``staleness``:
        integer trainer version - token version (read at valid positions only, must be >= 0 there)."""
        shape = proximal_logprobs.shape
        same = f"{tuple(shape)} (same as proximal_logprobs)"
        for name, t in (("behaviour_logprobs", behaviour_logprobs), ("mask", mask), ("staleness", staleness)):
            require_shape(name, t, shape, same)
        if staleness.is_floating_point():
            raise ValueError(f"staleness must be an integer tensor, got {staleness.dtype}")
        valid = mask.bool()
        if changed is None:
            changed = torch.zeros_like(valid)
        require_shape("changed", changed, shape, same)
        stale = staleness[valid]
        if stale.numel() and int(stale.min()) < 0:
            raise ValueError(f"staleness must be >= 0 at valid tokens (a token cannot be newer than the trainer), "
                             f"got {int(stale.min())}")
        x = _log_w(proximal_logprobs, behaviour_logprobs, valid)[valid]
        ch = changed.bool()[valid]
        self.total.add(x, ch)
        bucket = stale.clamp(max=self.top)
        for key, s in zip(staleness_keys(self.top), range(self.top + 1), strict=True):
            sel = bucket == s
            if bool(sel.any()):
                self.buckets.setdefault(key, _Sums()).add(x[sel], ch[sel])

    def summary(self) -> OffPolicyStats:
        order = staleness_keys(self.top)
        return OffPolicyStats(all=self.total.group(),
                              by_staleness={k: self.buckets[k].group() for k in order if k in self.buckets})


def offpolicy_stats(proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                    changed: torch.Tensor | None, staleness: torch.Tensor, top: int = STALENESS_TOP) -> OffPolicyStats:
    """The statistics of one [B, T] batch in one call (``OffPolicyTally`` for several micro-batches)."""
    tally = OffPolicyTally(top=top)
    tally.add(proximal_logprobs, behaviour_logprobs, mask, changed, staleness)
    return tally.summary()


def cap_changed(proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                cap: float | None, mode: str) -> torch.Tensor:
    """Where today's ``trainer.behav_cap``/``behav_mode`` bound changes the weight (as policy_loss applies it):
    valid tokens with w_t > cap, clamped ("cap") or dropped ("mask"); nothing for mode "none" or cap None."""
    valid = mask.bool()
    if cap is None or mode == "none":
        return torch.zeros_like(valid)
    return valid & (_log_w(proximal_logprobs, behaviour_logprobs, valid) > torch.log(torch.tensor(float(cap),
                                                                                                  dtype=torch.float64)))
