"""Group-relative advantages (GRPO / Dr.GRPO): the group of samples of one prompt is its own baseline.

GRPO replaces PPO's learned value function by the statistics of the n samples drawn for the
same prompt, so no critic is trained:

    A_i = (r_i - mean(r)) / (std(r) + eps)      (GRPO)
    A_i =  r_i - mean(r)                        (Dr.GRPO: no std division, which otherwise
                                                 up-weights prompts that are almost always
                                                 right or almost always wrong)

The advantage is per sequence; every token of the response gets the same value
(``expand_to_tokens``).

The other estimators of the family, all pure functions on tensors:

    rloo_advantages                 A_i = r_i - mean_{j != i} r_j          (leave-one-out, per group)
    reinforce_baseline_advantages   A_i = r_i - mean_batch(r)              (REINFORCE, batch baseline)
    reinforce_pp_advantages         A_t = (G_t - mean(G)) / (std(G) + eps) (REINFORCE++, token level)
    gae_advantages                  A_t = sum_k (gamma lam)^k delta_{t+k}  (PPO with a critic)
    value_loss                      clipped critic loss for the GAE returns

Token-level conventions ([B, T] tensors with a ``mask``): the valid tokens of a row, in order, are
one episode. Masked positions (prompt, padding) are skipped, never read (they may hold NaN), and
get 0 in every output; the episode ends after the last valid token (bootstrap value 0).
"""
from __future__ import annotations

import math

import torch

from trainer.algo.aggregation import normalizer_or_count
from trainer.algo.shapes import require_matrix, require_shape

__all__ = [
    "expand_to_tokens",
    "gae_advantages",
    "grpo_advantages",
    "reinforce_baseline_advantages",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "value_loss",
]


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
    rewards = _check_group_rewards(rewards)
    _check_eps(eps)

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


# ----------------------------------------------------------------------------- argument checks

def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _check_group_rewards(rewards: torch.Tensor) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor):
        raise ValueError(
            f"rewards must be a torch.Tensor of shape [G, n], got {type(rewards).__name__}")
    if rewards.dim() != 2 or rewards.shape[1] == 0:
        raise ValueError(f"rewards must have shape [G, n] with n >= 1, got {tuple(rewards.shape)}")
    return _float(rewards)


def _token_mask(mask: torch.Tensor, **tensors: torch.Tensor) -> torch.Tensor:
    """``mask`` as bool, after checking it is [B, T] and every tensor in ``tensors`` has its shape."""
    require_matrix("mask", mask)
    for name, t in tensors.items():
        require_shape(name, t, mask.shape, f"{tuple(mask.shape)} (same as mask)")
    return mask.bool()


