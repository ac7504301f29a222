"""Supervised fine-tuning (`areal-py sft`): next-token likelihood of the response after its prompt.

With ``n_b`` the response tokens (EOS included) of the records of batch ``b``, the loss of a step is the token
mean

    L = -(1 / n_b) * sum over the batch's records r of sum over r's response tokens t of log π(y_t | x, y_<t)

and the prompt tokens are never trained. A batch is cut into length-sorted micro-batches of at most
``sft.max_tokens_per_micro_batch`` padded tokens (trainer.micro_batching.pack_by_padded_tokens), each adding its
summed log-likelihood divided by the whole batch's ``n_b``, so the accumulated gradient is that of L whatever the
packing. The held-out loss is the same token mean over all held-out records.

The embedded model's cold start (trainer/cold_start.py) is a different loop on purpose: it draws fresh noisy
examples each step and its result is cached under a hash of its settings, which the benchmarks rest on; this
command trains a fixed data set in epochs with checkpoints. Both pack with the same micro-batcher and score with
the same rendering of prompts.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from areal_py.config import Config
from areal_py.models import eos_token_id, load_model_and_tokenizer
from areal_py.tasks.prompt_render import render_prompt
from areal_py.tasks.sft_records import SftExample, read_examples, synthetic_examples, write_examples
from trainer.offline import (
    Progress,
    Row,
    load_run_data,
    micro_batches,
    pad_id,
    response_logprobs,
    sampled_accuracy,
    train_to_final,
)

log = logging.getLogger("trainer.sft")


def tokenize_examples(tokenizer, examples: list[SftExample], cfg: Config, context: int | None,
                      what: str) -> list[Row]:
    """A row per example: the prompt rendered as the controller renders it (task.chat_template,
    task.system_prompt), then the response's tokens and EOS. One longer than the model's context is an error
    naming how many and the first (nothing is cut or dropped silently)."""
    eos = eos_token_id(tokenizer)
    rows, too_long = [], []
    for i, e in enumerate(examples):
        prompt = render_prompt(tokenizer, e.as_prompt(i), cfg.task.chat_template, cfg.task.system_prompt)
        row = Row(prompt + tokenizer(e.response, add_special_tokens=False).input_ids + [eos], len(prompt))
        if context is not None and len(row.ids) > context:
            too_long.append(i)
        rows.append(row)
    if too_long:
        raise ValueError(f"{len(too_long)} {what} record(s) are longer than the model's context of {context} tokens "
                         f"(the first: record {too_long[0]}, {examples[too_long[0]].prompt[:60]!r}); shorten them or "
                         "use a model with a longer context")
    return rows


def response_tokens(rows: list[Row]) -> int:
    """``n``: the response tokens (EOS included) of `rows`, the loss's normaliser."""
    return sum(len(r.ids) - r.prompt_len for r in rows)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, rows: list[Row], pad: int, max_tokens: int) -> float:
    """The token-mean negative log-likelihood of the responses of `rows` (NaN for none)."""
    if not rows:
        return math.nan
    total = 0.0
    for mb in micro_batches([len(r.ids) for r in rows], max_tokens):
        total -= float(response_logprobs(model, [rows[i] for i in mb], pad).double().sum())
    return total / response_tokens(rows)


def train_sft(cfg: Config, model_dir: Path, resume: bool = False, progress: Progress | None = None) -> dict:
    """Fine-tune the model in ``model_dir`` by ``cfg.sft`` into ``cfg.run_dir()``; returns the summary (also the
    ``done`` event): first and last held-out records, steps, the final directory."""
    c = cfg.sft
    progress = progress or (lambda e: None)
    data = load_run_data(cfg, "sft", lambda t, start, n, seed: synthetic_examples(t, start, n), read_examples,
                         write_examples, resume)
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype=cfg.model.dtype)
    context = getattr(model.config, "max_position_embeddings", None)
    pad = pad_id(tokenizer)
    train = tokenize_examples(tokenizer, data.train, cfg, context, "training")
    held = tokenize_examples(tokenizer, data.held, cfg, context, "held-out")

    def held_out() -> dict:
        return {"eval_loss": heldout_loss(model, held, pad, c.max_tokens_per_micro_batch),
                **sampled_accuracy(model, tokenizer, cfg, c, data)}

    def train_step(idx: list[int]) -> dict:
        rows = [train[i] for i in idx]
        n = response_tokens(rows)
        nll = 0.0
        for mb in micro_batches([len(r.ids) for r in rows], c.max_tokens_per_micro_batch):
            part = -response_logprobs(model, [rows[i] for i in mb], pad).sum() / n  # its share of the batch mean
            part.backward()
            nll += float(part.detach())
        return {"loss": nll, "response_tokens": n, "tokens": sum(len(r.ids) for r in rows)}

    return train_to_final(cfg, c, model, tokenizer, data, train_step, held_out, progress, resume,
                          {"train_records": len(train), "eval_records": len(held)})
