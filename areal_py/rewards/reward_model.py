"""Reward-model rewards: a sequence-classification model (one output) scoring prompt + response.

:class:`RewardModelScorer` loads any Hugging Face ``AutoModelForSequenceClassification``
directory with ``num_labels=1`` (local files only) and scores texts in batches.
:class:`RewardModelReward` adapts it to the reward-function signature (with a batched path that
:class:`controller.reward_pool.RewardPool` workers use), and :func:`train_reward_model` fits one to
preference pairs with the Bradley-Terry loss.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from areal_py.tasks.base import Prompt


def load_reward_model(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, object]:
    """A one-output sequence-classification model and its tokenizer from a local directory, as the reward
    function loads it: a causal LM directory gets a fresh score head (seeded by torch's global RNG); a tokenizer
    without a pad token pads with EOS (the model scores the last non-pad token); long texts are cut from the left."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, local_files_only=True)
    if tokenizer.pad_token is None:  # decoder-only backbones: pad with EOS, the model finds the last real token
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # Long inputs lose their beginning, not the end of the response (where the answer is).
    tokenizer.truncation_side = "left"
    return model.to(device), tokenizer


class RewardModelScorer:
    """Scores texts with a one-output sequence-classification model from a local directory.

    ``score(texts)`` returns one float per text (the model's single logit), computed in batches
    of ``batch_size`` under ``torch.inference_mode``; inputs longer than ``max_length`` tokens
    are truncated from the left. ``num_threads`` (optional) sets torch's intra-op threads for
    the whole process, useful in a pool worker sharing cores with others.
    """

    def __init__(self, path: str | Path, device: str = "cpu", max_length: int = 512, batch_size: int = 16,
                 num_threads: int | None = None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.path = str(path)
        self.device = device
        self.max_length = max_length
        self.batch_size = batch_size
        self.model, self.tokenizer = load_reward_model(path, device)
        self.model.eval()

    @torch.inference_mode()
    def score(self, texts: Sequence[str]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            out.extend(score_texts(self.model, self.tokenizer, texts[start:start + self.batch_size],
                                   self.max_length).tolist())
        return out

    def score_pairs(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Scores of ``prompt + response`` (plain concatenation, as the model was trained)."""
        return self.score([p + r for p, r in zip(prompts, responses)])


class RewardModelReward:
    """The ``reward_model`` reward function: the scorer's value of ``prompt.text + response_text``."""

    def __init__(self, scorer: RewardModelScorer) -> None:
        self.scorer = scorer

    def __call__(self, prompt: Prompt, response_text: str, stopped: bool) -> float:
        return self.scorer.score_pairs([prompt.text], [response_text])[0]

    def batch(self, prompts: Sequence[Prompt], responses: Sequence[str], stopped: Sequence[bool]) -> list[float]:
        return self.scorer.score_pairs([p.text for p in prompts], responses)


def score_texts(model: torch.nn.Module, tokenizer, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """The model's single logit per text, float32 (with the graph when grad is on): the texts padded together,
    each cut to its last `max_length` tokens. Training and scoring both go through here, so what a reward model
    was trained on is exactly what it scores."""
    device = next(model.parameters()).device
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return model(**batch.to(device)).logits[:, 0].float()


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of ``-log σ(r_chosen - r_rejected)`` (``softplus(r_rejected - r_chosen)``)."""
    return F.softplus(r_rejected - r_chosen).mean()


def train_reward_model(base_path: str | Path, pairs: Sequence[tuple[str, str, str]], out_dir: str | Path,
                       steps: int = 100, lr: float = 5e-5, batch_size: int = 8, max_length: int = 512,
                       seed: int = 0, device: str = "cpu") -> list[float]:
    """Fit a reward model to preference pairs and save it as a Hugging Face directory.

    ``pairs``: ``(prompt, chosen, rejected)`` texts; the model scores ``prompt + chosen`` and
    ``prompt + rejected``. Under the Bradley-Terry model the probability that ``chosen`` is
    preferred is ``P(chosen ≻ rejected) = σ(r(x, y_c) - r(x, y_r))``, so maximum likelihood
    minimises

        L(φ) = -E_{(x, y_c, y_r)} [ log σ( r_φ(x, y_c) - r_φ(x, y_r) ) ]

    over mini-batches of ``batch_size`` pairs (each epoch a fresh shuffle seeded by ``seed``),
    with AdamW at ``lr`` and gradient-norm clipping at 1.0, for ``steps`` steps. The backbone is
    ``base_path`` (any sequence-classification-capable local directory; a missing one-output
    head is initialised from ``seed``). Saves model, config and tokenizer to ``out_dir`` (loadable
    by :class:`RewardModelScorer`) and returns the loss of every step.
    """
    if not pairs:
        raise ValueError("no preference pairs")
    torch.manual_seed(seed)
    model, tokenizer = load_reward_model(base_path, device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    order: list[int] = []
    losses: list[float] = []
    for _ in range(steps):
        batch_idx = []
        while len(batch_idx) < min(batch_size, len(pairs)):
            if not order:
                order = list(range(len(pairs)))
                rng.shuffle(order)
            batch_idx.append(order.pop())
        texts = [pairs[i][0] + pairs[i][1] for i in batch_idx] + [pairs[i][0] + pairs[i][2] for i in batch_idx]
        rewards = score_texts(model, tokenizer, texts, max_length)
        n = len(batch_idx)
        loss = bradley_terry_loss(rewards[:n], rewards[n:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return losses
