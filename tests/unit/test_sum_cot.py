"""sum_cot: format, reward edge cases, the long tail, the cold start on it, config checks."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import random
import statistics
from pathlib import Path

import pytest
import torch

from areal_py.config import ConfigError, load_config
from areal_py.model_dir import embedded_model_request
from areal_py.models import (
    EmbeddedModelSpec,
    create_embedded_model,
    load_model_and_tokenizer,
)
from areal_py.rewards.functions import task_from_recipe, task_recipe
from areal_py.tasks.base import SftTask, build_task
from areal_py.tasks.sum_cot import SumCotConfig, SumCotTask, max_response_chars, num_terms, response_for
from trainer.cold_start import _padded, _sft_rows, cold_start, task_identity
from trainer.micro_batching import pack_by_padded_tokens

ROOT = Path(__file__).resolve().parents[2]


def test_reference_response_writes_partial_sums_then_answer() -> None:
    assert response_for([3, 5, 2, 7]) == "3,8,10,17;17"
    assert response_for([0]) == "0;0"
    assert max_response_chars(2) == len("9,18;18")


def test_prompt_is_deterministic_and_answer_is_the_sum() -> None:
    task = SumCotTask(seed=3)
    p = task.prompt(11)
    assert p == SumCotTask(seed=3).prompt(11)
    terms = [int(x) for x in p.text.rstrip("=").split("+")]
    assert p.answer == str(sum(terms)) and 3 <= len(terms) <= 120
    assert SumCotTask(seed=4).prompt(11) != p or SumCotTask(seed=4).prompt(12) != task.prompt(12)


@pytest.mark.parametrize(("text", "stopped", "expected"), [
    ("3,8,10,17;17", True, 1.0),
    ("3,8,11,18;17", True, 1.0),   # only the final answer is graded
    ("3,8,10,17;17", False, 0.0),  # truncated: no EOS
    ("3,8,10,17;16", True, 0.0),
    ("3,8,10,17", True, 0.0),      # no answer separator
    ("", True, 0.0),               # zero-length response
    ("1;2;17", True, 1.0),         # the last separator wins
])
def test_reward(text: str, stopped: bool, expected: float) -> None:
    task = SumCotTask()
    prompt = task.prompt(0)
    prompt = type(prompt)(index=0, text="3+5+2+7=", answer="17")
    assert task.reward(prompt, text, stopped) == expected


def test_lengths_are_long_tailed() -> None:
    """Most responses are short, a few are near the cap: the shape the async benchmark relies on."""
    task = SumCotTask()
    lengths = sorted(len(response_for([int(x) for x in task.prompt(i).text.rstrip("=").split("+")]))
                     for i in range(4000))
    median, p99 = lengths[len(lengths) // 2], lengths[int(0.99 * len(lengths))]
    assert lengths[0] >= 7 and median < 30 and p99 > 300 and lengths[-1] <= max_response_chars(120)
    assert statistics.fmean(lengths) > 1.5 * median  # mean pulled up by the tail


def test_sft_examples_with_noise_stay_consistent() -> None:
    task = SumCotTask(max_terms=20)
    rng = random.Random(0)
    wrong = 0
    for _ in range(400):
        prompt, target = task.sft_example(rng, label_noise=0.5)
        terms = [int(x) for x in prompt.rstrip("=").split("+")]
        sums = [int(x) for x in target.split(";")[0].split(",")]
        assert len(sums) == len(terms)
        assert target.split(";")[1] == str(sums[-1])  # noisy or not, the answer is the last partial sum
        wrong += sums[-1] != sum(terms)
    assert 150 < wrong < 250  # about half corrupted (a changed digit always changes the sum)
    clean = [task.sft_example(rng, 0.0) for _ in range(50)]
    assert all(t.split(";")[1] == str(sum(int(x) for x in p.rstrip("=").split("+"))) for p, t in clean)


def test_num_terms_follows_the_truncated_pareto_law() -> None:
    """P(k >= x) = (min_terms / x) ** alpha below the cut; all the mass above max_terms sits at max_terms."""
    rng = random.Random(0)
    ks = [num_terms(rng, 3, 12, 0.5) for _ in range(20_000)]
    assert min(ks) == 3 and max(ks) == 12
    for x, expected in ((3, 1.0), (4, (3 / 4) ** 0.5), (6, (3 / 6) ** 0.5), (12, (3 / 12) ** 0.5)):
        assert abs(sum(k >= x for k in ks) / len(ks) - expected) < 0.015, x
    assert num_terms(random.Random(1), 5, 5, 1.1) == 5


def test_cold_start_data_can_be_shorter_than_the_rl_prompts() -> None:
    """sft_max_terms / sft_alpha shape only the cold-start examples; the RL prompts keep the long tail."""
    task = SumCotTask(max_terms=120, sft_max_terms=12, sft_alpha=0.5)
    rng = random.Random(0)
    sft_k = [len(task.sft_example(rng, 0.0)[0].rstrip("=").split("+")) for _ in range(2000)]
    assert max(sft_k) == 12 and 0.4 < sum(k == 12 for k in sft_k) / len(sft_k) < 0.6  # (3/12)^0.5 = 0.5
    rl_k = [len(task.terms(i)) for i in range(2000)]
    assert max(rl_k) > 60
    assert SumCotTask(max_terms=20).sft_max_terms == 20  # default: the RL distribution
    with pytest.raises(ValueError, match="sft_max_terms"):
        SumCotTask(min_terms=3, sft_max_terms=2)
    with pytest.raises(ValueError, match="sft_alpha"):
        SumCotTask(sft_alpha=0.0)


def test_build_task_and_protocol() -> None:
    task = build_task(SumCotConfig(min_terms=2, max_terms=5, tail_alpha=2.0), seed=1)
    assert isinstance(task, SftTask) and (task.max_terms, task.alpha, task.seed) == (5, 2.0, 1)
    with pytest.raises(ValueError, match="min_terms"):
        SumCotTask(min_terms=6, max_terms=5)
    with pytest.raises(ConfigError, match="allowed"):
        load_config(None, ["task.name=nope"])


def test_reward_workers_rebuild_the_cold_start_settings_too() -> None:
    """The worker's task came from a recipe that once dropped sft_max_terms / sft_alpha."""
    task = SumCotTask(max_terms=20, alpha=1.5, sft_max_terms=12, sft_alpha=0.5, seed=2)
    again = task_from_recipe(task_recipe(task))
    assert task_identity(again) == task_identity(task)
    assert (again.sft_max_terms, again.sft_alpha) == (12, 0.5)
    default = task_from_recipe(task_recipe(SumCotTask(max_terms=20)))
    assert (default.sft_max_terms, default.sft_alpha) == (20, 1.1)


