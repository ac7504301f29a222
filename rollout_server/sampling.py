"""Per-request sampling parameters and the batched sampler.

The logprob we report is the *behaviour* logprob the trainer recomputes: log_softmax of the
temperature-scaled logits (plain logits when greedy), in float32, taken before top-p
truncation. Top-p only narrows which token is drawn, so it never leaks into the reported number.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0.0 means greedy
    top_p: float = 1.0
    ignore_eos: bool = False

    def validate(self) -> None:
        """Reject settings the sampler cannot honour, at `add` time rather than mid-batch."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not self.temperature >= 0.0:  # also catches NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


def sample(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ps: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; return (token ids [B], behaviour logprobs [B]).

    logits: [B, V]; temperatures, top_ps: [B] float32. Rows with temperature 0 are argmax.
    Random draws come only from `generator`, so a run is reproducible from the engine seed.
    """
    logits = logits.float()
    greedy = temperatures <= 0.0
    scale = torch.where(greedy, torch.ones_like(temperatures), temperatures)
    logp = torch.log_softmax(logits / scale[:, None], dim=-1)
    tokens = logits.argmax(dim=-1)

    stochastic = (~greedy).nonzero(as_tuple=True)[0]
    if stochastic.numel() > 0:
        probs = logp[stochastic].exp()
        rows_top_p = top_ps[stochastic]
        nucleus = (rows_top_p < 1.0).nonzero(as_tuple=True)[0]
        if nucleus.numel() > 0:  # only top-p rows pay for a sort over the vocabulary
            sorted_p, order = probs[nucleus].sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
            mass_before = sorted_p.cumsum(dim=-1) - sorted_p
            sorted_p = sorted_p.masked_fill(mass_before >= rows_top_p[nucleus, None], 0.0)
            # Scatter the truncated distribution back to vocabulary order: one draw for all rows.
            probs[nucleus] = torch.zeros_like(sorted_p).scatter_(1, order, sorted_p)
        # Inverse-CDF draw (one uniform per row; much cheaper on CPU than torch.multinomial, whose
        # exponential draws cost one random number per vocabulary entry). u is in (0, 1], so the
        # first index whose CDF reaches u * total always has positive probability.
        cdf = probs.cumsum(dim=-1)
        u = 1.0 - torch.rand(len(stochastic), 1, generator=generator, device=probs.device)
        choice = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1).clamp_(max=probs.shape[-1] - 1)
        tokens[stochastic] = choice

    token_logp = logp.gather(1, tokens[:, None]).squeeze(1)
    return tokens, token_logp
