"""One training step across the trainer's ranks, and the collectives that keep it equal to one process.

Rank 0 holds the batch (only it talks to the controller). It shapes the rewards, picks the
informative rows and, when the advantages need nothing but rewards (GRPO, RLOO, REINFORCE(++)
without a KL reward penalty), computes them on the whole batch BEFORE the split. It then hands each
rank a token-balanced share of whole groups (`trainer.batch_split`) with two tensor collectives: a
fixed-size int64 header (broadcast) and one float64 matrix per rank (scatter). Each rank then runs
the single-process machinery on its share: proximal and reference logprobs, critic values,
micro-batching, and the advantages that need them (GAE; GRPO/RLOO with a KL reward penalty, exact
per rank because groups are never split; whitening uses global moments).

Why world size N equals world size 1:
- the loss normaliser is GLOBAL (`global_norms`: all-reduce of the token and sequence counts), so each
  rank's loss is its part of the one-process loss, and FSDP sums (not averages) the gradients
  (`trainer.sharding`);
- FSDP2 runs a collective in every forward and backward, so every rank must run the same number of
  them: `pad_micro_batches` pads a rank's micro-batch list to the largest with `None`, a zero-weight
  pass (`zero_pass`) that contributes exactly 0 to every gradient;
- statistics are sums of per-rank parts that were already divided by global counts (`sum_stats`);
  the off-policy statistics are formed from per-rank counts, sums and maxima combined first
  (`offpolicy_across_ranks`), so every rank holds the one-process numbers of the whole batch.
With ``trainer.ppo_minibatches > 1`` each rank cuts its own share into minibatches, so a minibatch is
a different (equally random) part of the batch than in one process.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from trainer.algo import recipe as A
from trainer.algo.offpolicy_stats import OffPolicyTally, staleness_keys
from trainer.batch_split import balance_groups, group_rows, group_tokens, pack_rows, unpack_rows
from trainer.distributed import Dist, all_reduce, broadcast, scatter
from trainer.rollout_batch import RolloutBatch, token_logprobs

# header layout after the per-rank (rows, width) pairs
_H_COMMAND, _H_GROUP_SIZE, _H_ON_POLICY, _H_HAS_ADV, _H_INFORMATIVE = range(5)
_H_LEN = 5
TRAIN, SKIP = 0, 1  # what rank 0 tells the others to do with this step (all ranks know the step count)


@dataclass(frozen=True)
class RankLoad:
    """Per-rank work of one step, indexed by rank (gathered on every rank)."""
    busy_s: list[float]   # seconds each rank spent in its learner step
    tokens: list[int]     # real tokens (prompt + response) each rank trained


def global_norms(mask: torch.Tensor, dist: Dist, step: int) -> A.Norms:
    """`Norms.of` over every rank's rows: the token and sequence counts are summed before the clamp."""
    counts = torch.tensor([float(mask.sum()), float((mask.sum(dim=1) > 0).sum())], dtype=torch.float64)
    all_reduce(counts, dist, "the loss normaliser's token and sequence counts", step)
    return A.Norms(max(float(counts[0]), 1.0), max(float(counts[1]), 1.0))


def pad_micro_batches(mbs: list[torch.Tensor], dist: Dist, what: str, step: int) -> list[torch.Tensor | None]:
    """``mbs`` followed by ``None`` (a zero-weight pass) up to the most micro-batches any rank has."""
    if not dist.distributed:
        return list(mbs)
    n = all_reduce(torch.tensor([len(mbs)]), dist, f"the number of {what}", step, op=torch.distributed.ReduceOp.MAX)
    return [*mbs, *([None] * (int(n) - len(mbs)))]


