"""The learner profile's attribution: forward ops by label and kind, backward ops to their forward's part."""
import torch
from tiny_models import tiny_model
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.learner_profile import breakdown, labelled


class Owner:
    @staticmethod
    def loss(x):
        return (x * x).sum()


def test_breakdown_charges_every_op_to_one_part_and_backward_to_its_forward():
    model = tiny_model()
    ids = torch.randint(0, 32, (2, 9))
    with labelled(Owner, "loss", "loss math"), profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("#model"):
            logits = model(input_ids=ids).logits
        Owner.loss(logits).backward()
    parts = breakdown(prof.events())
    assert Owner.loss.__name__ == "loss" and not hasattr(Owner.loss, "__wrapped__")  # restored on exit
    assert parts["model: linear GEMMs"] > 0 and parts["model: attention (SDPA)"] > 0
    assert parts["loss math"] > 0 and parts["model: Python (HF forward)"] > 0
    assert not any(k.startswith("backward: Mm") for k in parts)  # matmul backwards found their forward
    total = sum(e.self_cpu_time_total for e in prof.events()) / 1e6
    assert abs(sum(parts.values()) - total) < 1e-9  # each op's self time counted once


def test_compare_compile_reports_both_variants(monkeypatch):
    """--compare-compile's bookkeeping (torch.compile replaced by the identity so no compile runs): every round
    has both variants' CPU time, the ratio and the floor; the summary's medians come from those rounds."""
    import torch

    from benchmarks import learner_profile

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(learner_profile, "measure_cost", lambda model, budget, quick: (
        learner_profile.L.PackCost(0.02, 2e-4, 3e-7), [], 0.0))
    quick = learner_profile.measure_machine
    monkeypatch.setattr(learner_profile, "measure_machine", lambda t: quick(t, gemm_n=256, dram_bytes=4 << 20,
                                                                             repeats=1))
    rep = learner_profile.compare_compile(rounds=2, groups=1, warm_cache=False)
    assert rep["compile_status"].startswith("trainer.compile: on")
    rows = rep["per_round"]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["on"] > 0 and r["off"] > 0 and r["floor_s"] > 0
        assert r["eager_over_compiled"] == r["off"] / r["on"]
    s = rep["summary"]
    lo, hi = s["eager_over_compiled_range"]
    assert lo <= s["eager_over_compiled_median"] <= hi


def test_summarise_by_hand():
    """Steady medians leave out the round that compiled a new graph; its extra CPU time counts as compile."""
    from benchmarks.learner_profile import summarise

    rows = [{"off": 2.0, "on": 10.0, "floor_s": 1.0, "compiled_new_graph": True},
            {"off": 2.0, "on": 1.6, "floor_s": 1.0, "compiled_new_graph": False},
            {"off": 3.0, "on": 2.0, "floor_s": 1.5, "compiled_new_graph": False},
            {"off": 1.0, "on": 1.0, "floor_s": 0.5, "compiled_new_graph": False}]
    for r in rows:
        r["eager_over_compiled"] = r["off"] / r["on"]
    s = summarise({"off": {"cpu_s": 1.0}, "on": {"cpu_s": 21.0}}, rows)
    assert s["steady_rounds"] == 3
    assert s["eager_over_compiled_median"] == 1.25 and s["eager_over_compiled_range"] == [1.0, 1.5]
    assert s["eager_x_floor_median"] == 2.0 and s["compiled_x_floor_median"] == 1.6
    assert abs(s["saved_cpu_s_per_step_median"] - 0.4) < 1e-12
    assert s["compile_cpu_s"] == 20.0 + 8.0 and abs(s["steps_to_pay_back"] - 28.0 / 0.4) < 1e-9
