"""`areal-py dpo` on the embedded default's synthetic pairs: it trains, the held-out margin rises from 0, the
records, the report and the final HF directory are there. (`--resume`: tests/integration/test_offline_resume.py;
an RL run from an offline command's final directory: tests/e2e/test_post_training_pipeline.py.)"""
from __future__ import annotations

from conftest import run_cli

from areal_py.models import load_model_and_tokenizer
from areal_py.tasks.preference_pairs import read_pairs
from areal_py.telemetry.metrics import read_jsonl


def test_dpo_command_trains_and_writes_its_records(tmp_path, small_cfg):
    overrides = [*small_cfg, "run.torch_threads=1", "dpo.synthetic_examples=64", "dpo.eval_examples=32",
                 "dpo.eval_samples=16", "dpo.batch_size=16", "dpo.epochs=2", "dpo.lr=3e-4"]
    res = run_cli(["dpo", "--quiet", *overrides], timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    run = tmp_path / "runs" / "t"
    records = read_jsonl(run / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == (
        [("eval", 0)] + [("train", s) for s in range(1, 5)] + [("eval", 4)]
        + [("train", s) for s in range(5, 9)] + [("eval", 8)])
    evals = [r for r in records if r["kind"] == "eval"]
    # the policy starts as its reference: zero margin, every implicit reward 0, loss log 2
    assert evals[0]["eval_margin"] == 0.0 and abs(evals[0]["eval_loss"] - 0.693147) < 1e-5
    assert evals[-1]["eval_margin"] > 0.0 and evals[-1]["eval_accuracy"] > 0.5
    assert all(0.0 <= r["sampled_accuracy"] <= 1.0 for r in evals)
    assert len(read_pairs(run / "data" / "train.jsonl")) == 64 and len(read_pairs(run / "data" / "eval.jsonl")) == 32
    load_model_and_tokenizer(run / "final")
    assert 'data-chart="eval-eval_margin"' in (run / "report.html").read_text()
