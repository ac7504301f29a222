"""`areal-py run --resume` at another trainer.world_size than the run that wrote the checkpoint: 2 trainer
ranks (FSDP2, gloo) write sharded checkpoints, one rank resumes from them at the saved version with the
same weights, and two ranks resume from that one's checkpoint. (tests/unit/test_checkpoint_dist.py checks the same at the checkpoint level, both ways, in
the default suite; this one goes through the launcher, the trainer and the controller.)"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from areal_py.telemetry.step_record import read_step_records
from trainer.checkpoint import MANIFEST, load_checkpoint


@pytest.mark.slow
def test_a_2_rank_checkpoint_resumes_on_1_rank_and_back(tmp_path, small_cfg):
    first = run_cli(["run", "--quiet", *small_cfg, "trainer.world_size=2", "trainer.total_steps=2"])
    assert first.returncode == 0, first.stdout + first.stderr
    run = tmp_path / "runs" / "t"
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert ckpt.name == "step_000002"
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(json.loads((ckpt / MANIFEST).read_text())["files"])
    # the checkpoint's weights, read back at world size 1, are the ones the two ranks saved as final/
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "final")
    final = load_file(str(run / "final" / "model.safetensors"))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt = torch.optim.AdamW(model.parameters())
    state = load_checkpoint(ckpt, {"model": model}, {"optimizer": opt})
    assert state["version"] == 2
    for name, p in model.named_parameters():
        assert torch.equal(p, final[name]), name

    second = run_cli(["run", "--quiet", "--resume", *small_cfg, "trainer.world_size=1", "trainer.total_steps=4"])
    assert second.returncode == 0, second.stdout + second.stderr
    assert [r.step for r in read_step_records(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert f"resumed from {ckpt} at version 2" in (run / "logs" / "trainer.log").read_text()

    # and back: the world-size-1 checkpoint at step 4 resumes on 2 ranks
    third = run_cli(["run", "--quiet", "--resume", *small_cfg, "trainer.world_size=2", "trainer.total_steps=5"])
    assert third.returncode == 0, third.stdout + third.stderr
    recs = read_step_records(run / "metrics.jsonl")
    assert [r.step for r in recs] == [1, 2, 3, 4, 5] and len(recs[-1].rank_tokens) == 2
    step_4 = run / "checkpoints" / "step_000004"
    for log in ("trainer.log", "trainer-1.log"):  # both ranks restored it
        assert f"resumed from {step_4} at version 4" in (run / "logs" / log).read_text(), log
