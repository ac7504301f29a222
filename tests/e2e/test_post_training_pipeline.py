"""The post-training pipeline from the command line: `areal-py sft` on the embedded default's synthetic examples,
`areal-py rm` from the SFT model, then `areal-py run` from the SFT model with the reward model as its only reward
(`reward.functions={reward_model: 1.0}`). Each stage writes what the next takes; SFT lowers the held-out loss,
the reward model's held-out loss falls, the RL run trains on the reward model's scores, and the offline runs
write their report. (`--resume` of each command: tests/integration/test_offline_resume.py.)"""
from __future__ import annotations

from conftest import run_cli

from areal_py.rewards.reward_model import RewardModelScorer
from areal_py.telemetry.metrics import read_jsonl


def test_sft_then_reward_model_then_rl_against_it(tmp_path, small_cfg):
    base = [o for o in small_cfg if not o.startswith("run.name=")] + ["run.torch_threads=1"]
    runs = tmp_path / "runs"
    res = run_cli(["sft", "--quiet", *base, "run.name=sft", "sft.synthetic_examples=64", "sft.eval_examples=32",
                   "sft.eval_samples=0", "sft.batch_size=16", "sft.epochs=2", "sft.lr=1e-3"], timeout=90)
    assert res.returncode == 0, res.stdout + res.stderr
    records = read_jsonl(runs / "sft" / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == (
        [("eval", 0)] + [("train", s) for s in range(1, 5)] + [("eval", 4)] + [("train", s) for s in range(5, 9)]
        + [("eval", 8)])
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]
    report = (runs / "sft" / "report.html").read_text()
    assert 'data-chart="train-loss"' in report and 'data-chart="eval-eval_loss"' in report
    sft_model = runs / "sft" / "final"

    res = run_cli(["rm", "--quiet", *base, "run.name=rm", f"model.path={sft_model}", "rm.synthetic_examples=96",
                   "rm.eval_examples=32", "rm.batch_size=16", "rm.epochs=2"], timeout=90)
    assert res.returncode == 0, res.stdout + res.stderr
    evals = [r for r in read_jsonl(runs / "rm" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    rm_model = runs / "rm" / "final"
    scorer = RewardModelScorer(rm_model)  # the reward function's loader takes the directory as it is

    res = run_cli(["run", "--quiet", *base, "run.name=rl", f"model.path={sft_model}",
                   "reward.functions={reward_model: 1.0}", f"reward.reward_model_path={rm_model}",
                   "trainer.total_steps=2", "rollout.max_new_tokens=4"], timeout=150)
    assert res.returncode == 0, res.stdout + res.stderr
    steps = read_jsonl(runs / "rl" / "metrics.jsonl")
    assert [r["step"] for r in steps] == [1, 2]
    # the rewards are the model's scores, not the task's 0/1 accuracy: a mean of 32 of them is no multiple of 1/32
    assert all(abs(r["scored_reward_mean"] * 32 - round(r["scored_reward_mean"] * 32)) > 1e-3 for r in steps)
    assert scorer.score(["3+4=7"])[0] != scorer.score(["3+4=9"])[0]