def _dummy_inputs(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(1, 2, dtype=torch.long, device=device), torch.ones(1, 2, dtype=torch.long, device=device)


def zero_pass(learner: Any, backward: bool, need_prox: bool = True) -> None:
    """Forward (and backward) through every sharded model this pass would use, weighted 0: the FSDP
    collectives of a rank with fewer micro-batches than the others, adding exactly nothing."""
    ids, attn = _dummy_inputs(learner.dist.device)
    if backward:
        out = token_logprobs(learner.model, ids, attn, learner.temperature)[0].sum() * 0.0
        if learner.critic is not None:
            out = out + learner.critic(ids, attn).sum() * 0.0
        out.backward()
        return
    with torch.no_grad():
        if need_prox:
            token_logprobs(learner.model, ids, attn, learner.temperature)
        if learner.ref is not None:
            token_logprobs(learner.ref, ids, attn, learner.temperature)
        if learner.critic is not None:
            learner.critic(ids, attn)


def sum_stats(values: list[float], dist: Dist, step: int) -> list[float]:
    """Per-rank stats summed over ranks (each already divided by a global count)."""
    if not dist.distributed:
        return values
    t = all_reduce(torch.tensor(values, dtype=torch.float64), dist, "the step's loss statistics", step)
    return t.tolist()


# the fields of a tally's per-set sums (offpolicy_stats._Sums) combined by SUM, and the one combined by MAX
OFFPOLICY_SUMMED = ("n", "w", "w2", "k3", "changed")
OFFPOLICY_MAXED = "k3_max"
_OFFPOLICY_INTS = ("n", "changed")


def offpolicy_across_ranks(tally: OffPolicyTally, dist: Dist, step: int) -> OffPolicyTally:
    """The step's off-policy tally over every rank's tokens, on every rank: the counts and sums of the whole
    set and of each staleness bucket all-reduced with SUM, the k3 maxima with MAX. Counts travel as float64
    (exact below 2**53); a bucket empty on one rank adds 0 to the sums and 0 to the max (k3 >= 0), so the
    result is the tally one process holds on the whole batch, up to the order of the float64 sums. A bucket
    is kept when any rank has tokens in it, exactly as one process keeps its non-empty buckets."""
    if not dist.distributed:
        return tally
    keys = staleness_keys(tally.top)
    sets = [tally.total, *(tally.buckets.get(k) for k in keys)]
    sums = torch.tensor([[float(getattr(s, f)) if s is not None else 0.0 for f in OFFPOLICY_SUMMED] for s in sets],
                        dtype=torch.float64)
    maxima = torch.tensor([float(getattr(s, OFFPOLICY_MAXED)) if s is not None else 0.0 for s in sets],
                          dtype=torch.float64)
    all_reduce(sums, dist, "the off-policy statistics' token counts and sums", step)
    all_reduce(maxima, dist, "the off-policy statistics' k3 maxima", step, op=torch.distributed.ReduceOp.MAX)

    def merged(i: int):
        values = {f: round(float(v)) if f in _OFFPOLICY_INTS else float(v)
                  for f, v in zip(OFFPOLICY_SUMMED, sums[i], strict=True)}
        return dataclasses.replace(tally.total, **values, **{OFFPOLICY_MAXED: float(maxima[i])})

    out = OffPolicyTally(top=tally.top, total=merged(0))
    out.buckets = {k: merged(i) for i, k in enumerate(keys, start=1) if sums[i, 0] > 0}
    return out


def norm_value(norm: torch.Tensor) -> float:
    """A gradient norm from `clip_grad_norm_` as a float (FSDP2 returns the global norm as a DTensor)."""
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly) sharded parameter."""
    return t.to_local() if isinstance(t, DTensor) else t


def check_supported(algo, world_size: int) -> None:
    """Estimators whose advantages need batch-wide statistics of per-rank values cannot be split yet."""
    if world_size > 1 and algo.kl_coef > 0 and algo.kl_in == "reward" and algo.adv_estimator in (
            "reinforce", "reinforce_pp"):
        raise ValueError(f"algo.adv_estimator={algo.adv_estimator} with a KL reward penalty (algo.kl_in=reward) "
                         "needs batch-wide statistics of the reference logprobs: not supported with "
                         "trainer.world_size > 1 (use kl_in=loss, or grpo/rloo/gae)")


def _whiten_global(adv: torch.Tensor, mask: torch.Tensor, dist: Dist, step: int) -> torch.Tensor:
    """`recipe.advantages`' whitening with the mean and population std of every rank's valid tokens."""
    valid = mask.bool()
    a = adv[valid].double()
    s = all_reduce(torch.tensor([float(a.sum()), float(valid.sum())], dtype=torch.float64), dist,
                   "the advantages' sum and count", step)
    if s[1] <= 1:
        return adv
    mean = s[0] / s[1]
    var = all_reduce(torch.tensor([float(((a - mean) ** 2).sum())], dtype=torch.float64), dist,
                     "the advantages' squared deviations", step)[0] / s[1]
    return torch.where(valid, (adv - mean.float()) / (var.sqrt().float() + 1e-6), 0.0)


def _header(dist: Dist, step: int, values: list[int] | None, timeout_s: float | None = None) -> list[int]:
    t = torch.tensor(values if values is not None else [0] * (2 * dist.world_size + _H_LEN), dtype=torch.long)
    return broadcast(t, dist, "the step header (command, share sizes)", step, timeout_s=timeout_s).tolist()


def send_command(dist: Dist, step: int, command: int) -> None:
    """Rank 0: tell the other ranks what to do with this step when no share follows (SKIP)."""
    _header(dist, step, [0, 0] * dist.world_size + [command] + [0] * (_H_LEN - 1))


def receive_command(dist: Dist, step: int, timeout_s: float | None = None) -> int:
    """Ranks > 0: the next header's command (TRAIN or SKIP); for TRAIN, call `train_step_ranks` next.
    ``timeout_s``: how long to wait for it (rank 0 may first wait for the controller's batch)."""
    h = _header(dist, step, None, timeout_s)
    _PENDING[0] = h
    return h[2 * dist.world_size + _H_COMMAND]


_PENDING: list[list[int] | None] = [None]  # a TRAIN header received by `receive_command`, consumed by the step


def train_step_ranks(learner: Any, batch: RolloutBatch | None, version: int) -> dict[str, float]:
    """The learner step on every rank; ``batch`` on rank 0, None on the others (which read the step's header
    here, or took it already with `receive_command`). Fills ``learner.rank_load``. Stats are global."""
    d, algo, cfg = learner.dist, learner.algo, learner.cfg
    step, w = version + 1, d.world_size
    t_start = time.perf_counter()
    stats: dict[str, float] = {k: 0.0 for k in STAT_KEYS} | {"grad_norm": 0.0, "kl_coef": learner.kl_ctl.coef,
                                                           "skipped_updates": 0.0}
    need_prox = algo.loss != "ppo" and algo.prox_method == "recompute"
    pre = algo.adv_estimator != "gae" and not (learner.ref is not None and algo.kl_in == "reward")
    if d.is_main:
        n = batch.group_size
        rewards = A.shaped_rewards(batch, cfg.reward, n, cfg.rollout.max_new_tokens)
        rows = A.informative_rows(rewards, n, algo)
        sub = batch.rows(rows)
        on_policy = not bool((sub.token_versions[sub.loss_mask.bool()] != version).any())
        adv = A.advantages(sub, rewards[rows], n, algo, learner.kl_ctl.coef, None, None)[0] if pre and len(rows) \
            else None
        shares = [group_rows(g, n) for g in balance_groups(group_tokens(sub), w)] if len(rows) else [rows] * w
        parts = [sub.rows(idx, trim=True) for idx in shares]
        sizes = [x for p in parts for x in (p.num_samples, p.input_ids.shape[1] if p.num_samples else 0)]
        head = _header(d, step, sizes + [TRAIN, n, int(on_policy), int(adv is not None), len(rows)])
    else:
        head, _PENDING[0] = _PENDING[0], None
        if head is None:  # not announced by `receive_command`: the header is this step's
            head = _header(d, step, None)
        if head[2 * w + _H_COMMAND] != TRAIN:
            raise RuntimeError(f"rank {d.rank}: step {step} header says {head[2 * w + _H_COMMAND]}, not TRAIN")
    tail = head[2 * w:]
    n, on_policy, has_adv, informative = (tail[_H_GROUP_SIZE], bool(tail[_H_ON_POLICY]), bool(tail[_H_HAS_ADV]),
                                          tail[_H_INFORMATIVE])
    stats["informative_samples"] = float(informative)
    if informative == 0:
        learner.rank_load = RankLoad([0.0] * w, [0] * w)
        return stats
    rows_r, width_r = head[2 * d.rank], head[2 * d.rank + 1]
    max_rows = max(head[0:2 * w:2])
    max_cols = max(2 * x + 4 * (x - 1) + 3 for x in head[1:2 * w:2])
    out = torch.zeros(max_rows, max_cols, dtype=torch.float64)
    chunks = None
    if d.is_main:
        chunks = []
        for p, idx in zip(parts, shares, strict=True):
            c = torch.zeros(max_rows, max_cols, dtype=torch.float64)
            if p.num_samples:
                packed = pack_rows(p, rewards[rows][idx], adv[idx, : p.loss_mask.shape[1]] if adv is not None
                                   else None)
                c[: packed.shape[0], : packed.shape[1]] = packed
            chunks.append(c)
    scatter(out, chunks, d, "the batch shares", step)
    mine, adv_r = unpack_rows(out[:rows_r], max(width_r, 1), n) if rows_r else (None, None)
    if mine is not None and d.device.type != "cpu":  # shares are built and unpacked on the CPU
        mine = RolloutBatch(**{f.name: getattr(mine, f.name) if f.name == "group_size" else
                               getattr(mine, f.name).to(d.device) for f in dataclasses.fields(mine)})
        adv_r = adv_r.to(d.device)
    stats |= train_share(learner, mine, adv_r if has_adv else None, n, version, on_policy, need_prox, informative)
    busy = time.perf_counter() - t_start
    tokens = int(mine.attention_mask.sum()) if mine is not None else 0
    load = torch.zeros(2, w, dtype=torch.float64)
    load[0, d.rank], load[1, d.rank] = busy, tokens
    all_reduce(load, d, "each rank's busy time and tokens", step)
    learner.rank_load = RankLoad([float(x) for x in load[0]], [int(x) for x in load[1]])
    return stats


def _empty(group_size: int) -> RolloutBatch:
    """A share of no rows (more ranks than groups): the rank still joins every collective."""
    return RolloutBatch(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 1),
                        torch.zeros(0, 1), torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                        torch.zeros(0, dtype=torch.bool), torch.zeros(0), group_size=group_size)


