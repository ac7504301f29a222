"""Build one step's `StepRecord` (a metrics.jsonl row) from what the step saw and did.

Pure over its inputs: the trainer passes the batch it trained, the wire batch it came in, the
learner's stats and the measured phase times; nothing here touches a socket, the model or the clock.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from areal_py.config import AlgoConfig
from areal_py.telemetry.gen_activity import to_run_time
from areal_py.telemetry.prom import TRAINER
from areal_py.telemetry.step_record import ControllerCounters, OffPolicyBucket, StepRecord
from areal_py.wire import protocol as P
from trainer.algo.offpolicy_stats import OffPolicyGroup, OffPolicyStats, staleness_keys
from trainer.rollout_batch import RolloutBatch


@dataclass(frozen=True)
class StepTiming:
    """Measured by the trainer around one step, in seconds. `wall_time_s`: the run clock when the step
    finished; `epoch0`: the wall-clock (epoch) instant of `wall_time_s == 0`, to place generation spans."""
    wall_time_s: float
    epoch0: float
    wait_s: float
    train_s: float
    publish_s: float


def staleness(batch: RolloutBatch, trained_version: int) -> tuple[torch.Tensor, dict[int, int]]:
    """Per-token staleness of the loss tokens (versions behind `trained_version`), and the samples by
    the staleness of their oldest loss token ({versions: samples}; samples without one are left out)."""
    mask = batch.loss_mask.bool()
    token_stale = (trained_version - batch.token_versions)[mask]
    oldest = torch.where(mask, batch.token_versions, torch.iinfo(torch.long).max).min(dim=1).values
    hist: dict[int, int] = {}
    for s in (trained_version - oldest[mask.any(dim=1)]).tolist():
        hist[s] = hist.get(s, 0) + 1
    return token_stale, hist


def build_step_record(*, trained_version: int, batch: RolloutBatch, dropped: Mapping[str, list[int]],
                      wire: P.Batch, stats: Mapping[str, float], timing: StepTiming, trained_tokens_total: int,
                      max_staleness: int, max_token_staleness: int,
                      rank_load: tuple[list[float], list[int]] | None = None,
                      offpolicy: OffPolicyStats | None = None, uninformative_steps: int | None = None) -> StepRecord:
    """The record of the step that trained `batch` (version `trained_version`, publishing the next):
    `dropped` the groups kept out of the loss per reason (`drop_nonfinite_groups`), `stats` the
    learner's, `rank_load` the (busy seconds, tokens) of each trainer rank, `offpolicy` the learner's
    off-policy statistics (None: not computed, the fields stay unrecorded), `uninformative_steps` the
    steps in a row without an informative sample (`SignalWatch.streak`). Values are rounded as the file has
    always held them."""
    token_stale, hist = staleness(batch, trained_version)
    some = batch.num_samples > 0
    ws = wire.stats
    step = trained_version + 1
    return StepRecord(
        step=step, version=step, wall_time_s=round(timing.wall_time_s, 3),
        reward_mean=float(batch.rewards.mean()) if some else 0.0,
        scored_reward_mean=None if ws.scored_reward_mean is None else round(ws.scored_reward_mean, 6),
        response_len_mean=float(batch.response_lengths.float().mean()) if some else 0.0,
        **{f"rejected_groups_{reason}": len(idx) for reason, idx in dropped.items()},
        staleness_mean=float(token_stale.float().mean()) if token_stale.numel() else 0.0,
        staleness_max=int(token_stale.max()) if token_stale.numel() else 0,
        sample_staleness_hist=hist, max_staleness=max_staleness, max_token_staleness=max_token_staleness,
        trained_tokens=int(batch.attention_mask.sum()), trained_tokens_total=trained_tokens_total,
        response_tokens=int(batch.loss_mask.bool().sum()), samples=batch.num_samples,
        generated_tokens=wire.state.generated_tokens, server_generated_tokens=dict(ws.gen_tokens),
        wait_s=round(timing.wait_s, 4), train_s=round(timing.train_s, 4), publish_s=round(timing.publish_s, 4),
        gen_spans=to_run_time(wire.gen_spans, timing.epoch0),
        rollout_slot_occupancy=None if ws.rollout_slot_occupancy is None else round(ws.rollout_slot_occupancy, 4),
        gen_busy_s=round(ws.gen_busy_s, 4),
        generic_engine_servers=ws.generic_engine_servers,
        **multi_turn_fields(ws),
        **{k: round(v, 6) for k, v in stats.items()},
        controller=ControllerCounters.model_validate(wire.state.model_dump()),
        **ledger_fields(wire, dropped),
        uninformative_steps=uninformative_steps,
        **({} if rank_load is None else {
            "rank_busy_s": [round(x, 4) for x in rank_load[0]], "rank_tokens": list(rank_load[1]),
            "rank_tokens_max": max(rank_load[1]), "rank_tokens_min": min(rank_load[1])}),
        **({} if offpolicy is None else offpolicy_fields(offpolicy)),
    )


MULTI_TURN_COUNTS = ("episodes", "episode_turns", "tool_calls", "tool_errors", "tool_timeouts", "tool_crashes",
                     "episodes_succeeded", "episodes_succeeded_with_tool")


def multi_turn_fields(ws: P.BatchStats) -> dict:
    """The step record's multi-turn fields from the batch's stats (none for a single-turn run, whose stats carry
    none): the counts as sent, the two means rounded, and turns_per_episode = episode_turns / episodes."""
    if ws.episodes is None:
        return {}
    out: dict = {k: getattr(ws, k) for k in MULTI_TURN_COUNTS}
    for k in ("tool_latency_mean_s", "tool_token_share"):
        if getattr(ws, k) is not None:
            out[k] = round(getattr(ws, k), 6)
    if ws.episodes:
        out["turns_per_episode"] = round((ws.episode_turns or 0) / ws.episodes, 4)
    return out


def ledger_fields(wire: P.Batch, dropped: Mapping[str, list[int]]) -> dict:
    """The step's ledger entries: the prompt indices of the groups trained (the batch's, less the positions
    `dropped` kept out of the loss), and those dropped since the previous step, by reason: the controller's
    (`Batch.dropped_prompts`) and this step's (`dropped`, positions in the batch, mapped to prompt indices)."""
    out = {reason: list(prompts) for reason, prompts in wire.dropped_prompts.items()}
    left_out = set()
    for reason, positions in dropped.items():
        if positions:
            out.setdefault(reason, []).extend(wire.groups[i].prompt_index for i in positions)
            left_out.update(positions)
    trained = [g.prompt_index for i, g in enumerate(wire.groups) if i not in left_out]
    return {"trained_prompts": trained, "dropped_prompts": out}


