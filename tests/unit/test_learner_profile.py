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
