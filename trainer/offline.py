"""What every offline post-training command shares (`areal-py sft`, `rm`, `dpo`): the epoch loop over a fixed data
set in seeded order (`train_epochs`), the optimiser and its schedule, padded prompt+response rows and their
response log-probabilities, checkpoints for `--resume`, metrics.jsonl, the trainer's Prometheus metrics and the
final Hugging Face directory.

Invariants:
- The data order of epoch e is a pure function of (seed, e), and checkpoints are taken at epoch ends, so a
  resumed run trains exactly the batches the uninterrupted one would have.
- The learning rate of step s is a pure function of s (``trainer.cold_start.lr_factor``: linear warm-up, then
  constant or a cosine down to ``final_lr_ratio``), set before every step, so nothing of the schedule needs saving.
- Checkpoints are the RL trainer's (trainer/checkpoint.py: DCP, manifest, atomic rename; state.json's
  ``version`` is the optimiser step); the final model is a plain HF directory `areal-py run model.path=` takes.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from areal_py.config import Config, OfflineTrainConfig
from areal_py.config.post_training import PolicyTrainConfig
from areal_py.models import eos_token_id
from areal_py.tasks.base import build_task
from areal_py.telemetry import prom
from areal_py.telemetry.metrics import JsonlWriter, truncate_after_step
from trainer.algo.preference_loss import sequence_logprob
from trainer.checkpoint import load_latest_checkpoint, save_checkpoint
from trainer.cold_start import evaluate as sampled_evaluate
from trainer.cold_start import lr_factor
from trainer.micro_batching import pack_by_padded_tokens
from trainer.rollout_batch import token_logprobs

Progress = Callable[[dict], None]
"""Events for a progress display: ``start`` (steps, step), ``step`` (the step's metrics record), ``eval``
(the held-out record), ``done`` (the summary)."""


@dataclass(frozen=True)
class Row:
    """One training sequence: ``ids`` = prompt ids + response ids (+ EOS); the first ``prompt_len`` are the prompt."""

    ids: list[int]
    prompt_len: int


def load_split(c: OfflineTrainConfig, key: str, task: Any, seed: int, synthetic: Callable[[Any, int, int], list],
               read: Callable[[str], list]) -> tuple[list, list]:
    """(training, held-out) records of section `key` (its config `c`): without ``train_path`` the task's
    synthetic records ``synthetic(task, start, n)``, prompts 0.. for training and the next ``eval_examples`` held
    out (or ``eval_path``); with it, ``eval_path`` or a seeded random ``eval_examples`` of the file held out (the
    rest in file order). `read(path)` parses a file; a split holding out everything is an error naming the keys."""
    if not c.train_path:
        if task is None:
            raise ValueError(f"{key}.train_path is empty and the task has no synthetic data: set {key}.train_path")
        try:
            train = synthetic(task, 0, c.synthetic_examples)
        except ValueError as e:
            raise ValueError(f"{e} ({key}.train_path)") from None
        held = read(c.eval_path) if c.eval_path else synthetic(task, c.synthetic_examples, c.eval_examples)
        return train, held
    records = read(c.train_path)
    if c.eval_path:
        return records, read(c.eval_path)
    if c.eval_examples >= len(records):
        raise ValueError(f"{key}.eval_examples={c.eval_examples} holds out every one of the {len(records)} records of "
                         f"{c.train_path}: lower it, or give {key}.eval_path")
    order = list(range(len(records)))
    random.Random(f"{key}-split:{seed}").shuffle(order)
    n_train = len(records) - c.eval_examples
    return [records[i] for i in sorted(order[:n_train])], [records[i] for i in sorted(order[n_train:])]


@dataclass(frozen=True)
class OfflineData:
    """An offline run's records: the seed of its data order, split and sampling (the section's ``seed``, else
    ``run.seed``); the synthetic task (None when the section names a ``train_path``); training and held-out."""

    seed: int
    task: Any
    train: list
    held: list


def load_run_data(cfg: Config, key: str, synthetic: Callable[[Any, int, int, int], list],
                  read: Callable[[str], list], write: Callable[[Path, list], Any], resume: bool) -> OfflineData:
    """The records of section `key` (``load_split``; ``synthetic(task, start, n, seed)`` makes synthetic ones). A
    fresh run on synthetic data writes what it trains on, in the documented format, to ``data/train.jsonl`` and
    ``data/eval.jsonl`` of the run directory (``write(path, records)``); a resumed one leaves them as they are."""
    c = getattr(cfg, key)
    seed = cfg.run.seed if c.seed is None else c.seed
    task = build_task(cfg, seed) if not c.train_path else None
    train, held = load_split(c, key, task, seed, lambda t, start, n: synthetic(t, start, n, seed), read)
    if task is not None and not resume:
        write(cfg.run_dir() / "data" / "train.jsonl", train)
        write(cfg.run_dir() / "data" / "eval.jsonl", held)
    return OfflineData(seed, task, train, held)


def pad_id(tokenizer: Any) -> int:
    """The id that pads rows: the tokenizer's pad token, or EOS when it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_id(tokenizer)


