"""Every preset in configs/ runs on the embedded default and learns; the PPO critic learns too."""
import pytest

from areal_py.metrics import read_jsonl
from conftest import ROOT, run_cli


def mean(recs, key):
    return sum(r[key] for r in recs) / len(recs)


@pytest.mark.parametrize("preset,steps", [("grpo", 80), ("dr_grpo", 80), ("dapo", 80), ("rloo", 80),
                                          ("reinforce_pp", 80), ("ppo", 100)])
def test_preset_learns(tmp_path, small_cfg, preset, steps):
    overrides = [o for o in small_cfg if not o.startswith("controller.batch_size")] + ["controller.batch_size=16"]
    res = run_cli(["run", "--quiet", str(ROOT / "configs" / f"{preset}.yaml"), *overrides,
                   f"trainer.total_steps={steps}"], timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    recs = read_jsonl(tmp_path / "runs" / "t" / "metrics.jsonl")
    assert len(recs) == steps
    assert mean(recs[-10:], "reward_mean") - mean(recs[:10], "reward_mean") > 0.1
    if preset == "dapo":
        assert recs[-1]["ctrl_dropped_uniform"] > 0  # dynamic sampling really dropped groups
        assert all(r["informative_samples"] == r["samples"] for r in recs)


@pytest.mark.slow
def test_ppo_critic_value_loss_falls(tmp_path, small_cfg):
    """Over 100 steps the reward variance itself moves (p(1-p) grows toward p = 0.5), which can hide
    the critic's progress; 200 steps at batch 16 show it (measured: 0.111 -> 0.070 over 150 steps)."""
    overrides = [o for o in small_cfg if not o.startswith("controller.batch_size")] + ["controller.batch_size=16"]
    res = run_cli(["run", "--quiet", str(ROOT / "configs" / "ppo.yaml"), *overrides, "trainer.total_steps=200"],
                  timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    recs = read_jsonl(tmp_path / "runs" / "t" / "metrics.jsonl")
    assert mean(recs[-30:], "value_loss") < mean(recs[:30], "value_loss")


def test_every_preset_is_tested():
    presets = {p.stem for p in (ROOT / "configs").glob("*.yaml")} - {"default", "sum_cot"}  # sum_cot: a workload
    tested = {p for p, _ in test_preset_learns.pytestmark[0].args[1]}
    assert presets == tested
