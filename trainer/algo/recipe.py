"""The recipe: from a rollout batch to advantages, and from one micro-batch to its loss.

Everything configurable in `algo.*` and `reward.*` is dispatched here, so the trainer loop stays
a loop. The formulas live in advantages.py, decoupled_ppo.py, kl.py, reward_shaping.py and
proximal.py; this module only chooses and wires them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from areal_py.config import AlgoConfig, OffPolicyConfig, RewardConfig
from trainer.algo import reward_shaping as rs
from trainer.algo.advantages import (
    expand_to_tokens,
    gae_advantages,
    grpo_advantages,
    reinforce_baseline_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    value_loss,
)
from trainer.algo.aggregation import aggregate
from trainer.algo.kl import kl_estimate, kl_penalised_token_rewards
from trainer.algo.offpolicy import OffPolicySpec
from trainer.algo.policy_loss import gspo_loss, policy_loss
from trainer.algo.proximal import loglinear_proximal
from trainer.rollout_batch import RolloutBatch

GROUP_ESTIMATORS = ("grpo", "rloo")


def shaped_rewards(batch: RolloutBatch, rc: RewardConfig, group_size: int, max_new_tokens: int) -> torch.Tensor:
    """[S] rewards after truncation zeroing, overlong penalty, scale, clip and normalisation."""
    r = batch.rewards.clone()
    if rc.zero_truncated:
        r = rs.zero_truncated(r, batch.truncated)
    if rc.overlong_cache_len:
        r = r + rs.overlong_penalty(batch.response_lengths, max_new_tokens, rc.overlong_cache_len, rc.overlong_factor)
    r = rs.scale_rewards(r, rc.scale)
    if rc.clip_low is not None or rc.clip_high is not None:
        r = rs.clip_rewards(r, rc.clip_low, rc.clip_high)
    if rc.normalize == "batch":
        r = rs.batch_normalize(r)
    elif rc.normalize == "group":
        r = rs.group_normalize(r.reshape(-1, group_size)).reshape(-1)
    return r


def informative_rows(rewards: torch.Tensor, group_size: int, algo: AlgoConfig) -> torch.Tensor:
    """Indices of samples that can carry a gradient: group estimators give uniform groups exactly 0."""
    keep = torch.ones(rewards.numel(), dtype=torch.bool)
    if algo.drop_uniform_groups and algo.adv_estimator in GROUP_ESTIMATORS:
        keep = (~rs.uniform_groups(rewards.reshape(-1, group_size))).repeat_interleave(group_size)
    return torch.nonzero(keep).squeeze(-1)


@dataclass
class Targets:
    """Per-token quantities fixed before the update (computed once per batch, no gradient)."""
    advantages: torch.Tensor               # [S, T]
    prox: torch.Tensor | None = None       # [S, T] recomputed proximal logprobs
    ref: torch.Tensor | None = None        # [S, T] reference-model logprobs
    old_values: torch.Tensor | None = None  # [S, T]
    returns: torch.Tensor | None = None    # [S, T]
    # One optimizer update per batch: the weights being trained ARE the proximal weights, so the
    # training forward's own (detached) logprobs are the proximal logprobs and `prox` is not computed.
    prox_is_current: bool = False
    # loglinear: how far the weights computing this micro-batch's logprobs are into the step, k/K after
    # k of its K minibatch updates (trainer/algo/proximal.py: they sit at version proximal + k/K)
    prox_progress: float = 0.0


def advantages(batch: RolloutBatch, rewards: torch.Tensor, group_size: int, algo: AlgoConfig, kl_coef: float,
               ref: torch.Tensor | None, old_values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([S, T] advantages, [S, T] returns or None). A KL reward penalty uses the behaviour logprobs:
    KL(pi_behav || pi_ref) estimated on the sampled tokens."""
    mask = batch.loss_mask
    kl = None
    if kl_coef > 0 and algo.kl_in == "reward" and ref is not None:
        kl = kl_estimate(batch.behav_logprobs, ref, algo.kl_estimator, mask)
    est = algo.adv_estimator
    returns = None
    if est in ("grpo", "rloo", "reinforce"):
        score = rewards - kl_coef * kl.sum(dim=1) if kl is not None else rewards
        if est == "grpo":
            seq = grpo_advantages(score.reshape(-1, group_size), std_normalize=algo.std_normalize).reshape(-1)
        elif est == "rloo":
            seq = rloo_advantages(score.reshape(-1, group_size)).reshape(-1)
        else:
            seq = reinforce_baseline_advantages(score)
        adv = expand_to_tokens(seq, mask)
    else:
        token_r = kl_penalised_token_rewards(rewards, kl if kl is not None else torch.zeros_like(mask), mask,
                                             kl_coef if kl is not None else 0.0)
        if est == "reinforce_pp":
            adv = reinforce_pp_advantages(token_r, mask, gamma=algo.gamma)
        else:
            if old_values is None:
                raise ValueError("algo.adv_estimator=gae needs the critic's values")
            adv, returns = gae_advantages(token_r, old_values, mask, algo.gamma, algo.lam)
    if algo.whiten_advantages:
        valid = mask.bool()
        if valid.sum() > 1:
            a = adv[valid]
            adv = torch.where(valid, (adv - a.mean()) / (a.std(unbiased=False) + 1e-6), 0.0)
    return adv, returns