def sampled_accuracy(model: torch.nn.Module, tokenizer: Any, cfg: Config, c: PolicyTrainConfig,
                     data: OfflineData) -> dict[str, float]:
    """``{"sampled_accuracy": a}``: the policy's accuracy on ``c.eval_samples`` responses sampled (plain HF
    generate, ``trainer.cold_start.evaluate``) for the synthetic task's held-out prompts, which follow the
    training ones; ``{}`` on a data file or with ``eval_samples = 0``."""
    if data.task is None or not c.eval_samples:
        return {}
    return {"sampled_accuracy": sampled_evaluate(
        model, tokenizer, data.task, n=c.eval_samples, temperature=c.eval_temperature, seed=data.seed,
        max_new_tokens=cfg.rollout.max_new_tokens, start_index=len(data.train), chat_template=cfg.task.chat_template,
        system_prompt=cfg.task.system_prompt)}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n), the same for the same (seed, epoch) in every process and run."""
    order = list(range(n))
    random.Random(f"offline:{seed}:{epoch}").shuffle(order)
    return order


def batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """`order` cut into consecutive batches of `batch_size` (the last may be smaller)."""
    return [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]


def micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices into `lengths` grouped so rows x longest <= max_tokens (length-sorted runs), or all in one (0)."""
    return pack_by_padded_tokens(lengths, max_tokens) if max_tokens else [list(range(len(lengths)))]


def padded(rows: Sequence[Row], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids [n, w]`` and the response mask ``[n, w - 1]`` aligned with token_logprobs:
    ``mask[i, t] = 1`` iff token t+1 of row i is a response token (``prompt_len <= t + 1 < len(ids)``)."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width - 1), dtype=torch.long)
    for i, r in enumerate(rows):
        if not 0 < r.prompt_len < len(r.ids):
            raise ValueError(f"row {i}: needs a non-empty prompt and response, got prompt_len={r.prompt_len} of "
                             f"{len(r.ids)} tokens")
        ids[i, : len(r.ids)] = torch.tensor(r.ids)
        mask[i, r.prompt_len - 1 : len(r.ids) - 1] = 1
    return ids, mask


def response_logprobs(model: torch.nn.Module, rows: Sequence[Row], pad: int) -> torch.Tensor:
    """``log π(response | prompt)`` per row under `model` (temperature 1), with the graph when grad is on."""
    device = next(model.parameters()).device
    ids, mask = padded(rows, pad)
    ids, mask = ids.to(device), mask.to(device)
    attention = (torch.arange(ids.shape[1], device=device)[None, :]
                 < torch.tensor([len(r.ids) for r in rows], device=device)[:, None]).long()
    logp, _ = token_logprobs(model, ids, attention, temperature=1.0)
    return sequence_logprob(logp, mask)


class OfflineOptimizer:
    """AdamW with the step's learning rate set before each update (warm-up, then constant or a cosine decay) and
    gradient clipping."""

    def __init__(self, model: torch.nn.Module, c: OfflineTrainConfig, total_steps: int) -> None:
        self.model, self.c, self.total_steps = model, c, total_steps
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)

    def lr_at(self, step: int) -> float:
        return self.c.lr * lr_factor(step, self.total_steps, self.c.warmup_steps, self.c.final_lr_ratio)

    def step(self, step: int) -> tuple[float, float]:
        """Clip, update at ``lr_at(step)``, zero the gradients; returns (grad norm before clipping, lr).
        A non-finite gradient norm skips the update (the weights are never made NaN) and is returned as it is."""
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.c.grad_clip))
        lr = self.lr_at(step)
        if math.isfinite(norm):
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, lr


