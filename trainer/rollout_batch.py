"""Turning a batch of groups from the wire into padded training tensors.

Row i holds prompt + response of one sample, right-padded. Token-level arrays are aligned with
the *predicted* token: position t describes token t+1 (what the logits at t score), so the
response of a sample with prompt length p and response length r occupies positions p-1 .. p+r-2.

A multi-turn sample's response holds tokens the model did not generate (tool output, template
scaffolding; `Sample.loss_mask` 0): they are context only, so they get loss_mask 0, behaviour
logprob 0 and version -1, exactly like the prompt. Every consumer (policy loss, proximal logprobs,
KL, entropy, off-policy and staleness statistics) reads tokens through `loss_mask` or versions >= 0,
so they drop out of all of them.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from areal_py.wire import protocol as P


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor        # [S, L] long
    attention_mask: torch.Tensor   # [S, L] long
    loss_mask: torch.Tensor        # [S, L-1] float, 1 on response tokens
    behav_logprobs: torch.Tensor   # [S, L-1] float
    token_versions: torch.Tensor   # [S, L-1] long (-1 outside the response)
    response_lengths: torch.Tensor  # [S] long
    truncated: torch.Tensor        # [S] bool: stopped by the length limit, not by EOS
    rewards: torch.Tensor          # [S] float
    group_size: int = 1            # samples per prompt; rows s*n .. s*n+n-1 are one group

    @property
    def num_samples(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, idx: torch.Tensor, trim: bool = False) -> RolloutBatch:
        """A subset of samples; with trim, columns past the subset's longest sequence are cut."""
        width = int(self.attention_mask[idx].sum(dim=1).max()) if trim and len(idx) else self.input_ids.shape[1]
        out: dict = {"group_size": self.group_size}
        for f in fields(self):
            if f.name == "group_size":
                continue
            t = getattr(self, f.name)[idx]
            if t.dim() == 2:
                t = t[:, : width if f.name in ("input_ids", "attention_mask") else width - 1]
            out[f.name] = t
        return RolloutBatch(**out)


def collate(groups: list[P.Group], pad_id: int) -> RolloutBatch:
    n = len(groups[0].samples)
    if any(len(g.samples) != n for g in groups):
        raise ValueError("all groups of a batch must have the same number of samples")
    seqs = [(g.prompt_ids, s) for g in groups for s in g.samples]
    length = max(len(p) + len(s.output_ids) for p, s in seqs)
    S = len(seqs)
    input_ids = torch.full((S, length), pad_id, dtype=torch.long)
    attn = torch.zeros((S, length), dtype=torch.long)
    loss_mask = torch.zeros((S, length - 1))
    behav = torch.zeros((S, length - 1))
    versions = torch.full((S, length - 1), -1, dtype=torch.long)
    for i, (prompt, s) in enumerate(seqs):
        p, r = len(prompt), len(s.output_ids)
        input_ids[i, : p + r] = torch.tensor(prompt + s.output_ids, dtype=torch.long)
        attn[i, : p + r] = 1
        if r:
            model = torch.ones(r) if s.loss_mask is None else torch.tensor(s.loss_mask, dtype=torch.float32)
            loss_mask[i, p - 1 : p - 1 + r] = model
            behav[i, p - 1 : p - 1 + r] = torch.tensor(s.logprobs) * model
            versions[i, p - 1 : p - 1 + r] = torch.where(model.bool(), torch.tensor(s.versions), -1)
    return RolloutBatch(
        input_ids, attn, loss_mask, behav, versions,
        response_lengths=torch.tensor([len(s.output_ids) for _, s in seqs]),
        truncated=torch.tensor([s.finish_reason == "length" for _, s in seqs]),
        rewards=torch.tensor([s.reward for _, s in seqs], dtype=torch.float32), group_size=n)


def drop_nonfinite_groups(batch: RolloutBatch) -> tuple[RolloutBatch, dict[str, list[int]]]:
    """``batch`` without the groups that hold a reward or a behaviour logprob that is not finite in
    the batch's float32 tensors, and the dropped groups' positions per reason
    (``nonfinite_reward``, ``nonfinite_logprob``; a group with both is listed under the reward).

    The check runs on the collated tensors, after the conversion to float32: 1e39 is a finite
    Python float but inf here. One such value makes its group's advantages, then the loss and every
    weight, NaN, so it must never reach the loss. A whole group goes because group estimators
    (GRPO, RLOO) need all n samples of a prompt. A clean batch is returned as it is.
    """
    n = batch.group_size
    bad_reward = (~torch.isfinite(batch.rewards)).view(-1, n).any(dim=1)
    bad_logprob = (~torch.isfinite(batch.behav_logprobs)).any(dim=1).view(-1, n).any(dim=1) & ~bad_reward
    dropped = {"nonfinite_reward": bad_reward.nonzero().flatten().tolist(),
               "nonfinite_logprob": bad_logprob.nonzero().flatten().tolist()}
    keep = ~(bad_reward | bad_logprob)
    if bool(keep.all()):
        return batch, dropped
    return batch.rows(keep.repeat_interleave(n).nonzero().flatten()), dropped


def right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row of ``attention_mask`` is ones followed only by zeros (how `collate` pads)."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [rows, width], got shape {tuple(attention_mask.shape)}")
    lengths = attention_mask.sum(dim=1, keepdim=True)
    prefix = torch.arange(attention_mask.shape[1], device=attention_mask.device) < lengths
    return bool((attention_mask.bool() == prefix).all())


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   temperature: float, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token_{t+1} | tokens_<=t) under softmax(logits / T), the quantity the engine records,
    and optionally the entropy of that distribution at each position.

    Right-padded rows go to the model without their attention mask. Under causal attention a real
    token attends only to earlier positions, all real when the padding is at the end, so every real
    position's logits (and their gradients) are those of the masked forward; the padding positions'
    outputs differ but are never read by a loss (callers mask them). Without a mask the model takes
    its plain causal attention path (SDPA ``is_causal``: the upper triangle is skipped, no dense
    ``[rows, 1, width, width]`` mask is built). Any other mask is passed as it is.
    """
    mask = None if right_padded(attention_mask) else attention_mask
    # use_cache=False: a training forward has no use for a KV cache (building one only costs)
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    return logprobs_from_logits(logits, input_ids, temperature, with_entropy)


def logprobs_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float,
                         with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs` from the model's ``[rows, width, vocab]`` logits: position t scores token t+1."""
    logits = logits[:, :-1].float()
    if temperature > 0 and temperature != 1.0:  # dividing by 1 would only copy the logits
        logits = logits / temperature
    # log_softmax gathered at the next token, without materialising log_softmax over the vocabulary:
    # logit - logsumexp (the backward still forms the softmax, but no [rows, width, vocab] output is kept).
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, input_ids[:, 1:, None]).squeeze(-1) - lse
    entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1) if with_entropy else None
    return logp, entropy
