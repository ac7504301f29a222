"""Cold start: a short, deliberately noisy SFT so RL starts from a model that knows the format.

A random-init model never emits "<answer><eos>", so every RL group would score 0 and carry no
signal. A few seconds of SFT teaches the format; label noise keeps accuracy well below 100%
so there is something left for RL to learn. The result is cached on disk by a hash of every
setting, so every process of a run (and every test) shares one preparation.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from areal_py.model_dir import COLD_START_BETAS, COLD_START_WARMUP_STEPS, EmbeddedSettings, task_identity
from areal_py.models import (
    EmbeddedModelSpec,
    create_embedded_model,
    eos_token_id,
    load_model_and_tokenizer,
)
from areal_py.tasks.arith import ArithTask
from areal_py.tasks.base import Prompt, SegmentedSftTask, SftTask, Task
from areal_py.tasks.prompt_render import prompt_format, render_prompt
from areal_py.threads import auto_threads
from trainer.micro_batching import pack_by_padded_tokens

# Defaults sized so the cold start stays short on a CPU and leaves the model answering some sums but
# far from all, so RL has signal and room (the measured time and accuracy: docs/benchmarks.md, Cold start).
DEFAULT_STEPS = 120
DEFAULT_LABEL_NOISE = 0.2


def _sft_rows(
    tokenizer: PreTrainedTokenizerBase, task: SftTask, rng: random.Random, batch_size: int, label_noise: float,
    chat_template: str = "false", system_prompt: str | None = None,
) -> list[tuple[list[int], list[int]]]:
    """`prompt + target + eos` token ids with labels only on the target and EOS; the prompt rendered as the
    controller renders it (render_prompt under task.chat_template and task.system_prompt).

    A task with `sft_segments` (SegmentedSftTask: a tool-using target) gives its target as (text, trained)
    segments, each tokenised on its own as a workflow appends them (tool output as `text_ids` does); an
    untrained segment (the tool's output) is in the row's context with label -100, as RL masks it."""
    eos = eos_token_id(tokenizer)
    rows: list[tuple[list[int], list[int]]] = []
    for _ in range(batch_size):
        if isinstance(task, SegmentedSftTask):
            prompt, segments = task.sft_segments(rng, label_noise)
        else:
            prompt, target = task.sft_example(rng, label_noise)
            segments = [(target, True)]
        prompt_ids = render_prompt(tokenizer, Prompt(0, prompt, ""), chat_template, system_prompt)
        ids, labels = list(prompt_ids), [-100] * len(prompt_ids)
        for text, trained in segments:
            seg = tokenizer(text, add_special_tokens=False).input_ids
            ids += seg
            labels += seg if trained else [-100] * len(seg)
        rows.append((ids + [eos], labels + [eos]))
    return rows


def _padded(rows: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors for one micro-batch, as wide as its longest row."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def lr_factor(step: int, steps: int, warmup_steps: int, final_lr_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up, then cosine decay.

        f = (step + 1) / warmup                                          while step + 1 < warmup
        f = r + (1 - r) * (1 + cos(pi * t)) / 2,  t = (step + 1 - warmup) / (steps - warmup)   after

    with r = final_lr_ratio; r = 1 keeps the lr constant after warm-up. A long cold start ends at a
    small lr so it settles instead of hopping between solutions (see configs/sum_cot.yaml).
    """
    warm = max(1, warmup_steps)
    if step + 1 < warm:
        return (step + 1) / warm
    t = min(1.0, (step + 1 - warm) / max(1, steps - warm))
    return final_lr_ratio + (1.0 - final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def cold_start(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: SftTask,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    betas: tuple[float, float] = COLD_START_BETAS,
    warmup_steps: int = COLD_START_WARMUP_STEPS,
    final_lr_ratio: float = 1.0,
    label_noise: float = DEFAULT_LABEL_NOISE,
    seed: int = 0,
    max_tokens_per_micro_batch: int = 8192,
    on_step: Callable[[int, float], None] | None = None,
    chat_template: str = "false",
    system_prompt: str | None = None,
) -> dict:
    """SFT in place with AdamW, linear warm-up and optional cosine decay (`lr_factor`); returns
    {steps, seconds, first/final loss}.

    The loss is the mean over every target token of the batch, accumulated over length-sorted
    micro-batches (`pack_by_padded_tokens`) so a long-tailed task is not padded to its longest.
    `on_step(steps_done, loss)` is called after every optimizer step (progress display).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    if not 0.0 <= final_lr_ratio <= 1.0:
        raise ValueError(f"final_lr_ratio must be in [0, 1], got {final_lr_ratio}")
    rng = random.Random(f"cold_start:{seed}")
    eos = eos_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, warmup_steps, final_lr_ratio)
    )
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for _ in range(steps):
        rows = _sft_rows(tokenizer, task, rng, batch_size, label_noise, chat_template, system_prompt)
        n_targets = sum(sum(1 for x in lab if x != -100) for _, lab in rows)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for idx in pack_by_padded_tokens([len(ids) for ids, _ in rows], max_tokens_per_micro_batch):
            batch = {k: v.to(device) for k, v in _padded([rows[i] for i in idx], pad).items()}
            mb_targets = int((batch["labels"][:, 1:] != -100).sum())
            loss = model(**batch).loss * (mb_targets / n_targets)  # HF mean -> share of the batch mean
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss_sum)
        if on_step is not None:
            on_step(len(losses), loss_sum)
    model.eval()
    tail = losses[-10:]
    return {
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "first_loss": losses[0] if losses else math.nan,
        "final_loss": sum(tail) / len(tail) if tail else math.nan,
    }


@torch.no_grad()
def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    n: int = 256,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 5,
    *,
    start_index: int = 0,
    batch_size: int = 256,
    prompts: list[Prompt] | None = None,
    chat_template: str = "false",
    system_prompt: str | None = None,
) -> float:
    """Fraction of prompts `start_index..+n` rewarded (or of `prompts`, if given), sampled with plain HF `generate`.

    Prompts are rendered as the controller renders them (render_prompt under `chat_template`, `system_prompt`).

    Independent of the project's rollout engine, so it can cross-check it. temperature 0
    means greedy. The response is cut at the first EOS; special tokens before it are kept in
    the text (and so fail exact-match rewards) rather than silently dropped.
    """
    eos = eos_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if temperature > 0
        else {"do_sample": False}
    )
    total = 0.0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if prompts is None:
                prompts = [task.prompt(start_index + i) for i in range(n)]
            n = len(prompts)
            for lo in range(0, n, batch_size):
                chunk = prompts[lo : lo + batch_size]
                enc = tokenizer.pad({"input_ids": [render_prompt(tokenizer, p, chat_template, system_prompt)
                                                   for p in chunk]}, return_tensors="pt")
                out = model.generate(
                    input_ids=enc.input_ids.to(device),
                    attention_mask=enc.attention_mask.to(device),
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad,
                    eos_token_id=eos,
                    **sampling,
                )
                new_tokens = out[:, enc.input_ids.shape[1] :].tolist()
                for p, toks in zip(chunk, new_tokens):
                    stopped = eos in toks
                    toks = toks[: toks.index(eos)] if stopped else toks
                    text = tokenizer.decode(toks, skip_special_tokens=False)
                    total += task.reward(p, text, stopped)
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return total / max(1, n)


Progress = Callable[[dict], None]


class LogProgress:
    """Default cold-start progress: log lines (start, every `every_s` seconds, end) with step, loss and ETA.

    Events, as dicts with an "event" key: `wait` (another process holds the build lock: `lock`),
    `start` (`steps`, `threads`), `step` (`step`, `steps`, `loss`, `elapsed_s`), `done` (`seconds`, `final_loss`).
    """

    def __init__(self, every_s: float = 10.0, log: Callable[[str], None] | None = None) -> None:
        self.every_s = every_s
        self.log = log or logging.getLogger(__name__).info
        self._next = 0.0

    def __call__(self, e: dict) -> None:
        kind = e["event"]
        if kind == "wait":
            self.log(f"cold start: another process is building this model; waiting for {e['lock']}")
        elif kind == "start":
            self.log(f"cold start: {e['steps']} SFT steps with {e['threads']} torch thread(s)")
            self._next = self.every_s
        elif kind == "step" and (e["elapsed_s"] >= self._next or e["step"] == e["steps"]):
            eta = e["elapsed_s"] / e["step"] * (e["steps"] - e["step"])
            self.log(f"cold start: step {e['step']}/{e['steps']} loss {e['loss']:.3f} "
                     f"elapsed {e['elapsed_s']:.0f}s ETA {eta:.0f}s")
            self._next = e["elapsed_s"] + self.every_s
        elif kind == "done":
            self.log(f"cold start: done in {e['seconds']:.1f}s, final loss {e['final_loss']:.3f}")


def prepare_embedded_model(
    cache_dir: Path,
    spec: EmbeddedModelSpec | None = None,
    *,
    task: SftTask | None = None,
    steps: int = DEFAULT_STEPS,
    label_noise: float = DEFAULT_LABEL_NOISE,
    lr: float = 2e-3,
    betas: tuple[float, float] = COLD_START_BETAS,
    warmup_steps: int = COLD_START_WARMUP_STEPS,
    final_lr_ratio: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    threads: int = 0,
    progress: Progress | None = None,
    chat_template: str = "false",
    system_prompt: str | None = None,
) -> Path:
    """Directory of the cold-started embedded model, built once per distinct setting.

    Builders of one setting take turns on an exclusive lock file (`.embedded-<key>.lock`, fcntl.flock,
    released by the kernel however the holder dies): the first builds, the others wait and then find
    the model. The build happens in a temp dir that is renamed into place, so a model directory is
    always complete; a temp dir found while holding the lock was left by a killed builder and is removed.

    `threads`: torch threads during the build (0 = as many as the machine has free now, see
    areal_py.threads); the caller's setting is restored afterwards. `progress` receives the events
    described in `LogProgress` (the default).
    """
    spec = spec or EmbeddedModelSpec()
    task = task or ArithTask(seed=seed)
    progress = progress or LogProgress()
    settings = EmbeddedSettings(
        spec=spec.to_dict(),
        task=task_identity(task) | prompt_format(chat_template, system_prompt),
        steps=steps,
        label_noise=label_noise,
        lr=lr,
        betas=tuple(betas),
        warmup_steps=warmup_steps,
        batch_size=batch_size,
        seed=seed,
        final_lr_ratio=final_lr_ratio,
    )
    cache_dir = Path(cache_dir)
    final = cache_dir / settings.dir_name()
    if (final / "config.json").is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    lock_path = cache_dir / f".{final.name}.lock"
    with lock_path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress({"event": "wait", "lock": str(lock_path)})
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "config.json").is_file():  # built while we waited
            return final
        for stale in cache_dir.glob(f".{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        _build(final, settings, spec, task, threads or auto_threads(1), progress, chat_template, system_prompt)
    return final


def _build(final: Path, settings: EmbeddedSettings, spec: EmbeddedModelSpec, task: SftTask, threads: int,
           progress: Progress, chat_template: str = "false", system_prompt: str | None = None) -> None:
    """Create, cold-start and save the model in a temp dir next to `final`, then rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    old_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        create_embedded_model(tmp, spec)
        model, tokenizer = load_model_and_tokenizer(tmp)
        progress({"event": "start", "steps": settings.steps, "threads": threads})
        t0 = time.perf_counter()
        stats = cold_start(
            model,
            tokenizer,
            task,
            steps=settings.steps,
            batch_size=settings.batch_size,
            lr=settings.lr,
            betas=settings.betas,
            warmup_steps=settings.warmup_steps,
            final_lr_ratio=settings.final_lr_ratio,
            label_noise=settings.label_noise,
            seed=settings.seed,
            chat_template=chat_template,
            system_prompt=system_prompt,
            on_step=lambda i, loss: progress({"event": "step", "step": i, "steps": settings.steps, "loss": loss,
                                              "elapsed_s": time.perf_counter() - t0}),
        )
        progress({"event": "done", "seconds": stats["seconds"], "final_loss": stats["final_loss"]})
        stats["threads"] = threads
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = {"settings": settings.__dict__, "cold_start": stats}
        (tmp / "cold_start.json").write_text(json.dumps(meta, indent=2, default=list))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(old_threads)
