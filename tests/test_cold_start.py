"""Cold start: SFT lowers the loss; the prepared model is cached and shared."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from areal_py.cold_start import cold_start, evaluate, prepare_embedded_model
from areal_py.models import EmbeddedModelSpec, create_embedded_model, load_model_and_tokenizer
from areal_py.tasks import ArithTask

SMALL = EmbeddedModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                          intermediate_size=128)


@pytest.fixture()
def small_model(tmp_path: Path):
    return load_model_and_tokenizer(create_embedded_model(tmp_path / "m", SMALL))


def test_cold_start_lowers_loss(small_model) -> None:
    model, tok = small_model
    stats = cold_start(model, tok, ArithTask(), steps=20, batch_size=32, warmup_steps=5)
    assert stats["steps"] == 20 and stats["seconds"] > 0
    assert stats["final_loss"] < stats["first_loss"] - 0.5
    assert not model.training


def test_evaluate_is_seeded_and_bounded(small_model) -> None:
    model, tok = small_model
    task = ArithTask()
    a = evaluate(model, tok, task, n=32, temperature=1.0, seed=5)
    b = evaluate(model, tok, task, n=32, temperature=1.0, seed=5)
    assert a == b and 0.0 <= a <= 1.0
    assert 0.0 <= evaluate(model, tok, task, n=16, temperature=0.0) <= 1.0
    assert tok.padding_side == "left"


def test_prepare_embedded_model_caches(tmp_path: Path) -> None:
    kwargs = dict(steps=3, batch_size=8, warmup_steps=1)
    first = prepare_embedded_model(tmp_path, SMALL, **kwargs)
    assert (first / "model.safetensors").is_file() and (first / "cold_start.json").is_file()
    start = time.perf_counter()
    assert prepare_embedded_model(tmp_path, SMALL, **kwargs) == first
    assert time.perf_counter() - start < 0.5
    other = prepare_embedded_model(tmp_path, SMALL, **{**kwargs, "label_noise": 0.5})
    assert other != first
    model, tok = load_model_and_tokenizer(first)
    assert tok.decode(tok("1 + 2").input_ids, skip_special_tokens=True) == "1 + 2"


def test_prepare_embedded_model_concurrent_calls(tmp_path: Path) -> None:
    kwargs = dict(steps=2, batch_size=8, warmup_steps=1, seed=7)
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: prepare_embedded_model(tmp_path, SMALL, **kwargs), range(2)))
    assert paths[0] == paths[1]
    assert [p.name for p in tmp_path.iterdir()] == [paths[0].name]  # no temp dirs left