class OfflineRunFiles:
    """The run directory of an offline command: metrics.jsonl, checkpoints/, final/."""

    def __init__(self, run_dir: Path, keep_checkpoints: int) -> None:
        self.run_dir = run_dir
        self.ckpt_root = run_dir / "checkpoints"
        self.keep = keep_checkpoints
        self.metrics: JsonlWriter | None = None
        self.wall_offset = 0.0
        self.t0 = time.monotonic()

    def wall_time(self) -> float:
        return self.wall_offset + time.monotonic() - self.t0

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore the newest usable checkpoint into model and optimiser; cut metrics.jsonl back to its step."""
        _, state = load_latest_checkpoint(self.ckpt_root, {"model": model}, {"optimizer": optimizer})
        self.wall_offset = state.get("wall_time_s", 0.0)
        truncate_after_step(self.run_dir / "metrics.jsonl", state["version"])
        return state

    def write(self, record: dict) -> None:
        if self.metrics is None:
            self.metrics = JsonlWriter(self.run_dir / "metrics.jsonl")
        self.metrics.write(record)

    def checkpoint(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, epoch: int) -> Path:
        state = {"version": step, "epoch": epoch, "wall_time_s": self.wall_time()}
        return save_checkpoint(self.ckpt_root, {"model": model}, {"optimizer": optimizer}, state, keep=self.keep)

    def save_final(self, model: Any, tokenizer: Any) -> Path:
        out = self.run_dir / "final"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        return out

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


@dataclass(frozen=True)
class EpochsResult:
    """What `train_epochs` ends with: the optimiser steps taken in all (a resumed run counts the earlier ones),
    the held-out record before training (None on resume) and after the last epoch."""

    steps: int
    first_eval: dict | None
    last_eval: dict


def train_epochs(model: torch.nn.Module, opt: OfflineOptimizer, files: OfflineRunFiles, c: OfflineTrainConfig,
                 n_train: int, seed: int, train_step: Callable[[list[int]], dict], evaluate: Callable[[], dict],
                 progress: Progress, resume: bool = False) -> EpochsResult:
    """The epoch loop of every offline command: on resume the newest checkpoint first; a held-out evaluation
    before training (``kind: eval``, step 0, epoch 0), then per epoch its batches in ``epoch_order`` and after
    them an evaluation and a checkpoint.

    ``train_step(indices)`` runs the forward and backward passes of one batch (the gradient of the batch mean,
    accumulated over its micro-batches) and returns the step's statistics; a ``tokens`` entry (tokens trained) also
    feeds ``areal_trainer_trained_tokens_total``. ``evaluate()`` returns the held-out statistics (model in eval
    mode). Each step writes a ``kind: train`` record (the statistics, ``grad_norm``, ``lr``, ``wall_time_s``;
    ``epoch`` is the one being trained, from 1) and sets the trainer's Prometheus metrics (steps, loss,
    grad_norm, policy_version = the step)."""
    step, first_epoch = 0, 0
    if resume:
        state = files.resume(model, opt.optimizer)
        step, first_epoch = state["version"], state["epoch"]

    def held_out(epoch: int) -> dict:
        model.eval()
        rec = {"kind": "eval", "step": step, "epoch": epoch, **evaluate(), "wall_time_s": files.wall_time()}
        model.train()
        files.write(rec)
        progress({"event": "eval", **rec})
        return rec

    prom.TRAINER.policy_version.set(step)
    progress({"event": "start", "steps": opt.total_steps, "step": step})
    first = None if resume else held_out(0)
    last = first
    model.train()
    for epoch in range(first_epoch, c.epochs):
        for idx in batches(epoch_order(n_train, seed, epoch), c.batch_size):
            stats = train_step(idx)
            grad_norm, lr = opt.step(step)
            step += 1
            rec = {"kind": "train", "step": step, "epoch": epoch + 1, **stats, "grad_norm": grad_norm, "lr": lr,
                   "wall_time_s": files.wall_time()}
            files.write(rec)
            _publish(rec)
            progress({"event": "step", **rec})
        last = held_out(epoch + 1)
        files.checkpoint(model, opt.optimizer, step, epoch + 1)
    model.eval()
    if last is None:  # resumed after the last epoch's checkpoint: nothing left to train, evaluate once
        last = held_out(c.epochs)
    return EpochsResult(step, first, last)


def train_to_final(cfg: Config, c: OfflineTrainConfig, model: Any, tokenizer: Any, data: OfflineData,
                   train_step: Callable[[list[int]], dict], evaluate: Callable[[], dict], progress: Progress,
                   resume: bool, sizes: dict[str, int]) -> dict:
    """An offline command's training, from its prepared model and data: the optimiser for ``ceil(len(train) /
    batch_size) * epochs`` steps, ``train_epochs`` in the run directory, then the final HF directory (metrics.jsonl
    closed either way). Returns the summary, also sent as the ``done`` event: steps, `sizes` (the command's record
    counts), ``final``, ``first_eval``, ``last_eval``."""
    opt = OfflineOptimizer(model, c, math.ceil(len(data.train) / c.batch_size) * c.epochs)
    files = OfflineRunFiles(cfg.run_dir(), cfg.trainer.keep_checkpoints)
    try:
        result = train_epochs(model, opt, files, c, len(data.train), data.seed, train_step, evaluate, progress, resume)
        out = files.save_final(model, tokenizer)
    finally:
        files.close()
    summary = {"steps": result.steps, **sizes, "final": str(out), "first_eval": result.first_eval,
               "last_eval": result.last_eval}
    progress({"event": "done", **summary})
    return summary


def _publish(rec: dict) -> None:
    """One step's record as the trainer role's Prometheus metrics (served when run.metrics_port is set)."""
    t = prom.TRAINER
    t.steps.inc()
    t.policy_version.set(rec["step"])
    if math.isfinite(rec["grad_norm"]):
        t.grad_norm.set(rec["grad_norm"])
    if isinstance(rec.get("loss"), float) and math.isfinite(rec["loss"]):
        t.loss.set(rec["loss"])
    if rec.get("tokens"):
        t.trained_tokens.inc(rec["tokens"])
