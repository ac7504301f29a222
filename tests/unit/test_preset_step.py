"""Every preset in configs/ takes one finite learner update in-process, with its distinguishing setting live.

The end-to-end learning runs (tests/e2e/test_presets.py) cost a minute each; the default suite keeps
those for grpo, dapo and ppo and runs the others under `slow`. This test keeps every preset's
wiring (config -> recipe -> loss -> optimizer step) in the default suite.
"""
import math

import pytest
import torch
from conftest import ROOT
from test_learner import batch
from tiny_models import tiny_model

from areal_py.config import load_config
from trainer.learner import Learner

PRESETS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml") if p.stem not in ("default", "sum_cot"))


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_takes_one_finite_update(tmp_path, preset):
    cfg = load_config(ROOT / "configs" / f"{preset}.yaml", ["controller.group_size=4"])
    model = tiny_model(max_positions=128)
    model.save_pretrained(tmp_path)  # the critic (ppo) loads its backbone from the model directory
    learner = Learner(cfg, model, model_dir=tmp_path)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    stats = learner.train_step(batch(version=3), version=3)
    assert stats["skipped_updates"] == 0.0
    assert math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0
    moved = [k for k, p in model.named_parameters() if not torch.equal(p.detach(), before[k])]
    assert moved, f"{preset}: no parameter changed after the update"
    if cfg.algo.adv_estimator == "gae":
        assert learner.critic is not None and stats["value_loss"] > 0
    if cfg.algo.kl_coef > 0:
        assert learner.ref is not None


def test_every_preset_is_covered():
    assert set(PRESETS) == {"calc_tool", "dapo", "dr_grpo", "grpo", "ppo", "reinforce_pp", "rloo"}
