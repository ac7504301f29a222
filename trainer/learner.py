"""The learner: the models and optimizers the trainer owns, and one training step over a batch.

Holds the policy (+ AdamW), and when the recipe needs them a critic (+ its own AdamW) and a
frozen reference model. `train_step` is: fix the targets with the weights held before the
update (proximal and reference logprobs, old values, advantages), then for each minibatch
accumulate gradients over micro-batches and take one optimizer step.

Non-finite values never reach the weights: an update whose loss or gradient norm is NaN/inf is
skipped (gradients dropped, optimizer state untouched) and counted in ``skipped_updates``; after
``trainer.max_consecutive_skipped_steps`` steps in a row without an applied update the run stops.
After every applied update the weights are checked, and the first non-finite parameter stops the
run with its name: a NaN weight would be published to the rollout servers and saved as final.
"""
from __future__ import annotations

import copy
import logging
import math
import time

import torch

from areal_py.config import Config
from trainer.algo import recipe as A
from trainer.algo.kl import AdaptiveKLController, FixedKLController
from trainer.algo.offpolicy import offpolicy_weight
from trainer.algo.offpolicy_stats import OffPolicyStats, OffPolicyTally
from trainer.algo.proximal import loglinear_versions
from trainer.compiled_forward import CompiledLogprobs, compile_wanted
from trainer.critic import ValueModel
from trainer.distributed import Dist
from trainer.fused_ops import fuse_llama
from trainer.micro_batching import PackCost, pack_by_cost, pack_by_padded_tokens, pack_by_tokens
from trainer.pack_cost import pack_cost_for
from trainer.rank_step import (
    RankLoad,
    check_supported,
    global_norms,
    local,
    norm_value,
    pad_micro_batches,
    sum_stats,
    train_step_ranks,
    zero_pass,
)
from trainer.rollout_batch import RolloutBatch, token_logprobs
from trainer.sharding import shard_model

STAT_KEYS = ("loss", "clip_fraction", "approx_kl", "behav_weight_mean", "kl_loss", "entropy", "value_loss")
log = logging.getLogger("trainer")


def first_nonfinite(module: torch.nn.Module) -> str | None:
    """Name of the first parameter holding a NaN or inf, or None (one device sync when all are finite)."""
    params = list(module.named_parameters())
    if not params or bool(torch.stack([torch.isfinite(local(p)).all() for _, p in params]).all()):
        return None  # a sharded parameter: this rank's shard (each rank checks its own)
    return next(name for name, p in params if not bool(torch.isfinite(local(p)).all()))


