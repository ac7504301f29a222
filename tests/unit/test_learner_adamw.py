"""The learner's AdamW is the fused one (one kernel for all parameters) and updates as the per-tensor loop does."""
import copy

import torch
from tiny_models import tiny_model

from areal_py.config import load_config
from trainer.learner import Learner


def test_fused_adamw_updates_like_the_per_tensor_loop():
    cfg = load_config(None, ["controller.group_size=4", "trainer.lr=1e-2", "trainer.weight_decay=0.1"])
    learner = Learner(cfg, tiny_model(), model_dir=None)
    assert learner.optimizer.param_groups[0]["fused"] is True
    ref = copy.deepcopy(learner.model)
    loop = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # a few steps, so the moments and the bias correction enter
        for p, q in zip(learner.model.parameters(), ref.parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        learner.optimizer.step()
        loop.step()
    moved = 0.0
    for (name, p), q, p0 in zip(learner.model.named_parameters(), ref.parameters(), tiny_model().parameters(),
                                strict=True):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), name
        moved = max(moved, float((p - p0).detach().abs().max()))
    assert moved > 1e-3  # the weights did move
