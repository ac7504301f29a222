"""Every preset in configs/ runs on the embedded default and learns; the PPO critic learns too."""
import pytest
from conftest import ROOT, run_cli

from areal_py.telemetry.metrics import read_jsonl


def mean(recs, key):
    return sum(r[key] for r in recs) / len(recs)


def _reward_gain(tmp_path, small_cfg, preset: str, steps: int, seed: int) -> tuple[float, list[dict]]:
    """Run the preset; return (mean reward of the last 10 steps - mean of the first 10, the records).

    DAPO trains only mixed groups, which pulls the trained reward toward 0.5; its gain is read from
    `scored_reward_mean`, the reward of everything generated, dropped groups included."""
    overrides = [o for o in small_cfg if not o.startswith("controller.batch_size")] + ["controller.batch_size=16"]
    out = tmp_path / f"seed{seed}"
    res = run_cli(["run", "--quiet", str(ROOT / "configs" / f"{preset}.yaml"), *overrides, f"run.output_dir={out}",
                   f"run.seed={seed}", f"trainer.total_steps={steps}"], timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    recs = read_jsonl(out / "t" / "metrics.jsonl")
    assert len(recs) == steps
    key = "scored_reward_mean" if preset == "dapo" else "reward_mean"
    first, last = [r for r in recs[:10] if key in r], [r for r in recs[-10:] if key in r]
    return mean(last, key) - mean(first, key), recs


# grpo (the default's recipe) and ppo (the critic) learn in the default suite; the other presets differ from
# grpo only in pure advantage/aggregation functions (unit-tested) or, for dapo, in the controller's dynamic
# sampling (tests/integration/test_sockets.py), and take one in-process update each in
# tests/unit/test_preset_step.py, so their minute-long runs are `slow`.
PRESETS = [("grpo", 80), pytest.param("dr_grpo", 80, marks=pytest.mark.slow),
           pytest.param("dapo", 80, marks=pytest.mark.slow),
           pytest.param("rloo", 80, marks=pytest.mark.slow), pytest.param("reinforce_pp", 80, marks=pytest.mark.slow),
           ("ppo", 100)]


@pytest.mark.parametrize("preset,steps", PRESETS)
def test_preset_learns(tmp_path, small_cfg, preset, steps):
    """Mean reward rises by more than 0.1 from the first 10 steps to the last 10.

    Async runs are not bit-reproducible (processes race), so the gain is a random variable:
    measured for grpo over 20 runs on 2 cores, 0.18-0.40 (mean 0.30), yet one CI run stalled at
    0.07. A preset that does not learn fails twice in a row; a rare stalled run gets one retry
    with another seed, and both gains are in the failure message.
    """
    gains = []
    for seed in (0, 1):
        gain, recs = _reward_gain(tmp_path, small_cfg, preset, steps, seed)
        gains.append(round(gain, 3))
        if gain > 0.1:
            break
    assert gains[-1] > 0.1, f"{preset}: reward gain (last 10 - first 10 steps) per seed: {gains}"
    if preset == "dapo":
        assert recs[-1]["ctrl_dropped_uniform"] > 0  # dynamic sampling really dropped groups
        assert all(r["informative_samples"] == r["samples"] for r in recs)


@pytest.mark.slow
def test_ppo_critic_value_loss_falls(tmp_path, small_cfg):
    """Over 100 steps the reward variance itself moves (p(1-p) grows toward p = 0.5), which can hide
    the critic's progress; 200 steps at batch 16 show it (the measured fall: docs/benchmarks.md, Elsewhere)."""
    overrides = [o for o in small_cfg if not o.startswith("controller.batch_size")] + ["controller.batch_size=16"]
    res = run_cli(["run", "--quiet", str(ROOT / "configs" / "ppo.yaml"), *overrides, "trainer.total_steps=200"],
                  timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    recs = read_jsonl(tmp_path / "runs" / "t" / "metrics.jsonl")
    assert mean(recs[-30:], "value_loss") < mean(recs[:30], "value_loss")


def test_every_preset_is_tested():
    presets = {p.stem for p in (ROOT / "configs").glob("*.yaml")} - {"default", "sum_cot", "calc_tool"}
    # sum_cot and calc_tool are workloads, not algorithm presets: calc_tool learns in tests/e2e/test_calc_tool_run.py
    tested = {p.values[0] if hasattr(p, "values") else p[0] for p in PRESETS}
    assert presets == tested
