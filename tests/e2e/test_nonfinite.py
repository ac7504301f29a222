"""Non-finite rewards and logprobs: the trainer drops them before the loss, and a run fed a reward
that is finite only as a Python float (1e39) still ends with finite weights."""
from __future__ import annotations

import pytest
import torch

from areal_py.wire import protocol as P
from trainer.rollout_batch import collate, drop_nonfinite_groups


def group(gid: int, reward: float = 1.0, logprob: float = -0.5) -> P.Group:
    samples = [P.Sample(output_ids=[5, 6], logprobs=[-0.1, logprob if i == 1 else -0.2], versions=[0, 0],
                        finish_reason="stop", reward=reward if i == 1 else float(i)) for i in range(3)]
    return P.Group(gid=gid, prompt_index=gid, prompt_ids=[1, 2], samples=samples)


def test_groups_with_a_value_not_finite_in_float32_are_dropped_whole_and_counted():
    groups = [group(0), group(1, reward=1e39), group(2, logprob=float("nan")), group(3, reward=float("-inf")),
              group(4, logprob=-1e39), group(5)]
    wire = P.Batch(version=0, groups=groups, state={})  # a valid message: the protocol checks types, not ranges
    kept, dropped = drop_nonfinite_groups(collate(wire.groups, pad_id=0))
    assert dropped == {"nonfinite_reward": [1, 3], "nonfinite_logprob": [2, 4]}
    assert kept.num_samples == 6 and kept.group_size == 3  # groups 0 and 5, all their samples
    assert kept.rewards.tolist() == [0.0, 1.0, 2.0] * 2
    assert bool(torch.isfinite(kept.behav_logprobs).all())


def test_a_clean_batch_is_passed_through():
    batch = collate([group(0), group(1)], pad_id=0)
    kept, dropped = drop_nonfinite_groups(batch)
    assert kept is batch and dropped == {"nonfinite_reward": [], "nonfinite_logprob": []}


def test_every_group_dropped_leaves_an_empty_batch():
    kept, dropped = drop_nonfinite_groups(collate([group(0, reward=float("nan"))], pad_id=0))
    assert kept.num_samples == 0 and dropped["nonfinite_reward"] == [0]


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_the_trainer_never_trains_on_a_dropped_group(value):
    """Through the learner: the kept batch trains; the poisoned group would have NaN'd the update."""
    from tiny_models import tiny_model

    from areal_py.config import load_config
    from trainer.learner import Learner

    cfg = load_config(None, ["controller.group_size=3"])
    learner = Learner(cfg, tiny_model(), model_dir=None)
    kept, _ = drop_nonfinite_groups(collate([group(0), group(1, reward=value), group(2)], pad_id=0))
    stats = learner.train_step(kept, 0)
    assert stats["skipped_updates"] == 0.0 and stats["informative_samples"] == 6.0
    assert all(bool(torch.isfinite(p).all()) for p in learner.model.parameters())


class Records(list):
    write = list.append


def bare_trainer(group_size: int):
    """A Trainer without sockets or a model download: the parts `_step` uses, with a tiny model."""
    import time
    from types import SimpleNamespace

    from tiny_models import tiny_model

    from areal_py.config import load_config
    from areal_py.telemetry.signal_watch import SignalWatch
    from trainer.distributed import Dist
    from trainer.learner import Learner
    from trainer.trainer import Trainer

    t = Trainer.__new__(Trainer)
    t.dist = Dist.single()
    t.cfg = load_config(None, [f"controller.group_size={group_size}", "trainer.max_consecutive_skipped_steps=1"])
    t.model = tiny_model()
    t.learner = Learner(t.cfg, t.model, model_dir=None)
    t.tokenizer = SimpleNamespace(pad_token_id=0)
    t.version, t.trained_tokens_total, t.wall_offset, t.start_time = 0, 0, 0.0, time.monotonic()
    t.metrics, t.tb = Records(), None
    t.publish = lambda: None
    t.signal = SignalWatch(t.cfg.trainer.warn_uninformative_steps)
    return t


def rejected_count(reason: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("areal_trainer_rejected_groups_total", {"reason": reason}) or 0.0


def test_the_trainer_step_drops_counts_and_records_nonfinite_groups(caplog):
    t = bare_trainer(3)
    before = rejected_count("nonfinite_reward")
    with caplog.at_level("WARNING", logger="trainer"):
        t._step(P.Batch(version=0, groups=[group(0), group(7, reward=1e39), group(2)], state={}), 0.0)
    rec = t.metrics[-1]
    assert rec["rejected_groups_nonfinite_reward"] == 1 and rec["rejected_groups_nonfinite_logprob"] == 0
    assert rec["samples"] == 6 and rec["skipped_updates"] == 0.0 and rec["reward_mean"] == 1.0
    assert rejected_count("nonfinite_reward") == before + 1
    assert "gids [7]" in caplog.text
    assert all(bool(torch.isfinite(p).all()) for p in t.model.parameters())
    # a batch with nothing left trains nothing, is recorded, and counts toward the consecutive-skip limit
    t._step(P.Batch(version=1, groups=[group(3, logprob=float("inf"))], state={}), 0.0)
    assert t.metrics[-1]["samples"] == 0 and t.metrics[-1]["rejected_groups_nonfinite_logprob"] == 1
    with pytest.raises(RuntimeError, match="2 steps in a row applied no update"):
        t._step(P.Batch(version=2, groups=[group(4, reward=float("nan"))], state={}), 0.0)


def test_a_run_fed_a_reward_of_1e39_ends_with_finite_weights(tmp_path, small_cfg):
    from conftest import run_cli
    from safetensors.torch import load_file

    from areal_py.telemetry.metrics import read_jsonl

    spec = 'reward.functions={accuracy: 1.0, "tests.reward_fixtures:sometimes_huge": 1.0}'
    res = run_cli(["run", "--quiet", *small_cfg, spec, "reward.workers=0", "trainer.total_steps=4"])
    assert res.returncode == 0, res.stdout + res.stderr
    run = tmp_path / "runs" / "t"
    final = load_file(run / "final" / "model.safetensors")
    assert final and all(bool(torch.isfinite(w).all()) for w in final.values())
    records = read_jsonl(run / "metrics.jsonl")
    assert len(records) == 4 and records[-1]["ctrl_reward_errors"] > 0  # scored 0 and counted by the controller
    assert all(abs(r["reward_mean"]) <= 1.0 for r in records)  # no 1e39 reached the trainer
    assert "not finite in float32" in (run / "logs" / "controller.log").read_text()