def train_share(learner: Any, sub: RolloutBatch | None, adv_pre: torch.Tensor | None, group_size: int, version: int,
                on_policy: bool, need_prox: bool, total_samples: int) -> dict[str, float]:
    """`Learner.train_step` after the split, on this rank's share ``sub`` (None: no rows); ``adv_pre``: the
    advantages rank 0 computed before the split, or None to compute them here. Global stats."""
    algo, t, cfg, d = learner.algo, learner.cfg.trainer, learner.cfg, learner.dist
    step = version + 1
    sub = sub if sub is not None else _empty(group_size)
    stats: dict[str, float] = {k: 0.0 for k in STAT_KEYS}
    learner._tokens = [0, 0]
    learner._offpolicy = OffPolicyTally()
    prox, ref, old_values, from_forward = learner.fixed_targets(sub, need_prox, on_policy, stats)
    returns = None
    if adv_pre is not None or not sub.num_samples:
        adv = adv_pre if adv_pre is not None else torch.zeros_like(sub.loss_mask)
        if learner.critic is not None and not sub.num_samples:
            returns = torch.zeros_like(sub.loss_mask)
    else:
        per_rank = algo.model_copy(update={"whiten_advantages": False})
        adv, returns = A.advantages(sub, sub.rewards, group_size, per_rank, learner.kl_ctl.coef, ref, old_values)
    if adv_pre is None and algo.whiten_advantages:  # rank 0 whitened the pre-split advantages itself
        adv = _whiten_global(adv, sub.loss_mask, d, step)
    targets = A.Targets(adv, prox, ref, old_values, returns, prox_is_current=from_forward)
    if algo.loss_agg == "seq_sum_const":
        learner.loss_settings.agg_const = algo.loss_agg_const or float(total_samples * cfg.rollout.max_new_tokens)
    minibatches = torch.tensor_split(torch.arange(sub.num_samples), t.ppo_minibatches)
    applied = sum(learner._update(sub, minibatch, targets, version, stats) for minibatch in minibatches)
    stats["skipped_updates"] = float(len(minibatches) - applied)
    real, computed = sum_stats([float(x) for x in learner._tokens], d, step)
    stats["real_token_fraction"] = real / max(computed, 1.0)
    learner.offpolicy = offpolicy_across_ranks(learner._offpolicy, d, step).summary()
    for k in STAT_KEYS:
        stats[k] /= max(applied, 1)
    if applied:
        learner.skipped_in_a_row = 0
    else:
        learner._skipped(version, "its loss or gradient norm was not finite")
    if ref is not None:
        valid = sub.loss_mask.bool()
        kl_sum, kl_n = sum_stats([float((sub.behav_logprobs - ref)[valid].sum()), float(valid.sum())], d, step)
        stats["ref_kl"] = kl_sum / kl_n if kl_n else 0.0
        learner.kl_ctl.update(stats["ref_kl"], total_samples)
    return stats


# the learner's per-update statistics (trainer.learner.STAT_KEYS; a test keeps the two equal)
STAT_KEYS = ("loss", "clip_fraction", "approx_kl", "behav_weight_mean", "kl_loss", "entropy", "value_loss")