def computed_stats(stats: Mapping[str, float], algo: AlgoConfig) -> dict[str, float]:
    """The learner's stats less those it reports as 0.0 without computing them, so the step record leaves them
    out (None) instead of logging a 0 that reads as a measurement: ``entropy`` is computed only for the entropy
    bonus (``algo.entropy_coef > 0``, the learner's own condition)."""
    return {k: v for k, v in stats.items() if not (k == "entropy" and algo.entropy_coef <= 0)}


def _bucket(g: OffPolicyGroup) -> OffPolicyBucket:
    return OffPolicyBucket(tokens=g.tokens, kl_mean=round(g.kl_mean, 6), kl_max=round(g.kl_max, 6),
                           ess=round(g.ess, 6), bounded_fraction=round(g.bounded_fraction, 6))


def offpolicy_fields(s: OffPolicyStats) -> dict[str, object]:
    """The step record's off-policy fields (``offpolicy_*``) from the learner's statistics."""
    a = s.all
    return {"offpolicy_kl_mean": round(a.kl_mean, 6), "offpolicy_kl_max": round(a.kl_max, 6),
            "offpolicy_ess": round(a.ess, 6), "offpolicy_bounded_fraction": round(a.bounded_fraction, 6),
            "offpolicy_by_staleness": {k: _bucket(g) for k, g in s.by_staleness.items()}}


def export_offpolicy(record: StepRecord) -> None:
    """The record's off-policy statistics to the trainer's Prometheus gauges, label ``staleness`` = "all"
    or a bucket key; a bucket without tokens this step is set to its empty values (0 tokens, ESS 1)."""
    if record.offpolicy_kl_mean is None:
        return
    rows = {"all": OffPolicyBucket(tokens=record.response_tokens or 0, kl_mean=record.offpolicy_kl_mean,
                                   kl_max=record.offpolicy_kl_max or 0.0, ess=record.offpolicy_ess or 1.0,
                                   bounded_fraction=record.offpolicy_bounded_fraction or 0.0)}
    empty = OffPolicyBucket(tokens=0, kl_mean=0.0, kl_max=0.0, ess=1.0, bounded_fraction=0.0)
    rows |= {k: (record.offpolicy_by_staleness or {}).get(k, empty) for k in staleness_keys()}
    for label, b in rows.items():
        TRAINER.offpolicy_kl_mean.labels(staleness=label).set(b.kl_mean)
        TRAINER.offpolicy_kl_max.labels(staleness=label).set(b.kl_max)
        TRAINER.offpolicy_ess.labels(staleness=label).set(b.ess)
        TRAINER.offpolicy_bounded.labels(staleness=label).set(b.bounded_fraction)
        TRAINER.offpolicy_tokens.labels(staleness=label).set(b.tokens)
