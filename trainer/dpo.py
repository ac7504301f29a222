"""Offline preference optimisation (`areal-py dpo`): DPO, IPO or conservative DPO against a frozen reference.

The reference is the start model (model.path or the embedded model). It never changes, so its sequence
log-probabilities of every pair are computed once, before training (and again from the start model on
``--resume``), and no second copy of the weights is held while training. Each optimiser step takes
``dpo.batch_size`` pairs; a micro-batch runs the chosen and rejected rows of its pairs in one forward, and
its mean loss is weighted by its share of the batch's pairs, so the step's gradient is that of the batch mean.

Before training and after every epoch the held-out pairs are scored (loss, implicit reward margin, preference
accuracy) and, with synthetic data, the policy's sampled accuracy on held-out prompts is measured with plain
HF generate (trainer.cold_start.evaluate). The losses: trainer/algo/preference_loss.py.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from areal_py.config import Config
from areal_py.models import eos_token_id, load_model_and_tokenizer
from areal_py.tasks.preference_pairs import PreferencePair, read_pairs, synthetic_pairs, write_pairs
from areal_py.tasks.prompt_render import render_prompt
from trainer.algo.preference_loss import (
    EMPTY_STATS,
    PreferenceStats,
    check_settings,
    logratio_margin,
    preference_loss,
    preference_stats,
)
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

log = logging.getLogger("trainer.dpo")


def tokenize_pairs(tokenizer, pairs: list[PreferencePair], cfg: Config, context: int | None,
                   what: str) -> list[tuple[Row, Row]]:
    """(chosen row, rejected row) per pair: the prompt rendered as the controller renders it (task.chat_template,
    task.system_prompt), the response's tokens and EOS. A pair longer than the model's context is an error naming
    how many and the first (nothing is dropped silently)."""
    eos = eos_token_id(tokenizer)
    out, too_long = [], []
    for i, p in enumerate(pairs):
        prompt = render_prompt(tokenizer, p.as_prompt(i), cfg.task.chat_template, cfg.task.system_prompt)
        rows = tuple(Row(prompt + tokenizer(r, add_special_tokens=False).input_ids + [eos], len(prompt))
                     for r in (p.chosen, p.rejected))
        if context is not None and max(len(r.ids) for r in rows) > context:
            too_long.append(i)
        out.append(rows)
    if too_long:
        raise ValueError(f"{len(too_long)} {what} pair(s) are longer than the model's context of {context} tokens "
                         f"(the first: pair {too_long[0]}, {pairs[too_long[0]].prompt[:60]!r}); shorten them or "
                         "use a model with a longer context")
    return out


def _pair_rows(pairs: list[tuple[Row, Row]], idx: list[int]) -> list[Row]:
    return [pairs[i][0] for i in idx] + [pairs[i][1] for i in idx]


def _micro(pairs: list[tuple[Row, Row]], idx: list[int], max_tokens: int) -> list[list[int]]:
    """Pair indices of `idx` in micro-batches whose chosen + rejected rows fit max_tokens (2 rows per pair)."""
    lengths = [2 * max(len(pairs[i][0].ids), len(pairs[i][1].ids)) for i in idx]
    return [[idx[j] for j in mb] for mb in micro_batches(lengths, max_tokens)]


@torch.no_grad()
def sequence_logprobs(model: torch.nn.Module, pairs: list[tuple[Row, Row]], pad: int,
                      max_tokens: int) -> torch.Tensor:
    """``[n, 2]``: log π(chosen | prompt), log π(rejected | prompt) of every pair under `model`, no graph."""
    out = torch.empty((len(pairs), 2), dtype=torch.float32)
    for mb in _micro(pairs, list(range(len(pairs))), max_tokens):
        lp = response_logprobs(model, _pair_rows(pairs, mb), pad).float().cpu()
        out[mb, 0], out[mb, 1] = lp[: len(mb)], lp[len(mb):]
    return out


def evaluate_pairs(model: torch.nn.Module, pairs: list[tuple[Row, Row]], ref: torch.Tensor, cfg: Config,
                   pad: int) -> PreferenceStats:
    """Loss, implicit rewards, margin and accuracy of the policy on `pairs` (``ref``: their reference logprobs)."""
    c = cfg.dpo
    if not pairs:
        return EMPTY_STATS
    pi = sequence_logprobs(model, pairs, pad, c.max_tokens_per_micro_batch)
    h = logratio_margin(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1])
    return preference_stats(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1],
                            preference_loss(h, c.loss, c.beta, c.label_smoothing), c.beta)


def train_dpo(cfg: Config, model_dir: Path, resume: bool = False, progress: Progress | None = None) -> dict:
    """Train the policy in ``model_dir`` by ``cfg.dpo`` into ``cfg.run_dir()``; returns the summary (also the
    ``done`` event): first and last held-out stats and sampled accuracy, steps, the final directory."""
    c = cfg.dpo
    check_settings(c.loss, c.beta, c.label_smoothing)
    progress = progress or (lambda e: None)
    data = load_run_data(cfg, "dpo", synthetic_pairs, read_pairs, write_pairs, resume)
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype=cfg.model.dtype)
    context = getattr(model.config, "max_position_embeddings", None)
    pad = pad_id(tokenizer)
    train = tokenize_pairs(tokenizer, data.train, cfg, context, "training")
    held = tokenize_pairs(tokenizer, data.held, cfg, context, "held-out")
    # the reference: the start model, before any update (or any checkpoint is loaded)
    ref_train = sequence_logprobs(model, train, pad, c.max_tokens_per_micro_batch)
    ref_held = sequence_logprobs(model, held, pad, c.max_tokens_per_micro_batch)

    def held_out() -> dict:
        return {**{f"eval_{k}": v for k, v in evaluate_pairs(model, held, ref_held, cfg, pad).means().items()},
                **sampled_accuracy(model, tokenizer, cfg, c, data)}

    def train_step(idx: list[int]) -> dict:
        stats, tokens = EMPTY_STATS, 0
        for mb in _micro(train, idx, c.max_tokens_per_micro_batch):
            rows = _pair_rows(train, mb)
            lp = response_logprobs(model, rows, pad)
            pi_c, pi_r = lp[: len(mb)], lp[len(mb):]
            ref = ref_train[mb].to(lp.device)
            losses = preference_loss(logratio_margin(pi_c, pi_r, ref[:, 0], ref[:, 1]), c.loss, c.beta,
                                     c.label_smoothing)
            (losses.sum() / len(idx)).backward()  # the batch mean, accumulated over micro-batches
            stats = stats + preference_stats(pi_c.detach(), pi_r.detach(), ref[:, 0], ref[:, 1], losses.detach(),
                                             c.beta)
            tokens += sum(len(r.ids) for r in rows)
        return {**stats.means(), "tokens": tokens}

    summary = train_to_final(cfg, c, model, tokenizer, data, train_step, held_out, progress, resume,
                             {"train_pairs": len(train), "eval_pairs": len(held)})
    if resume:
        log.info("resumed: %d steps in all", summary["steps"])
    return summary
