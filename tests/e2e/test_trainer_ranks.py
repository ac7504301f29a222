"""`areal-py run trainer.world_size=2`: two FSDP2 trainer ranks (gloo) train the embedded default."""
from __future__ import annotations

from conftest import run_cli

from areal_py.telemetry.step_record import read_step_records


def test_two_trainer_ranks_finish_and_record_both_ranks_work(tmp_path, small_cfg):
    steps = 3
    res = run_cli(["run", "--quiet", *small_cfg, "trainer.world_size=2", f"trainer.total_steps={steps}",
                   "trainer.checkpoint_every=2"])
    assert res.returncode == 0, res.stdout + res.stderr
    run = tmp_path / "runs" / "t"
    recs = read_step_records(run / "metrics.jsonl")
    assert [r.step for r in recs] == list(range(1, steps + 1))
    for r in recs:
        assert len(r.rank_busy_s) == 2 and all(b > 0 for b in r.rank_busy_s), r.rank_busy_s
        assert len(r.rank_tokens) == 2 and all(t > 0 for t in r.rank_tokens), r.rank_tokens
        assert r.rank_tokens_max == max(r.rank_tokens) and r.rank_tokens_min == min(r.rank_tokens)
        assert sum(r.rank_tokens) <= r.trained_tokens  # the informative rows of the batch, split
    assert "rank 1/2" in (run / "logs" / "trainer-1.log").read_text()  # the second rank ran as its own process
    assert (run / "final" / "model.safetensors").is_file()  # gathered from the shards onto rank 0
    assert (run / "checkpoints" / "step_000002").is_dir()
