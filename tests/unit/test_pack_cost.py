"""The micro-batch cost model: the non-negative fit by hand, the probe shapes, the cache, the config."""
import json

import pytest
import torch
from tiny_models import tiny_model

from areal_py.config import load_config
from trainer import pack_cost as PC
from trainer.micro_batching import PackCost
from trainer.pack_cost import CostPoint, cached_cost, fit_cost, pack_cost_for, probe_shapes


def points_of(c: PackCost, shapes) -> list[CostPoint]:
    return [CostPoint(r, m, c.of(r, m)) for r, m in shapes]


def test_fit_recovers_exact_coefficients():
    c = PackCost(2e-3, 3e-7, 4e-10)
    fit = fit_cost(points_of(c, [(1, 8), (64, 32), (16, 128), (4, 512)]))
    assert fit.c0 == pytest.approx(c.c0, rel=1e-6)
    assert fit.c1 == pytest.approx(c.c1, rel=1e-6)
    assert fit.c2 == pytest.approx(c.c2, rel=1e-6)


def test_fit_keeps_every_coefficient_non_negative():
    # times that fall with maxlen at a fixed token count would need c2 < 0: the fit sets c2 = 0 and
    # explains the points by the other terms
    pts = [CostPoint(1, 8, 1e-3), CostPoint(64, 32, 2.0e-3), CostPoint(16, 128, 1.9e-3), CostPoint(4, 512, 1.8e-3)]
    fit = fit_cost(pts)
    assert fit.c2 == 0.0 and fit.c0 > 0 and fit.c1 >= 0
    # one point: a one-term fit through it
    one = fit_cost([CostPoint(2, 10, 5.0)])
    assert one.of(2, 10) == pytest.approx(5.0)


@pytest.mark.parametrize("pts", [[], [CostPoint(1, 8, 0.0)], [CostPoint(0, 8, 1.0)]])
def test_fit_rejects_bad_points(pts):
    with pytest.raises(ValueError):
        fit_cost(pts)


def test_probe_shapes_stay_within_budget_and_context():
    assert probe_shapes(8192, 768) == [(1, 8), (32, 32), (8, 128), (2, 512)]  # PROBE_TOKENS = 1024
    assert probe_shapes(8192, 64) == [(1, 8), (32, 32), (16, 64)]  # a short context caps the long rows
    assert probe_shapes(100, 768) == [(1, 8), (3, 32), (1, 100)]   # a small budget caps the probes
    for budget, ctx in ((16, 64), (1, 2), (10_000, 4096)):
        for rows, maxlen in probe_shapes(budget, ctx):
            assert rows >= 1 and 2 <= maxlen <= ctx and (rows * maxlen <= budget or rows == 1)
    with pytest.raises(ValueError):
        probe_shapes(0, 64)


def test_timing_leaves_no_gradients_and_the_rng_untouched():
    model = tiny_model()
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    pts = PC.time_shapes(model, [(1, 8), (4, 16)], reps=1)
    assert [(p.rows, p.maxlen) for p in pts] == [(1, 8), (4, 16)] and all(p.seconds > 0 for p in pts)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.rand(3), before)


def test_cost_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    calls = []

    def fake_time(model, shapes, reps=3):
        calls.append(shapes)
        return points_of(PackCost(1e-3, 1e-6, 1e-9), shapes)

    monkeypatch.setattr(PC, "time_shapes", fake_time)
    model = tiny_model()
    first, where1 = cached_cost(tmp_path, model, 8192, 64)
    second, where2 = cached_cost(tmp_path, model, 8192, 64)
    assert len(calls) == 1 and first == second
    assert where1.startswith("measured") and where2.startswith("cached")
    saved = json.loads(next((tmp_path / "pack_cost").glob("*.json")).read_text())
    assert saved["key"]["model"]["hidden_size"] == 32 and len(saved["points"]) == len(calls[0])
    assert saved["key"]["probe"] == PC.PROBE  # costs timed through another logprob path are not reused
    cached_cost(tmp_path, tiny_model(vocab_size=40), 8192, 64)  # another model shape: measured again
    assert len(calls) == 2


def test_pack_cost_for_follows_the_config(tmp_path, monkeypatch):
    model = tiny_model()
    assert pack_cost_for(load_config(None, ["trainer.max_tokens_per_micro_batch=64",
                                            "trainer.micro_batch_packing=padded"]), model) is None
    assert pack_cost_for(load_config(None, ["trainer.micro_batch_packing=cost"]), model) is None  # no budget
    cfg = load_config(None, ["trainer.max_tokens_per_micro_batch=64", "trainer.micro_batch_packing=cost",
                             "trainer.pack_cost=[0.5,0.25,0]"])
    assert pack_cost_for(cfg, model) == PackCost(0.5, 0.25, 0.0)
    monkeypatch.setattr(PC, "time_shapes", lambda model, shapes, reps=3: points_of(PackCost(1.0, 0.0, 0.0), shapes))
    cfg = load_config(None, ["trainer.max_tokens_per_micro_batch=64", "trainer.micro_batch_packing=cost",
                             f"model.cache_dir={tmp_path}"])
    assert pack_cost_for(cfg, model).c0 == pytest.approx(1.0)
    assert list((tmp_path / "pack_cost").glob("*.json"))
