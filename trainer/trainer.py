"""The trainer: pull a batch, recompute proximal logprobs, GRPO advantages, decoupled PPO, publish.

Version bookkeeping: the trainer holds version v, trains batch v (the controller numbers batches
by the version that trains them), and publishes the result as v+1. Per-token staleness is
v - (version that generated the token).

Ranks (`trainer.world_size`): rank 0 alone talks to the controller, splits each batch into
token-balanced shares (trainer/rank_step.py) and publishes the full weights gathered from the FSDP2
shards; the other ranks follow its commands. The loss carries the global normaliser, so FSDP sums
the ranks' gradients rather than averaging them.

Rank 0's link to the controller (the batch intake, the probes, a restarted controller noticed) is
trainer/controller_link.py; this module is the step loop around it: hello, train, publish, checkpoint, rejoin.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from pydantic import ValidationError

from areal_py.config import Config
from areal_py.model_dir import model_path
from areal_py.models import load_model_and_tokenizer
from areal_py.telemetry.metrics import JsonlWriter, truncate_after_step
from areal_py.telemetry.prom import TRAINER as M
from areal_py.telemetry.signal_watch import SignalWatch
from areal_py.telemetry.step_record import StepRecord
from areal_py.telemetry.tensorboard import TensorBoardLog
from areal_py.wire import protocol as P
from areal_py.wire.dist_weights import DistWeightsError, WeightGroup, layout_for
from areal_py.wire.transport import ControllerLost, send
from areal_py.wire.weight_files import sha256_file
from areal_py.wire.weights import named_weights, save_weights
from trainer.checkpoint import CheckpointError, checkpoint_dirs, load_latest_checkpoint, save_checkpoint
from trainer.controller_link import ROLE, ControllerLink, ControllerRestarted
from trainer.distributed import DistError, close_dist, init_dist
from trainer.learner import Learner
from trainer.rank_step import SKIP, TRAIN, receive_command, send_command
from trainer.rollout_batch import collate, drop_nonfinite_groups
from trainer.sharding import full_weights
from trainer.step_metrics import StepTiming, build_step_record, computed_stats, export_offpolicy

log = logging.getLogger("trainer")


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False) -> None:
        self.cfg = cfg
        t = cfg.trainer  # world size 1 (the default): no process group; ranks > 0 may wait a batch's time
        self.dist = init_dist(t.dist_timeout_s, longest_wait_s=t.dist_timeout_s + t.batch_timeout_s)
        path = model_path(cfg)
        self.model, self.tokenizer = load_model_and_tokenizer(path, dtype=cfg.model.dtype)
        self.learner = Learner(cfg, self.model, path, dist=self.dist)
        self.version = 0
        self.resume_state: P.ControllerState | None = None
        self.resume_buffer: P.ControllerBuffer | None = None  # the controller's groups in flight at the checkpoint
        self.wall_offset = 0.0
        self.trained_tokens_total = 0
        self.signal = SignalWatch(t.warn_uninformative_steps)  # steps in a row with no informative sample
        self.ckpt_root = cfg.run_dir() / "checkpoints"
        if resume:
            self._resume()
        self.start_time = time.monotonic()
        self.weight_group: WeightGroup | None = None  # weights.transfer=dist, joined in serve()
        if not self.dist.is_main:  # ranks > 0 follow rank 0: no sockets, no metrics (see `follow`)
            return
        self.metrics = JsonlWriter(cfg.run_dir() / "metrics.jsonl")
        self.tb = (TensorBoardLog(cfg.run_dir() / "tensorboard", resume_step=self.version if resume else None)
                   if cfg.run.tensorboard else None)
        self.link = ControllerLink.connect(cfg)
        self.hello_version = -1  # the version of its last hello (`rejoin`)

    def _resume(self) -> None:
        """Restore the newest usable checkpoint, and cut metrics.jsonl back to its step: the steps after it
        are trained again, so their rows from the crashed run would appear twice (they are kept aside, see
        `truncate_after_step`; TensorBoard purges them, see `TensorBoardLog`). Disk weight files past it go
        at the first publish (see `save_weights`). Every rank restores its shards; the checkpoint may have been
        written at another world size (trainer/checkpoint.py)."""
        d, state = load_latest_checkpoint(self.ckpt_root, self.learner.modules(), self.learner.optimizers(),
                                          self.dist)
        self.version = state["version"]
        saved = state["controller_state"]  # {}: checkpointed before any batch
        try:
            self.resume_state = P.ControllerState.model_validate(saved) if saved else None
        except ValidationError as e:
            raise CheckpointError(f"{d / 'state.json'}: controller_state is not a valid controller state: {e}") from None
        buffer = state.get("controller_buffer")  # absent or null: written without one (nothing in flight resumes)
        try:
            self.resume_buffer = P.ControllerBuffer.model_validate(buffer) if buffer is not None else None
        except ValidationError as e:
            raise CheckpointError(f"{d / 'state.json'}: controller_buffer is not a valid controller buffer: "
                                  f"{e}") from None
        self.wall_offset = state["wall_time_s"]
        self.trained_tokens_total = state.get("trained_tokens_total", 0)
        log.info("resumed from %s at version %d", d, self.version)
        if not self.dist.is_main:  # rank 0 writes metrics.jsonl
            return
        dropped = truncate_after_step(self.cfg.run_dir() / "metrics.jsonl", self.version)
        if dropped is not None:
            log.warning("metrics.jsonl: rows past step %d (trained again now) moved to %s", self.version, dropped)

    # --- loop --------------------------------------------------------------------------------------
    def join_weight_group(self) -> None:
        """weights.transfer=dist: host the weight group and wait for every rollout server to join it."""
        w = self.cfg.weights
        if w.transfer == "dist" and self.weight_group is None:
            log.info("forming the weight group at %s:%d with %d server(s)", w.dist_host, w.dist_port,
                     self.cfg.rollout.num_servers)
            self.weight_group = WeightGroup.join_root(
                host=w.dist_host, port=w.dist_port, num_servers=self.cfg.rollout.num_servers,
                timeout_s=w.dist_timeout_s, join_timeout_s=w.dist_join_timeout_s,
                device=next(self.model.parameters()).device)

    def publish_dist(self, weights: dict) -> bool:
        """Announce the layout through the controller, then broadcast the bytes on the weight group. False
        after a failed broadcast with weights.dist_on_failure=stream: the group is closed for good and the
        caller sends this version (and every later one) as stream frames; with `stop` the error ends the run."""
        g = self.weight_group
        if g is None or g.broken:
            return False
        layout = layout_for(weights, max(1, int(self.cfg.weights.dist_bucket_mb * 2**20)))
        send(self.link.to_ctrl, P.WeightsReady(version=self.version, path=None, dist=layout))
        try:
            g.send(weights, self.version, layout)
        except DistWeightsError as e:
            if self.cfg.weights.dist_on_failure == "stop":
                raise
            log.error("%s; version %d and later go as stream frames (weights.dist_on_failure=stream)", e,
                      self.version)
            return False
        return True

    def publish(self) -> None:
        """Send the new weights (rank 0). With several ranks every rank calls it: the full weights are
        gathered from the shards onto rank 0 first (a collective, trainer/sharding.py)."""
        weights = full_weights(self.model, self.dist) if self.dist.distributed else named_weights(self.model)
        if not self.dist.is_main:
            return
        if self.cfg.weights.transfer == "dist" and self.publish_dist(weights):
            return
        if self.cfg.weights.transfer == "disk":
            path = save_weights(weights, self.cfg.weights_dir(), self.version, keep=self.cfg.weights.keep)
            send(self.link.to_ctrl, P.WeightsReady(version=self.version, path=str(path.resolve()), sha256=sha256_file(path)))
        else:
            send(self.link.to_ctrl, P.WeightsReady(version=self.version, path=None), weights)

    def serve(self) -> None:
        if not self.dist.is_main:
            self.follow()
            return
        self.join_weight_group()
        self.hello()
        t = self.cfg.trainer
        last_state, last_buffer = self.resume_state, self.resume_buffer
        try:
            while self.version < t.total_steps:
                try:
                    wire, wait_s = self.link.next_batch(self.version)
                except ControllerRestarted as e:
                    self.rejoin(e.session)
                    last_state, last_buffer = self.resume_state, self.resume_buffer
                    continue
                self._step(wire, wait_s)
                last_state, last_buffer = wire.state, wire.buffer
                if t.checkpoint_every and self.version % t.checkpoint_every == 0 and self.version < t.total_steps:
                    self.checkpoint(last_state, last_buffer)
            self.checkpoint(last_state, last_buffer)
            self.save_final()
            send(self.link.to_ctrl, P.TrainerDone(version=self.version))
        finally:
            self.close()

    def hello(self) -> None:
        """Tell the controller where the run stands: the version, and on resume the checkpoint's counters
        and buffer; then the resumed weights, since servers start from the base model.

        First the controller must answer a probe (`ControllerLink.await_controller`): its session is the one this
        hello goes to, so an answer under another one later is a restart, however soon after the hello it came."""
        self.link.await_controller(self.version)
        self.hello_version = self.version
        send(self.link.to_ctrl, P.TrainerHello(version=self.version, resume_state=self.resume_state,
                                          resume_buffer=self.resume_buffer))
        if self.version > 0:
            self.publish()

    def rejoin(self, session: str) -> None:
        """The controller restarted (`areal-py serve controller --resume`): what it held died with it, and
        the latest checkpoint holds it as of that step, so roll back to that checkpoint in this process
        and say the hello of `--resume`, as a restarted trainer would: the steps since are trained again
        and the ledger stays exact. World size 1 only (the other ranks would have to roll back with it),
        and only with a checkpoint to go back to; otherwise stop with ControllerLost, as before. With no step
        trained since its hello (the controller died right after it), nothing needs rolling back: the same
        hello is said again."""
        if self.version == self.hello_version:
            log.warning("the controller restarted (session %s, was %s) before any step since this trainer's hello "
                        "at version %d: saying it again", session, self.link.controller_session, self.version)
            self.link.ahead.clear()
            self.hello()
            return
        ckpts = checkpoint_dirs(self.ckpt_root)
        if self.dist.distributed or not ckpts:
            why = ("trainer.world_size > 1, whose ranks cannot roll back in process" if self.dist.distributed else
                   "no checkpoint was written yet to roll back to")
            raise ControllerLost(f"{ROLE}: the controller at {self.cfg.net.addr(self.cfg.net.trainer_port)} restarted "
                                 f"(session {session}) and this trainer cannot rejoin it: {why}. Start the run again: "
                                 f"`areal-py run --resume run.name={self.cfg.run.name}` (or, without a checkpoint, "
                                 "without --resume)")
        log.warning("the controller restarted (session %s, was %s) while this trainer waited for batch %d: rolling "
                    "back to %s and rejoining", session, self.link.controller_session, self.version, ckpts[0])
        self.metrics.close()  # _resume rewrites metrics.jsonl without the rows past the checkpoint
        if self.tb is not None:
            self.tb.close()
        self._resume()
        self.link.ahead.clear()  # the dead controller's batches: the restarted one sends its own
        self.metrics = JsonlWriter(self.cfg.run_dir() / "metrics.jsonl")
        if self.tb is not None:
            self.tb = TensorBoardLog(self.cfg.run_dir() / "tensorboard", resume_step=self.version)
        self.signal = SignalWatch(self.cfg.trainer.warn_uninformative_steps)
        self.start_time = time.monotonic()  # wall time goes on from the checkpoint's, as on --resume
        self.link.controller_session = session
        self.hello()

    def follow(self) -> None:
        """Ranks > 0: train the share rank 0 hands out each step, take part in every gather and checkpoint,
        and stop after the last step. When rank 0 dies, its process group connections close and the next
        collective here fails with a `DistError` naming it (within trainer.dist_timeout_s if it hangs)."""
        t = self.cfg.trainer
        try:
            if self.version > 0:
                self.publish()  # rank 0 republishes the resumed weights: join the gather
            while self.version < t.total_steps:
                cmd = receive_command(self.dist, self.version + 1, timeout_s=t.dist_timeout_s + t.batch_timeout_s)
                if cmd == TRAIN:
                    self.learner.train_step(None, self.version)
                elif cmd == SKIP:
                    self.learner.skip_step(self.version, "every group of its batch held a non-finite value")
                else:
                    raise DistError(f"rank {self.dist.rank}: unknown command {cmd} from rank 0 at step "
                                    f"{self.version + 1}")
                self.version += 1
                self.publish()
                if t.checkpoint_every and self.version % t.checkpoint_every == 0 and self.version < t.total_steps:
                    self.checkpoint(None)
            self.checkpoint(None)
            self.save_final()
        finally:
            self.close()

    def _step(self, wire: P.Batch, wait_s: float) -> None:
        """Batch, learner step, publish the weights, write the step record."""
        t0 = time.perf_counter()
        batch, dropped = drop_nonfinite_groups(collate(wire.groups, self.tokenizer.pad_token_id))
        self._report_dropped(wire, dropped)
        if batch.num_samples:
            stats = self.learner.train_step(batch, self.version)
        else:
            if self.dist.distributed:
                send_command(self.dist, self.version + 1, SKIP)
            stats = self.learner.skip_step(self.version, "every group of its batch held a non-finite value")
        train_s = time.perf_counter() - t0
        self._watch_signal(self.version + 1, stats)
        stats = computed_stats(stats, self.cfg.algo)
        load = self.learner.rank_load
        others = self.dist.world_size - 1  # a skipped step: the other ranks did nothing
        rank_load = ((load.busy_s, load.tokens) if load is not None and self.dist.distributed and batch.num_samples
                     else ([train_s] + [0.0] * others, [int(batch.attention_mask.sum())] + [0] * others))
        t1 = time.perf_counter()
        self.version += 1
        self.publish()
        publish_s = time.perf_counter() - t1
        self.trained_tokens_total += int(batch.attention_mask.sum())
        wall = self.wall_time()
        record = build_step_record(
            trained_version=self.version - 1, batch=batch, dropped=dropped, wire=wire, stats=stats,
            timing=StepTiming(wall_time_s=wall, epoch0=time.time() - wall, wait_s=wait_s, train_s=train_s,
                              publish_s=publish_s),
            trained_tokens_total=self.trained_tokens_total, max_staleness=self.cfg.effective_max_staleness,
            max_token_staleness=self.cfg.effective_max_token_staleness, rank_load=rank_load,
            offpolicy=self.learner.offpolicy if batch.num_samples else None,
            uninformative_steps=self.signal.streak)
        self.metrics.write(record.to_dict())
        if self.tb is not None:
            self.tb.write(record)
        self._export(record, wait_s, train_s, publish_s)
        export_offpolicy(record)
        log.info("step %d reward %.3f staleness max %d loss %.4f", record.step, record.reward_mean,
                 record.staleness_max, record.loss)

    def _watch_signal(self, step: int, stats: dict[str, float]) -> None:
        """Count steps without an informative sample; warn at trainer.warn_uninformative_steps in a row (and
        every as many after): such a run trains nothing while reporting steps done."""
        warn = self.signal.observe(stats.get("informative_samples", 0.0))
        M.uninformative_steps.set(self.signal.streak)
        if warn:
            log.warning("step %d: %d steps in a row trained no informative sample: in every group all rewards were "
                        "equal, so every advantage was 0 and nothing was learned (trainer.warn_uninformative_steps="
                        "%d). Check the reward (reward_mean always 0 or 1? ctrl_reward_errors?), the answer format "
                        "and whether the task suits the model", step, self.signal.streak, self.signal.limit)

    def _report_dropped(self, wire: P.Batch, dropped: dict[str, list[int]]) -> None:
        """Count and log the groups `drop_nonfinite_groups` kept out of the loss (gids: the first 10)."""
        for reason, idx in dropped.items():
            if idx:
                M.rejected_groups.labels(reason=reason).inc(len(idx))
                gids = [wire.groups[i].gid for i in idx]
                log.warning("batch %d: %d group(s) dropped before the loss, %s in float32: gids %s%s", self.version,
                            len(gids), reason, gids[:10], " ..." if len(gids) > 10 else "")

    @staticmethod
    def _export(record: StepRecord, wait_s: float, train_s: float, publish_s: float) -> None:
        """The step to Prometheus; phase times unrounded (the record's are rounded for the file)."""
        prox = record.prox_time_s or 0.0
        for phase, secs in (("wait", wait_s), ("proximal", prox), ("forward_backward", max(0.0, train_s - prox)),
                            ("publish", publish_s)):
            M.step_phase_seconds.labels(phase=phase).observe(secs)
        M.busy.set(train_s / max(wait_s + train_s + publish_s, 1e-9))
        M.trained_tokens.inc(record.trained_tokens or 0)
        M.steps.inc()
        M.skipped_updates.inc(record.skipped_updates or 0.0)
        M.policy_version.set(record.step)
        for rank, (busy, tokens) in enumerate(zip(record.rank_busy_s or [], record.rank_tokens or [], strict=True)):
            M.rank_busy.labels(rank=str(rank)).set(busy)
            M.rank_tokens.labels(rank=str(rank)).set(tokens)
        for gauge, value in ((M.loss, record.loss), (M.clip, record.clip_fraction), (M.approx_kl, record.approx_kl),
                             (M.entropy, record.entropy), (M.grad_norm, record.grad_norm)):
            gauge.set(math.nan if value is None else value)  # NaN: not computed this run (e.g. entropy)

    def wall_time(self) -> float:
        return self.wall_offset + time.monotonic() - self.start_time

    def checkpoint(self, controller_state: P.ControllerState | None,
                   buffer: P.ControllerBuffer | None = None) -> None:
        """Every rank writes its shards; the run position is rank 0's (the one that received the batches):
        the last trained batch's controller state and buffer (its groups not yet trained, for a lossless resume;
        the controller attaches one to every batch whose state is checkpointed, TrainerConfig.checkpoints_at)."""
        saved = controller_state.model_dump() if controller_state is not None else {}
        state = {"version": self.version, "controller_state": saved, "wall_time_s": self.wall_time(),
                 "trained_tokens_total": self.trained_tokens_total,
                 "controller_buffer": buffer.model_dump() if buffer is not None else None}
        d = save_checkpoint(self.ckpt_root, self.learner.modules(), self.learner.optimizers(), state,
                            keep=self.cfg.trainer.keep_checkpoints, dist=self.dist)
        if self.dist.is_main:
            log.info("checkpoint %s", d)

    def save_final(self) -> Path:
        """A plain Hugging Face directory. With several ranks the full weights are gathered from the shards
        onto rank 0 (a collective: every rank calls this), which alone writes it."""
        out = self.cfg.run_dir() / "final"
        if self.dist.distributed:
            weights = full_weights(self.model, self.dist)
            if self.dist.is_main:
                self.model.save_pretrained(out, state_dict=weights)
        else:
            self.model.save_pretrained(out)
        if self.dist.is_main:
            self.tokenizer.save_pretrained(out)
            log.info("final model saved to %s", out)
        return out

    def close(self) -> None:
        if not self.dist.is_main:
            close_dist()
            return
        if self.weight_group is not None:
            self.weight_group.close()
        self.metrics.close()
        if self.tb is not None:
            self.tb.close()
        self.link.close()
        close_dist()
