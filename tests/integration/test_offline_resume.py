"""`--resume` of the offline commands (sft, rm, dpo), in process on a small random model: training two epochs,
then resuming from the first epoch's checkpoint, ends with the same held-out numbers and the same records."""
from __future__ import annotations

import shutil

import pytest
import torch

from areal_py.config import load_config
from areal_py.models import EmbeddedModelSpec, create_embedded_model
from areal_py.telemetry.metrics import read_jsonl
from trainer.dpo import train_dpo
from trainer.rm import train_rm
from trainer.sft import train_sft

TRAIN = {"sft": train_sft, "rm": train_rm, "dpo": train_dpo}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    return create_embedded_model(tmp_path_factory.mktemp("emb"), EmbeddedModelSpec())


@pytest.mark.parametrize("command", ["sft", "rm", "dpo"])
def test_resume_from_an_epoch_checkpoint_is_exact(tmp_path, tiny, command):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r", f"model.path={tiny}",
                             f"{command}.synthetic_examples=24", f"{command}.eval_examples=8", f"{command}.batch_size=8",
                             f"{command}.epochs=2", f"{command}.lr=1e-3", "rollout.max_new_tokens=4"]
                      + ([] if command == "rm" else [f"{command}.eval_samples=8"]))
    first = TRAIN[command](cfg, tiny)
    run = tmp_path / "r"
    records = read_jsonl(run / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == (
        [("eval", 0), ("train", 1), ("train", 2), ("train", 3), ("eval", 3), ("train", 4), ("train", 5),
         ("train", 6), ("eval", 6)])
    assert first["steps"] == 6 and first["last_eval"] == records[-1]
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step_000006")
    again = TRAIN[command](cfg, tiny, resume=True)
    resumed = read_jsonl(run / "metrics.jsonl")
    assert again["first_eval"] is None and again["steps"] == 6
    assert [(r["kind"], r["step"]) for r in resumed] == [(r["kind"], r["step"]) for r in records]
    for key, value in records[-1].items():
        if key != "wall_time_s":
            assert resumed[-1][key] == pytest.approx(value, abs=1e-5), key
    assert (run / "final" / "config.json").is_file()
