"""Reward-model training (`areal-py rm`): a Bradley-Terry model of preference pairs.

The model is the start model (model.path or the embedded model) loaded as a one-output sequence classifier
(``areal_py.rewards.reward_model.load_reward_model``: a causal LM gets a fresh score head, seeded by the run's
seed). Its reward of a response is the logit of the plain text ``prompt + response``, scored by
``score_texts`` exactly as the ``reward_model`` reward function scores RL samples, so the trained directory is
``reward.reward_model_path`` as it is. Under Bradley-Terry ``P(chosen ≻ rejected) = σ(r_c - r_r)``, and a step
minimises the batch mean of ``-log σ(r_c - r_r)`` (``bradley_terry_loss``); a micro-batch scores the chosen and
rejected texts of its pairs in one forward and adds its pairs' share of that mean.

Held-out statistics each epoch: the loss, the pairwise accuracy (the share of pairs with ``r_c > r_r``; a tie
counts as wrong) and the mean margin ``r_c - r_r``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from areal_py.config import Config
from areal_py.rewards.reward_model import load_reward_model, score_texts
from areal_py.tasks.preference_pairs import PreferencePair, read_pairs, synthetic_pairs, write_pairs
from trainer.offline import Progress, load_run_data, micro_batches, train_to_final


@dataclass(frozen=True)
class PairStats:
    """Sums over pairs of the BT loss, correct rankings, margins and rewards; ``means()`` divides by ``n``."""

    n: int = 0
    loss: float = 0.0
    correct: float = 0.0
    margin: float = 0.0
    chosen: float = 0.0
    rejected: float = 0.0

    @classmethod
    def of(cls, r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> PairStats:
        m = (r_chosen - r_rejected).detach().double()
        return cls(len(m), float(F.softplus(-m).sum()), float((m > 0).sum()), float(m.sum()),
                   float(r_chosen.detach().double().sum()), float(r_rejected.detach().double().sum()))

    def __add__(self, o: PairStats) -> PairStats:
        return PairStats(self.n + o.n, self.loss + o.loss, self.correct + o.correct, self.margin + o.margin,
                         self.chosen + o.chosen, self.rejected + o.rejected)

    def means(self) -> dict[str, float]:
        d = max(self.n, 1)
        return {"loss": self.loss / d, "accuracy": self.correct / d, "margin": self.margin / d,
                "reward_chosen": self.chosen / d, "reward_rejected": self.rejected / d}


def pair_texts(pairs: list[PreferencePair]) -> list[tuple[str, str]]:
    """(prompt + chosen, prompt + rejected) per pair: the texts the reward function will score."""
    return [(p.prompt + p.chosen, p.prompt + p.rejected) for p in pairs]


def _micro(lengths: list[tuple[int, int]], idx: list[int], max_tokens: int) -> list[list[int]]:
    """Pair indices of `idx` in micro-batches whose two texts per pair (token counts `lengths`) fit max_tokens."""
    return [[idx[j] for j in mb] for mb in micro_batches([2 * max(lengths[i]) for i in idx], max_tokens)]


def score_pairs(model: torch.nn.Module, tokenizer, texts: list[tuple[str, str]], idx: list[int],
                max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected) of the pairs `idx`, both in one forward (with the graph when grad is on)."""
    r = score_texts(model, tokenizer, [texts[i][0] for i in idx] + [texts[i][1] for i in idx], max_length)
    return r[: len(idx)], r[len(idx):]


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, tokenizer, texts: list[tuple[str, str]], lengths: list[tuple[int, int]],
                   max_length: int, max_tokens: int) -> PairStats:
    stats = PairStats()
    for mb in _micro(lengths, list(range(len(texts))), max_tokens):
        stats = stats + PairStats.of(*score_pairs(model, tokenizer, texts, mb, max_length))
    return stats


def train_rm(cfg: Config, model_dir: Path, resume: bool = False, progress: Progress | None = None) -> dict:
    """Train a reward model from ``model_dir`` by ``cfg.rm`` into ``cfg.run_dir()``; returns the summary (also the
    ``done`` event): first and last held-out records, steps, the final directory."""
    c = cfg.rm
    progress = progress or (lambda e: None)
    data = load_run_data(cfg, "rm", synthetic_pairs, read_pairs, write_pairs, resume)
    torch.manual_seed(data.seed)  # the score head's initialisation
    model, tokenizer = load_reward_model(model_dir)
    train, held = pair_texts(data.train), pair_texts(data.held)

    def lengths(texts: list[tuple[str, str]]) -> list[tuple[int, int]]:
        enc = tokenizer([t for pair in texts for t in pair], truncation=True, max_length=c.max_length).input_ids
        return [(len(enc[2 * i]), len(enc[2 * i + 1])) for i in range(len(texts))]

    train_len, held_len = lengths(train), lengths(held)

    def held_out() -> dict:
        s = evaluate_pairs(model, tokenizer, held, held_len, c.max_length, c.max_tokens_per_micro_batch).means()
        return {f"eval_{k}": v for k, v in s.items()}

    def train_step(idx: list[int]) -> dict:
        stats = PairStats()
        for mb in _micro(train_len, idx, c.max_tokens_per_micro_batch):
            r_c, r_r = score_pairs(model, tokenizer, train, mb, c.max_length)
            (F.softplus(r_r - r_c).sum() / len(idx)).backward()  # the batch mean of -log σ(r_c - r_r)
            stats = stats + PairStats.of(r_c, r_r)
        return {**stats.means(), "tokens": sum(sum(train_len[i]) for i in idx)}

    return train_to_final(cfg, c, model, tokenizer, data, train_step, held_out, progress, resume,
                          {"train_pairs": len(train), "eval_pairs": len(held)})
