"""Cold start: SFT lowers the loss; the prepared model is cached and shared."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import itertools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import trainer.cold_start as cold_start_module
from areal_py.models import (
    EmbeddedModelSpec,
    create_embedded_model,
    load_model_and_tokenizer,
)
from areal_py.tasks.arith import ArithTask
from trainer.cold_start import LogProgress, cold_start, evaluate, lr_factor, prepare_embedded_model

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


class _EvenLength(ArithTask):
    """Rewards responses of even length: a score an untrained model gets about half of, so an
    equality between two evaluations is not the trivial 0 == 0."""

    def reward(self, prompt, response_text: str, stopped: bool) -> float:
        return float(len(response_text) % 2 == 0)


def test_evaluate_on_a_given_prompt_list_matches_the_index_range(small_model) -> None:
    model, tok = small_model
    task = _EvenLength()
    by_index = evaluate(model, tok, task, n=24, seed=3, start_index=7, batch_size=8)
    by_list = evaluate(model, tok, task, seed=3, batch_size=8, prompts=[task.prompt(7 + i) for i in range(24)])
    assert by_index == by_list and 0.0 < by_index < 1.0
    assert evaluate(model, tok, task, prompts=[]) == 0.0


@pytest.fixture()
def builds(monkeypatch) -> list[Path]:
    """Counts real builds: the directory of every model `create_embedded_model` writes."""
    made: list[Path] = []

    def counting(path, spec):
        made.append(Path(path))
        return create_embedded_model(path, spec)

    monkeypatch.setattr(cold_start_module, "create_embedded_model", counting)
    return made


def _leftovers(cache: Path) -> list[str]:
    """Everything in a cache dir but finished models and lock files (i.e. temp dirs)."""
    return [p.name for p in cache.iterdir() if not p.name.startswith("embedded-") and not p.name.endswith(".lock")]


def test_prepare_embedded_model_caches(tmp_path: Path, builds) -> None:
    kwargs = dict(steps=3, batch_size=8, warmup_steps=1)
    first = prepare_embedded_model(tmp_path, SMALL, **kwargs)
    assert (first / "model.safetensors").is_file() and (first / "cold_start.json").is_file()
    assert prepare_embedded_model(tmp_path, SMALL, **kwargs) == first
    assert len(builds) == 1  # the second call reused the cache
    other = prepare_embedded_model(tmp_path, SMALL, **{**kwargs, "label_noise": 0.5})
    assert other != first and len(builds) == 2
    _, tok = load_model_and_tokenizer(first)
    assert tok.decode(tok("1 + 2").input_ids, skip_special_tokens=True) == "1 + 2"


def test_prepare_embedded_model_concurrent_calls_build_once(tmp_path: Path, builds) -> None:
    """Concurrent builders of one setting wait on the lock instead of each doing the work."""
    kwargs = dict(steps=2, batch_size=8, warmup_steps=1, seed=7)
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: prepare_embedded_model(tmp_path, SMALL, **kwargs), range(3)))
    assert paths[0] == paths[1] == paths[2]
    assert len(builds) == 1
    assert _leftovers(tmp_path) == []  # no temp dirs left


def test_a_killed_builders_temp_dir_is_removed_by_the_next_build(tmp_path: Path, builds) -> None:
    kwargs = dict(steps=1, batch_size=8, warmup_steps=1, seed=3)
    probe = prepare_embedded_model(tmp_path / "probe", SMALL, **kwargs)  # learn the key's directory name
    cache = tmp_path / "cache"
    stale = cache / f".{probe.name}-abandoned"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # half-written model of a builder that was SIGKILLed
    assert prepare_embedded_model(cache, SMALL, **kwargs).name == probe.name
    assert len(builds) == 2 and _leftovers(cache) == []


def test_a_failed_build_leaves_no_temp_dir_and_restores_threads(tmp_path: Path, monkeypatch) -> None:
    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(cold_start_module, "cold_start", boom)
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        prepare_embedded_model(tmp_path, SMALL, steps=1, batch_size=8, threads=threads + 1)
    assert _leftovers(tmp_path) == [] and torch.get_num_threads() == threads


def test_progress_reports_every_step_with_the_thread_count(tmp_path: Path) -> None:
    events: list[dict] = []
    prepare_embedded_model(tmp_path, SMALL, steps=3, batch_size=8, warmup_steps=1, threads=1, progress=events.append)
    kinds = [e["event"] for e in events]
    assert kinds == ["start", "step", "step", "step", "done"]
    assert events[0] == {"event": "start", "steps": 3, "threads": 1}
    assert [e["step"] for e in events[1:4]] == [1, 2, 3]
    lines: list[str] = []
    log = LogProgress(every_s=0.0, log=lines.append)
    for e in events:
        log(e)
    assert lines[0] == "cold start: 3 SFT steps with 1 torch thread(s)"
    assert lines[-2].startswith("cold start: step 3/3 loss ") and "ETA 0s" in lines[-2]
    assert lines[-1].startswith("cold start: done in ")


def test_cold_start_seed_shares_one_starting_model_across_run_seeds(tmp_path: Path) -> None:
    """cold_start.seed fixed: RL runs of different run.seed start from the same cached model."""
    from areal_py.app.model_dir import prepare_model
    from areal_py.config import load_config

    tiny = [f"model.cache_dir={tmp_path}", "cold_start.steps=0", "model.embedded.hidden_size=32",
            "model.embedded.num_layers=1", "model.embedded.num_heads=2", "model.embedded.intermediate_size=64"]
    shared = {prepare_model(load_config(None, [*tiny, f"run.seed={s}", "cold_start.seed=7"])) for s in (0, 1)}
    own = {prepare_model(load_config(None, [*tiny, f"run.seed={s}"])) for s in (0, 1)}
    assert len(shared) == 1 and len(own) == 2 and not shared & own


def test_lr_factor_warms_up_then_decays_to_the_final_ratio() -> None:
    """Hand-computed for 10 steps, warm-up 2, r = 0.1: 0.5, 1.0, ..., mid-way 0.1 + 0.9/2, last 0.1."""
    f = [lr_factor(s, 10, 2, 0.1) for s in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[5] == pytest.approx(0.55) and f[9] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(f[1:]))  # monotone after warm-up
    assert [lr_factor(s, 10, 2, 1.0) for s in range(10)] == [0.5] + [1.0] * 9  # r = 1: the old constant lr