def test_sum_cot_yaml_cache_key_is_unchanged() -> None:
    """The embedded model's cache directory is named by this key: a change orphans the cached model."""
    settings = embedded_model_request(load_config(str(ROOT / "configs/sum_cot.yaml"))).settings
    assert settings.task == {"name": "sum_cot", "min_terms": 3, "max_terms": 120, "alpha": 1.1, "seed": 0,
                             "sft_max_terms": 12, "sft_alpha": 0.5}
    assert settings.key() == "b9f62350c5641b77"


def test_task_keys_of_another_task_name_the_task_and_its_keys() -> None:
    cfg = load_config(None, ["task.name=sum_cot", "task.max_terms=40", "rollout.max_new_tokens=200",
                             "model.embedded.max_position_embeddings=300"])
    assert (cfg.task.name, cfg.task.max_terms) == ("sum_cot", 40)
    with pytest.raises(ConfigError, match=r"unknown key 'task.max_terms' for task.name=arith \(the default\); "
                                          r"allowed here: name, chat_template, system_prompt, max_bad_fraction, min_operand, "
                                          r"max_operand"):
        load_config(None, ["task.max_terms=40"])
    with pytest.raises(ConfigError, match=r"unknown key 'task.min_operand' for task.name=sum_cot; allowed here: "
                                          r"name, chat_template, system_prompt, max_bad_fraction, min_terms, max_terms, tail_alpha, "
                                          r"sft_max_terms, sft_tail_alpha"):
        load_config(str(ROOT / "configs/sum_cot.yaml"), ["task.min_operand=1"])