class Learner:
    def __init__(self, cfg: Config, model: torch.nn.Module, model_dir, pack_cost: PackCost | None = None,
                 dist: Dist | None = None) -> None:
        """``pack_cost``: the micro-batch cost model for ``micro_batch_packing=cost``; None = from the
        config or timed on ``model`` (trainer/pack_cost.py), before any other state is built. ``dist``: this
        process's trainer rank (None: world size 1); at world size > 1 the models are sharded with FSDP2
        (trainer/sharding.py) before the optimizers are built over their sharded parameters."""
        self.cfg = cfg
        self.dist = dist or Dist.single()
        check_supported(cfg.algo, self.dist.world_size)
        self.algo = cfg.algo
        t = cfg.trainer
        self.model = model
        self.model.train()
        self.pack_cost = pack_cost or pack_cost_for(cfg, model)
        self.temperature = cfg.rollout.temperature
        self.ref = copy.deepcopy(model).eval().requires_grad_(False) if self.algo.kl_coef > 0 else None
        self.kl_ctl = (AdaptiveKLController(self.algo.kl_coef, self.algo.kl_target, self.algo.kl_horizon)
                       if self.algo.kl_target is not None else FixedKLController(self.algo.kl_coef))
        self.critic = self.critic_opt = None
        if self.algo.adv_estimator == "gae":
            self.critic = ValueModel(model_dir, dtype=next(model.parameters()).dtype)
        for m in (self.model, self.ref, self.critic):
            if m is not None:
                shard_model(m, self.dist, t.activation_checkpointing and m is not self.ref)
        want, why = compile_wanted(t.compile, next(model.parameters()).device, self.dist.world_size,
                                   t.activation_checkpointing)
        self.compiled = CompiledLogprobs(self.model) if want else None  # the policy's training forward
        self.fused = None  # the policy's Llama modules patched with fused training ops (trainer/fused_ops.py)
        if t.fused_ops and not want and self.dist.world_size == 1:
            self.fused = fuse_llama(self.model)
            log.info("fused training ops: %s", self.fused.patched or self.fused.reason)
        log.info("training forward: %s", "compiled, checked against eager (" + why + ")" if want else "eager, " + why)
        # fused=True: one kernel over all parameters (the CPU default is a Python loop per tensor), same update
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=True)
        if self.critic is not None:
            self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=self.algo.critic_lr, fused=True)
        self.loss_settings = A.LossSettings(t.eps_clip, t.eps_clip_high, A.offpolicy_spec(self.algo.offpolicy), None)
        # With one update per batch the proximal logprobs come from the training forward itself (exact,
        # one forward pass fewer per step); False forces the separate recompute (tests compare the two).
        self.prox_from_training_forward = True
        self.skipped_in_a_row = 0  # steps since the last applied update that were skipped for non-finite values
        self._update_index = 0  # minibatch updates of this step so far (fixed_targets resets it)
        self._tokens = [0, 0]  # this step's training micro-batches: [real, computed (rows x padded width)] tokens
        self.rank_load: RankLoad | None = None  # the last step's work per rank (world size > 1)
        self.offpolicy: OffPolicyStats | None = None  # the last step's off-policy statistics (whole batch, every rank)
        self._offpolicy = OffPolicyTally()

    def modules(self) -> dict[str, torch.nn.Module]:
        """What a checkpoint must hold (the reference is the initial policy: rebuilt, not saved)."""
        return {"model": self.model, **({"critic": self.critic} if self.critic is not None else {})}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": self.optimizer, **({"critic_optimizer": self.critic_opt} if self.critic_opt else {})}

    def micro_batches(self, batch: RolloutBatch, rows: torch.Tensor) -> list[torch.Tensor]:
        t = self.cfg.trainer
        if t.max_tokens_per_micro_batch:
            lengths = batch.attention_mask[rows].sum(dim=1).tolist()
            if t.micro_batch_packing == "cost":
                if self.pack_cost is None:
                    raise ValueError("micro_batch_packing=cost needs a cost model (Learner(pack_cost=...))")
                mbs = pack_by_cost(lengths, t.max_tokens_per_micro_batch, self.pack_cost)
            else:
                pack = pack_by_padded_tokens if t.micro_batch_packing == "padded" else pack_by_tokens
                mbs = pack(lengths, t.max_tokens_per_micro_batch)
            return [rows[torch.tensor(mb)] for mb in mbs]
        return list(rows.split(t.micro_batch_size))

    @torch.no_grad()
    def _fixed(self, sub: RolloutBatch, need_prox: bool) -> tuple[torch.Tensor | None, ...]:
        """Proximal logprobs, reference logprobs and old values under the weights held now."""
        prox, ref, values = [], [], []
        full = sub.loss_mask.shape[1]

        def widen(x: torch.Tensor) -> torch.Tensor:  # trimmed micro-batch columns back to the batch's width
            return torch.nn.functional.pad(x, (0, full - x.shape[1]))

        mbs = [mb for mb in self.micro_batches(sub, torch.arange(sub.num_samples)) if len(mb)]
        for idx in pad_micro_batches(mbs, self.dist, "proximal/reference/critic forward micro-batches", None):
            if idx is None:  # another rank has more micro-batches: join its FSDP collectives, weight 0
                zero_pass(self, backward=False, need_prox=need_prox)
                continue
            mb = sub.rows(idx, trim=True)  # not padded to the batch's longest: long tails make that costly
            if need_prox:
                prox.append(widen(token_logprobs(self.model, mb.input_ids, mb.attention_mask, self.temperature)[0]))
            if self.ref is not None:
                ref.append(widen(token_logprobs(self.ref, mb.input_ids, mb.attention_mask, self.temperature)[0]))
            if self.critic is not None:
                values.append(widen(self.critic(mb.input_ids, mb.attention_mask)))
        if not mbs:  # a rank with no rows (more ranks than groups)
            return tuple(sub.loss_mask.new_zeros(0, full) if on else None
                         for on in (need_prox, self.ref is not None, self.critic is not None))
        order = torch.cat(mbs)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        return tuple(torch.cat(x)[inverse] if x else None for x in (prox, ref, values))

    def fixed_targets(self, sub: RolloutBatch, need_prox: bool, on_policy: bool, stats: dict[str, float]
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, bool]:
        """(proximal, reference logprobs, old values, proximal-read-off-the-training-forward) for ``sub``
        under the weights held now; ``stats`` gets ``prox_skipped`` and ``prox_time_s``.

        ``on_policy`` (every token from the version being trained): the behaviour logprobs are the
        proximal ones. With one update per batch the proximal policy is the policy being trained, read
        off its own training forward, so no recompute pass runs."""
        t0 = time.perf_counter()
        self._update_index = 0  # the step's minibatch updates count from here (loglinear's k)
        from_forward = (need_prox and not on_policy and self.cfg.trainer.ppo_minibatches == 1
                        and self.prox_from_training_forward)
        prox, ref, old_values = self._fixed(sub, need_prox and not on_policy and not from_forward)
        if need_prox and on_policy:
            prox = sub.behav_logprobs
        stats["prox_skipped"] = float(need_prox and (on_policy or from_forward))
        stats["prox_time_s"] = time.perf_counter() - t0
        return prox, ref, old_values, from_forward

    def train_step(self, batch: RolloutBatch | None, version: int) -> dict[str, float]:
        """One step over ``batch``. At world size > 1 every rank calls it (``batch`` on rank 0, None on the
        others) and trainer/rank_step.py splits it across them."""
        self.offpolicy = None
        if self.dist.distributed:
            return train_step_ranks(self, batch, version)
        algo, t, cfg = self.algo, self.cfg.trainer, self.cfg
        n = batch.group_size
        rewards = A.shaped_rewards(batch, cfg.reward, n, cfg.rollout.max_new_tokens)
        rows = A.informative_rows(rewards, n, algo)
        stats: dict[str, float] = {k: 0.0 for k in STAT_KEYS} | {"grad_norm": 0.0, "kl_coef": self.kl_ctl.coef,
                                                                "informative_samples": float(rows.numel()),
                                                                "skipped_updates": 0.0}
        if rows.numel() == 0:
            return stats
        self._tokens = [0, 0]
        self._offpolicy = OffPolicyTally()
        compile_s = self.compiled.status.seconds if self.compiled is not None else 0.0
        sub = batch.rows(rows)
        need_prox = algo.loss != "ppo" and algo.prox_method == "recompute"
        # Every token from the version being trained (sync mode, or max_staleness=0): the behaviour
        # policy IS the proximal policy, so the recompute forward is skipped (AReaL does the same).
        on_policy = not bool((sub.token_versions[sub.loss_mask.bool()] != version).any())
        prox, ref, old_values, from_forward = self.fixed_targets(sub, need_prox, on_policy, stats)
        adv, returns = A.advantages(sub, rewards[rows], n, algo, self.kl_ctl.coef, ref, old_values)
        targets = A.Targets(adv, prox, ref, old_values, returns, prox_is_current=from_forward)
        if algo.loss_agg == "seq_sum_const":
            self.loss_settings.agg_const = algo.loss_agg_const or float(sub.num_samples * cfg.rollout.max_new_tokens)
        minibatches = torch.arange(sub.num_samples).chunk(t.ppo_minibatches)
        applied = sum(self._update(sub, minibatch, targets, version, stats) for minibatch in minibatches)
        stats["skipped_updates"] = float(len(minibatches) - applied)
        stats["real_token_fraction"] = self._tokens[0] / max(self._tokens[1], 1)
        self.offpolicy = self._offpolicy.summary()
        if self.compiled is not None:
            stats["compile_s"] = self.compiled.status.seconds - compile_s
        for k in STAT_KEYS:  # means over the applied updates: a skipped one's NaN loss is left out
            stats[k] /= max(applied, 1)
        if applied:
            self.skipped_in_a_row = 0
        else:
            self._skipped(version, "its loss or gradient norm was not finite")
        if ref is not None:  # observed KL(pi_behav || pi_ref) per token, what the adaptive controller targets
            valid = sub.loss_mask.bool()
            stats["ref_kl"] = float((sub.behav_logprobs - ref)[valid].mean()) if valid.any() else 0.0
            self.kl_ctl.update(stats["ref_kl"], sub.num_samples)
        return stats

    def skip_step(self, version: int, why: str) -> dict[str, float]:
        """Stats of a step that trains nothing because its input was not finite (e.g. every group of
        the batch rejected); it counts toward ``trainer.max_consecutive_skipped_steps``."""
        self._skipped(version, why)
        return {k: 0.0 for k in STAT_KEYS} | {"grad_norm": 0.0, "kl_coef": self.kl_ctl.coef,
                                              "informative_samples": 0.0, "skipped_updates": 0.0}

    def _skipped(self, version: int, why: str) -> None:
        """Count a step without an applied update; too many in a row stop the run (it cannot train)."""
        self.skipped_in_a_row += 1
        limit = self.cfg.trainer.max_consecutive_skipped_steps
        if limit and self.skipped_in_a_row > limit:
            raise RuntimeError(f"{self.skipped_in_a_row} steps in a row applied no update (the last, step "
                               f"{version + 1}, because {why}); trainer.max_consecutive_skipped_steps={limit}: "
                               "stopping instead of spinning. Check the rewards and logprobs the batches carry, "
                               "the learning rate and the model dtype")

    def _tally_offpolicy(self, mb: RolloutBatch, tmb: A.Targets, logp: torch.Tensor, version: int) -> None:
        """Count one micro-batch in the step's off-policy statistics (trainer/algo/offpolicy_stats.py).

        The proximal policy is the weights held before the update: the recomputed logprobs when the step
        has them (or the behaviour ones when every token is from the trained version), else the training
        forward's own, which are exactly those weights in the first minibatch; with several minibatches
        and no recompute (``loglinear``, naive ``ppo``) later minibatches see weights this step already
        moved. The bound mask is the decoupled loss's correction (``algo.offpolicy``) on those logprobs;
        ``ppo`` and ``gspo`` apply no behaviour weight, so nothing is bounded there."""
        prox = tmb.prox if tmb.prox is not None else logp.detach()
        changed = (offpolicy_weight(prox, mb.behav_logprobs, mb.loss_mask, self.loss_settings.offpolicy).changed
                   if self.algo.loss == "decoupled" else None)
        self._offpolicy.add(prox, mb.behav_logprobs, mb.loss_mask, changed, version - mb.token_versions)

    def _update(self, sub: RolloutBatch, minibatch: torch.Tensor, tg: A.Targets, version: int,
                stats: dict[str, float]) -> bool:
        """One optimizer update over ``minibatch``, its stats added to ``stats``; False if it was skipped.

        Skipped when the loss or a gradient norm is not finite: AdamW would write the NaN into the
        weights (and its moments), so the gradients are dropped and nothing is stepped.
        """
        algo, t = self.algo, self.cfg.trainer
        acc = dict.fromkeys(STAT_KEYS, 0.0)  # merged into stats only if the update is applied
        self.optimizer.zero_grad(set_to_none=True)
        if self.critic_opt is not None:
            self.critic_opt.zero_grad(set_to_none=True)
        norms = (global_norms(sub.loss_mask[minibatch], self.dist, version + 1) if self.dist.distributed
                 else A.Norms.of(sub.loss_mask[minibatch]))
        # loglinear's endpoints: this is update k of the step's K, its weights at version + k/K (proximal.py)
        updates = max(t.ppo_minibatches, self._update_index + 1)
        progress = loglinear_versions(version, self._update_index, updates)[1] - version
        self._update_index += 1
        mbs = [mb for mb in self.micro_batches(sub, minibatch) if len(mb)]
        for idx in pad_micro_batches(mbs, self.dist, "training micro-batches", version + 1):
            if idx is None:  # another rank has more micro-batches: join its FSDP collectives, weight 0
                zero_pass(self, backward=True)
                continue
            mb = sub.rows(idx, trim=True)
            width = mb.loss_mask.shape[1]
            self._tokens[0] += int(mb.attention_mask.sum())
            self._tokens[1] += mb.attention_mask.numel()
            tmb = A.Targets(*(None if x is None else x[idx, :width] for x in
                              (tg.advantages, tg.prox, tg.ref, tg.old_values, tg.returns)),
                            prox_is_current=tg.prox_is_current,
                            prox_progress=progress)
            logprobs = self.compiled if self.compiled is not None else token_logprobs
            logp, entropy = logprobs(self.model, mb.input_ids, mb.attention_mask, self.temperature,
                                     with_entropy=algo.entropy_coef > 0)
            loss, s = A.micro_batch_loss(logp, entropy, mb, tmb, version, algo, self.loss_settings,
                                         self.kl_ctl.coef, norms)
            self._tally_offpolicy(mb, tmb, logp, version)
            loss.backward()
            share = float(mb.loss_mask.sum()) / norms.tokens  # token-weighted stats
            acc["loss"] += float(loss.detach())
            for k in ("clip_fraction", "approx_kl", "behav_weight_mean"):  # per-micro-batch means
                acc[k] += s.get(k, 0.0) * share
            for k in ("kl_loss", "entropy"):  # already divided by the whole minibatch's normaliser
                acc[k] += s.get(k, 0.0)
            if self.critic is not None:
                vloss, _ = A.critic_loss(self.critic(mb.input_ids, mb.attention_mask), mb, tmb, algo, norms.tokens)
                vloss.backward()
                acc["value_loss"] += float(vloss.detach())
        if self.dist.distributed:  # each rank's part of the global loss: the stats are their sums
            acc = dict(zip(STAT_KEYS, sum_stats([acc[k] for k in STAT_KEYS], self.dist, version + 1), strict=True))
        grad_norm = norm_value(torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip))
        critic_norm = (norm_value(torch.nn.utils.clip_grad_norm_(self.critic.parameters(), t.grad_clip))
                       if self.critic is not None else 0.0)
        if not all(math.isfinite(x) for x in (acc["loss"], acc["value_loss"], grad_norm, critic_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            if self.critic_opt is not None:
                self.critic_opt.zero_grad(set_to_none=True)
            log.warning("step %d: update skipped, not finite: loss %s, grad norm %s, value loss %s, critic grad "
                        "norm %s (gradients dropped, weights unchanged)", version + 1, acc["loss"], grad_norm,
                        acc["value_loss"], critic_norm)
            return False
        self.optimizer.step()
        if self.critic_opt is not None:
            self.critic_opt.step()
        for module in self.modules().values():
            name = first_nonfinite(module)
            if name is not None:
                raise RuntimeError(f"parameter {name!r} is not finite after the update of step {version + 1} "
                                   "(loss and gradient norm were finite): stopping before it is published or saved")
        for k in STAT_KEYS:
            stats[k] += acc[k]
        stats["grad_norm"] = grad_norm
        return True