def _unit_interval(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_eps(eps: float) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


# ----------------------------------------------------------------------------- sequence-level baselines

def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out (RLOO): each sample's baseline is the mean of the *other* samples
    of its group. ``rewards`` [G, n] -> [G, n].

        A_gi = r_gi - (1/(n-1)) sum_{j != i} r_gj  =  n/(n-1) * (r_gi - mean_g)

    The baseline does not contain r_gi, so it is unbiased. A one-sample group (n = 1) has no
    other sample and gets 0, as does any group whose rewards are all equal (exactly 0, not a
    rounding residue).
    """
    rewards = _check_group_rewards(rewards)
    n = rewards.shape[1]
    if n == 1:
        return torch.zeros_like(rewards)
    total = rewards.sum(dim=1, keepdim=True)
    baseline = (total - rewards) / (n - 1)                        # mean of the other n-1 samples
    advantages = rewards - baseline
    all_equal = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    return torch.where(all_equal, torch.zeros_like(advantages), advantages)


def reinforce_baseline_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE with the batch-mean baseline: ``rewards`` [B] -> [B], ``A_i = r_i - (1/B) sum_j r_j``.

    A batch whose rewards are all equal gets exactly 0.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or rewards.shape[0] == 0:
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a torch.Tensor of shape [B] with B >= 1, got {shape}")
    rewards = _float(rewards)
    advantages = rewards - rewards.mean()
    if bool((rewards == rewards[0]).all()):
        return torch.zeros_like(advantages)
    return advantages


# ----------------------------------------------------------------------------- token-level estimators

def _discounted_returns(rewards: torch.Tensor, valid: torch.Tensor, discount: float) -> torch.Tensor:
    """G_t = x_t + discount * G_{next valid t}, 0 past the last valid token and at masked positions."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        step = rewards[:, t] + discount * running
        running = torch.where(valid[:, t], step, running)          # masked positions pass it through
        returns[:, t] = torch.where(valid[:, t], step, 0.0)
    return returns


def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                            eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++ advantages: discounted return-to-go per token, normalised over the whole batch.

        G_t = sum_{k >= t} gamma^(k - t) r_k            (over the valid tokens of the row)
        A_t = (G_t - mean(G)) / (std(G) + eps)          mean, std over all valid tokens of the batch

    ``token_rewards`` [B, T] already holds the KL penalty (``-coef * kl_t`` on every token) and the
    sequence score on the last response token: see ``trainer.algo.kl.kl_penalised_token_rewards``.
    ``std`` is the population std (as in ``grpo_advantages``). Masked positions get 0. When all
    valid returns are equal (including a single valid token) the advantages are exactly 0.
    """
    valid = _token_mask(mask, token_rewards=token_rewards)
    gamma = _unit_interval("gamma", gamma)
    _check_eps(eps)
    dtype = torch.promote_types(_float(token_rewards).dtype, torch.float32)
    rewards = torch.where(valid, token_rewards.detach().to(dtype), 0.0)
    returns = _discounted_returns(rewards, valid, gamma)
    if not valid.any():
        return torch.zeros_like(returns)
    flat = returns[valid]
    if bool((flat == flat[0]).all()):
        return torch.zeros_like(returns)
    mean, std = flat.mean(), flat.std(unbiased=False)
    return torch.where(valid, (returns - mean) / (std + eps), 0.0)


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                   lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) per token. All inputs [B, T].

        delta_t = r_t + gamma * V_{t+1} - V_t          V_{t+1} = 0 after the last valid token
        A_t     = delta_t + gamma * lam * A_{t+1}      = sum_k (gamma lam)^k delta_{t+k}
        R_t     = A_t + V_t                            (the critic's regression target)

    Returns ``(advantages, returns)``, both [B, T], without gradient. ``rewards`` usually holds
    the sequence score (minus a KL penalty, if any) on the last response token and 0 (or the
    penalty) elsewhere. Valid tokens of a row are consecutive steps of one episode; masked
    positions are skipped and get 0 in both outputs. lam = 1 gives Monte-Carlo returns minus
    V_t; lam = 0 the one-step TD error.
    """
    valid = _token_mask(mask, rewards=rewards, values=values)
    gamma = _unit_interval("gamma", gamma)
    lam = _unit_interval("lam", lam)
    dtype = torch.promote_types(torch.promote_types(_float(rewards).dtype, _float(values).dtype), torch.float32)
    r = torch.where(valid, rewards.detach().to(dtype), 0.0)
    v = torch.where(valid, values.detach().to(dtype), 0.0)

    advantages = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0])                          # bootstrap: 0 past the end
    next_advantage = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        advantage = delta + gamma * lam * next_advantage
        m = valid[:, t]
        advantages[:, t] = torch.where(m, advantage, 0.0)
        next_value = torch.where(m, v[:, t], next_value)            # masked positions pass through
        next_advantage = torch.where(m, advantage, next_advantage)
    returns = torch.where(valid, advantages + v, 0.0)
    return advantages, returns


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_eps: float | None = 0.2, normalizer: float | None = None
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped value loss, token-mean over valid tokens. All inputs [B, T].

        v_clip = clip(v_t, old_t - clip_eps, old_t + clip_eps)
        loss   = (1/N) sum_t mask_t * 0.5 * max((v_t - R_t)^2, (v_clip - R_t)^2)

    ``values`` carries the gradient; ``old_values`` (the critic at rollout/proximal time) and
    ``returns`` (from ``gae_advantages``) are constants. ``clip_eps=None`` gives the unclipped
    ``0.5 (v - R)^2``. ``N = normalizer`` if given (the global token count when micro-batching),
    else the number of valid tokens (at least 1). Masked positions never reach the arithmetic.

    Stats: ``value_clip_fraction`` (the clipped term is the larger one: no gradient on that
    token), ``value_mean``, ``return_mean`` (means over valid tokens; 0.0 when there are none).
    """
    valid = _token_mask(mask, values=values, old_values=old_values, returns=returns)
    if clip_eps is not None and not (isinstance(clip_eps, (int, float)) and math.isfinite(clip_eps)
                                     and clip_eps > 0):
        raise ValueError(f"clip_eps must be None or a finite number > 0, got {clip_eps!r}")
    n = normalizer_or_count(normalizer, valid)

    dtype = torch.promote_types(_float(values).dtype, torch.float32)
    v = torch.where(valid, values.to(dtype), 0.0)
    old = torch.where(valid, old_values.detach().to(dtype), 0.0)
    ret = torch.where(valid, returns.detach().to(dtype), 0.0)

    loss_unclipped = (v - ret) ** 2
    if clip_eps is None:
        per_token = 0.5 * loss_unclipped
        clipped = torch.zeros_like(valid)
    else:
        v_clipped = old + torch.clamp(v - old, -clip_eps, clip_eps)
        loss_clipped = (v_clipped - ret) ** 2
        per_token = 0.5 * torch.max(loss_unclipped, loss_clipped)
        clipped = loss_clipped > loss_unclipped
    loss = torch.where(valid, per_token, 0.0).sum() / n

    count = int(valid.sum())

    def mean(x: torch.Tensor) -> float:
        return float(x.detach().to(torch.float64)[valid].sum()) / count if count else 0.0

    stats = {"value_clip_fraction": mean(clipped), "value_mean": mean(v), "return_mean": mean(ret)}
    return loss, stats