def test_config_rejects_lengths_that_cannot_hold_the_longest_answer() -> None:
    cfg = load_config(str(ROOT / "configs/sum_cot.yaml"))
    assert cfg.task.name == "sum_cot"
    with pytest.raises(ConfigError, match="rollout.max_new_tokens"):
        load_config(str(ROOT / "configs/sum_cot.yaml"), ["rollout.max_new_tokens=100"])
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        load_config(str(ROOT / "configs/sum_cot.yaml"), ["model.embedded.max_position_embeddings=300"])
    with pytest.raises(ConfigError, match="task.name"):
        load_config(None, ["task.name=sums"])
    with pytest.raises(ConfigError, match="task.sft_max_terms=200"):
        load_config(str(ROOT / "configs/sum_cot.yaml"), ["task.sft_max_terms=200"])


def test_cold_start_distribution_reaches_the_task_and_the_cache_key() -> None:
    """A different cold-start distribution must build a different cached model, not reuse the old one."""
    base = load_config(str(ROOT / "configs/sum_cot.yaml"), ["task.sft_max_terms=0", "task.sft_tail_alpha=0"])
    short = load_config(str(ROOT / "configs/sum_cot.yaml"), ["task.sft_max_terms=12", "task.sft_tail_alpha=0.5"])
    t_base, t_short = build_task(base), build_task(short)
    assert (t_base.sft_max_terms, t_base.sft_alpha) == (base.task.max_terms, base.task.tail_alpha)
    assert (t_short.sft_max_terms, t_short.sft_alpha) == (12, 0.5)
    assert task_identity(t_base) != task_identity(t_short)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    spec = EmbeddedModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=128,
                             max_position_embeddings=128)
    return load_model_and_tokenizer(create_embedded_model(tmp_path_factory.mktemp("m"), spec))


def test_length_sorted_micro_batches_give_the_full_batch_loss(small_model) -> None:
    """Cold-start micro-batching is only a memory/padding trick: the loss is the same token mean."""
    model, tok = small_model
    rows = _sft_rows(tok, SumCotTask(max_terms=15), random.Random(0), 12, 0.0)
    full = model(**_padded(rows, tok.pad_token_id)).loss
    n = sum(sum(1 for x in lab if x != -100) for _, lab in rows)
    parts = [[rows[i] for i in idx] for idx in pack_by_padded_tokens([len(r[0]) for r in rows], 100)]
    assert len(parts) > 2 and sorted(map(len, [r[0] for mb in parts for r in mb])) == sorted(len(r[0]) for r in rows)
    assert all(len(mb) * max(len(r[0]) for r in mb) <= 100 or len(mb) == 1 for mb in parts)
    acc = sum(model(**_padded(mb, tok.pad_token_id)).loss * sum(sum(1 for x in lab if x != -100) for _, lab in mb) / n
              for mb in parts)
    torch.testing.assert_close(acc, full, rtol=1e-5, atol=1e-6)


def test_cold_start_on_sum_cot_lowers_loss(small_model) -> None:
    model, tok = small_model
    stats = cold_start(model, tok, SumCotTask(max_terms=10), steps=15, batch_size=16, warmup_steps=3,
                       max_tokens_per_micro_batch=256)
    assert stats["final_loss"] < stats["first_loss"] - 0.5