def offpolicy_spec(cfg: OffPolicyConfig) -> OffPolicySpec:
    """The pure functions' record of ``algo.offpolicy`` (same fields, checked again there)."""
    return OffPolicySpec(**cfg.model_dump())


@dataclass
class LossSettings:
    eps_clip: float
    eps_clip_high: float | None
    offpolicy: OffPolicySpec  # the behaviour weight of the decoupled loss (algo.offpolicy)
    agg_const: float | None   # resolved divisor for seq_sum_const


@dataclass
class Norms:
    """Whole-(mini)batch divisors, so the micro-batch losses sum to the batch loss."""
    tokens: float
    seqs: float

    @classmethod
    def of(cls, mask: torch.Tensor) -> Norms:
        return cls(float(mask.sum().clamp(min=1.0)), float((mask.sum(dim=1) > 0).sum().clamp(min=1)))

    def for_agg(self, mode: str) -> float | None:
        return {"token_mean": self.tokens, "seq_mean": self.seqs}.get(mode)


def micro_batch_loss(logp: torch.Tensor, entropy: torch.Tensor | None, mb: RolloutBatch, t: Targets,
                     proximal_version: int, algo: AlgoConfig, ls: LossSettings, kl_coef: float,
                     norms: Norms) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy loss (+ KL loss term, - entropy bonus) of one micro-batch; `t` is already sliced to it."""
    mask = mb.loss_mask
    behav = mb.behav_logprobs
    if algo.loss == "ppo":  # naive PPO: the behaviour policy is the old policy, no proximal correction
        prox, behav_arg = behav, None
    elif algo.prox_method == "loglinear":
        prox = loglinear_proximal(behav, logp.detach(), mb.token_versions, proximal_version,
                                  proximal_version + t.prox_progress)
        behav_arg = behav
    else:
        prox, behav_arg = (logp.detach() if t.prox_is_current else t.prox), behav
    norm = norms.for_agg(algo.loss_agg)
    agg = {"agg_mode": algo.loss_agg, "agg_const": ls.agg_const, "normalizer": norm}
    if algo.loss == "gspo":
        valid = mask.sum(dim=1).clamp(min=1)
        seq_adv = (t.advantages * mask).sum(dim=1) / valid
        loss, stats = gspo_loss(logp, prox, seq_adv, mask, eps_clip=ls.eps_clip, eps_clip_high=ls.eps_clip_high,
                                normalizer=norms.seqs)
    else:
        loss, stats = policy_loss(logp, prox, behav_arg, t.advantages, mask, eps_clip=ls.eps_clip,
                                  eps_clip_high=ls.eps_clip_high, dual_clip_c=algo.dual_clip_c,
                                  offpolicy=ls.offpolicy, **agg)
    if kl_coef > 0 and algo.kl_in == "loss" and t.ref is not None:
        kl = kl_estimate(logp, t.ref, algo.kl_estimator, mask)
        kl_term = aggregate(kl, mask, algo.loss_agg, ls.agg_const, norm)
        loss = loss + kl_coef * kl_term
        stats["kl_loss"] = float(kl_term.detach())
    if entropy is not None:
        ent = aggregate(entropy, mask, algo.loss_agg, ls.agg_const, norm)
        loss = loss - algo.entropy_coef * ent
        stats["entropy"] = float(ent.detach())
    return loss, stats


def critic_loss(values: torch.Tensor, mb: RolloutBatch, t: Targets, algo: AlgoConfig,
                token_norm: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean clipped value loss; token_norm is the minibatch's response-token count."""
    return value_loss(values, t.old_values, t.returns, mb.loss_mask, clip_eps=algo.value_clip, normalizer=token_norm)
