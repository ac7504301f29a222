"""`areal-py dpo` on the embedded default's synthetic pairs: it trains, the held-out margin rises from 0, the
records and the final HF directory are there, `--resume` from the first epoch's checkpoint ends exactly where
the uninterrupted run ended, and `areal-py check model.path=<final>` accepts the result as an RL start."""
from __future__ import annotations

import shutil

from conftest import run_cli

from areal_py.models import load_model_and_tokenizer
from areal_py.tasks.preference_pairs import read_pairs
from areal_py.telemetry.metrics import read_jsonl


def test_dpo_command_trains_resumes_and_hands_over(tmp_path, small_cfg):
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

    # resume from the epoch-1 checkpoint: the same last evaluation, step for step
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step_000008")
    res = run_cli(["dpo", "--quiet", "--resume", *overrides], timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    again = read_jsonl(run / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in again] == [(r["kind"], r["step"]) for r in records]
    for key in ("eval_loss", "eval_margin", "eval_accuracy", "sampled_accuracy"):
        assert abs(again[-1][key] - records[-1][key]) < 1e-5, key

    res = run_cli(["check", *small_cfg, f"model.path={run / 'final'}"], timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
