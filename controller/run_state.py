"""The controller's counters and positions: one record, its checkpointed part and how a resume restores it.

Counts are in groups (one prompt's n samples are one group):
  running  - admitted, not yet finished and scored (re-dispatch after a server death keeps it here)
  accepted - finished and scored: waiting in the buffer or already sent to the trainer
A group dropped as too stale leaves `accepted`, which frees capacity for a fresh one.

Each batch carries `snapshot()` (a `ControllerState`) to the trainer, which checkpoints the last
trained one and hands it back on resume; the batches the trainer checkpoints also carry the
controller's buffer (`protocol.ControllerBuffer`: ready and pending groups), restored by
`Rollouts.restore`. `restore` here recomputes what follows from them:

    accepted = version * batch_size + len(buffer.ready)   (every trained group, plus the ready ones)
    running  = len(buffer.pending)                        (admitted, not yet scored)

The ledger: every prompt taken from the task is, in the end, trained once, dropped with a reason, or
still in the buffer. Drops (and prompts skipped at admission) are noted here by prompt index and go
out with the next batch (`take_dropped`), so the trainer's step records, cut back to the checkpoint
on resume like everything else, hold a ledger that is consistent with the checkpointed buffer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from areal_py.telemetry.prom import CONTROLLER as M
from areal_py.wire import protocol as P

DropReason = Literal["stale", "uniform", "aborted"]


@dataclass
class RunCounters:
    # restored from the trainer's checkpoint on resume
    data_position: int = 0     # next prompt index to take from the task
    dropped_stale: int = 0
    dropped_uniform: int = 0
    dropped_aborted: int = 0   # groups refused by a server (finish_reason abort)
    generated_tokens: int = 0
    # recomputed on resume
    accepted: int = 0
    running: int = 0
    next_gid: int = 0
    base_version: int = 0        # the trainer's version at start: servers below it cannot count for admission
    next_batch_version: int = 0  # the trainer version the next batch is for
    aborted_in_a_row: int = 0    # refusals since the last group that finished otherwise
    # since the controller started
    gen_tokens_by_server: dict[str, int] = field(default_factory=dict)
    # since the previous batch: every sample scored, dynamic sampling's drops included
    scored_reward_sum: float = 0.0
    scored_samples: int = 0
    dropped_prompts: dict[str, list[int]] = field(default_factory=dict)  # reason -> prompt indices

    def add_generated(self, server_id: str, tokens: int) -> None:
        self.generated_tokens += tokens
        self.gen_tokens_by_server[server_id] = self.gen_tokens_by_server.get(server_id, 0) + tokens

    def add_scored(self, rewards: list[float]) -> None:
        self.scored_reward_sum += sum(rewards)
        self.scored_samples += len(rewards)

    def take_scored_reward_mean(self) -> float | None:
        """The mean reward scored since the previous call (None: nothing was scored), and start anew."""
        mean = self.scored_reward_sum / self.scored_samples if self.scored_samples else None
        self.scored_reward_sum, self.scored_samples = 0.0, 0
        return mean

    def drop(self, reason: DropReason, prompts: list[int]) -> None:
        """Count the groups of `prompts` (their prompt indices) dropped before any batch, here, in the ledger
        and in Prometheus (`areal_controller_dropped_groups_total{reason}`); the caller takes them out of
        `running`/`accepted`."""
        setattr(self, f"dropped_{reason}", getattr(self, f"dropped_{reason}") + len(prompts))
        if prompts:
            M.dropped_groups.labels(reason=reason).inc(len(prompts))
        self.note_dropped(reason, prompts)

    def note_dropped(self, reason: str, prompts: list[int]) -> None:
        """Put `prompts` in the ledger as dropped for `reason` (also prompts skipped before admission)."""
        if prompts:
            self.dropped_prompts.setdefault(reason, []).extend(prompts)

    def take_dropped(self) -> dict[str, list[int]]:
        """The ledger's drops since the previous call (reason -> prompt indices), and start anew."""
        out, self.dropped_prompts = self.dropped_prompts, {}
        return out

    def snapshot(self, *, reward_timeouts: int, reward_errors: int, skipped_too_long: int,
                 skipped_bad_lines: int = 0) -> P.ControllerState:
        """The state a batch carries; the counts kept elsewhere (reward pool, length gate, task) are passed in."""
        return P.ControllerState(
            data_position=self.data_position, accepted=self.accepted, running=self.running,
            dropped_stale=self.dropped_stale, dropped_uniform=self.dropped_uniform,
            reward_timeouts=reward_timeouts, reward_errors=reward_errors, generated_tokens=self.generated_tokens,
            skipped_too_long=skipped_too_long, dropped_aborted=self.dropped_aborted,
            skipped_bad_lines=skipped_bad_lines)

    def restore(self, version: int, batch_size: int, state: P.ControllerState | None,
                buffer: P.ControllerBuffer | None = None) -> None:
        """Start at trainer `version`, from the checkpointed `state` of its last batch (None: a fresh run)
        and its `buffer` (None: nothing in flight survives; a checkpoint written without one).

        The reward pool's counts start from 0 again; the caller restores `skipped_too_long` to its gate and
        the buffer's groups to `Rollouts` (which may drop some of them, adjusting `running`/`accepted`).
        """
        self.base_version = self.next_batch_version = version
        if state is not None:
            self.data_position = state.data_position
            self.dropped_stale = state.dropped_stale
            self.dropped_uniform = state.dropped_uniform
            self.generated_tokens = state.generated_tokens
            self.dropped_aborted = state.dropped_aborted
        self.accepted = version * batch_size  # every trained group
        self.running = 0
        if buffer is not None:
            self.accepted += len(buffer.ready)
            self.running = len(buffer.pending)
            self.next_gid = buffer.next_gid
