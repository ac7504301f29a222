"""Checkpoints survive crashes: written atomically, verified on load, the newest valid one wins, old ones
are pruned, and a full disk is an error naming the path."""
from __future__ import annotations

import errno
import json
import logging
import os

import pytest
import torch

from trainer import checkpoint as C

SHARD = "__0_0.distcp"  # DCP's file of rank 0's tensors (world size 1: all of them)


def _model_and_opt(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(torch.randn(2, 4)).sum().backward()
    opt.step()  # the optimizer has state to save
    return m, opt


def _save(root, version: int, keep: int = 0, seed: int | None = None):
    m, opt = _model_and_opt(version if seed is None else seed)
    d = C.save_checkpoint(root, {"policy": m}, {"policy_opt": opt},
                          {"version": version, "controller_state": {"data_position": version}}, keep=keep)
    return d, m


def _load(root):
    m, opt = _model_and_opt(seed=99)
    d, state = C.load_latest_checkpoint(root, {"policy": m}, {"policy_opt": opt})
    return d, state, m


def test_round_trip_restores_weights_and_state(tmp_path):
    d, saved = _save(tmp_path, 4)
    got_dir, state, m = _load(tmp_path)
    assert got_dir == d and state["version"] == 4 and state["controller_state"] == {"data_position": 4}
    assert torch.equal(m.weight, saved.weight) and torch.equal(m.bias, saved.bias)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("victim", [SHARD, ".metadata", "state.json"])
def test_truncated_newest_falls_back_to_the_previous_one_with_a_warning(tmp_path, caplog, victim):
    _, good = _save(tmp_path, 4)
    newest, _ = _save(tmp_path, 8)
    f = newest / victim
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # what a crash mid-write or a bad copy leaves
    with caplog.at_level(logging.WARNING):
        d, state, m = _load(tmp_path)
    assert state["version"] == 4 and d.name == "step_000004"
    assert torch.equal(m.weight, good.weight)
    assert str(newest) in caplog.text and victim in caplog.text


def test_bit_flip_is_caught_by_the_manifest(tmp_path, caplog):
    _save(tmp_path, 4)
    newest, _ = _save(tmp_path, 8)
    f = newest / SHARD
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size, still a loadable file: only the checksum can tell
    f.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        _, state, _ = _load(tmp_path)
    assert state["version"] == 4
    assert "sha256" in caplog.text and str(newest) in caplog.text


def test_all_corrupt_is_a_clear_error_naming_the_directory(tmp_path):
    for v in (4, 8):
        d, _ = _save(tmp_path, v)
        (d / SHARD).write_bytes(b"\0" * 10)
    with pytest.raises(C.CheckpointError) as e:
        _load(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "step_000004" in msg and "step_000008" in msg


def test_no_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / ".tmp_step_000004").mkdir()  # a save that never finished is not a checkpoint
    with pytest.raises(C.CheckpointError, match=str(tmp_path)):
        _load(tmp_path)
    assert C.checkpoint_dirs(tmp_path) == []


@pytest.mark.parametrize("keep,expected", [(2, [12, 16]), (0, [4, 8, 12, 16])])
def test_retention_keeps_the_newest(tmp_path, keep, expected):
    for v in (4, 8, 12, 16):
        _save(tmp_path, v, keep=keep)
    assert sorted(int(d.name.split("_")[1]) for d in tmp_path.glob("step_*")) == expected
    assert (tmp_path / "latest").read_text() == "step_000016"


def test_checkpoints_past_the_one_written_are_from_an_abandoned_run_and_go(tmp_path):
    """After a resume from step 4, a step-8 checkpoint that failed verification must not outlive the new step 8
    (or win over it): saving step 6 removes it."""
    _save(tmp_path, 4)
    _save(tmp_path, 8)
    _save(tmp_path, 6)
    assert sorted(d.name for d in tmp_path.glob("step_*")) == ["step_000004", "step_000006"]


def test_disk_full_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 4)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(C.dcp, "save", full)
    with pytest.raises(OSError) as e:
        _save(tmp_path, 8)
    assert e.value.errno == errno.ENOSPC
    assert str(tmp_path / "step_000008") in str(e.value)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # the partial copy is gone
    monkeypatch.undo()
    _, state, _ = _load(tmp_path)
    assert state["version"] == 4


def test_a_controller_state_that_does_not_validate_is_an_error_naming_the_file(tmp_path):
    """A checkpoint whose manifest verifies but whose controller_state is not a ControllerState (edited by
    hand, or written by a newer version) stops the resume with the file's path, not a bare pydantic error."""
    from types import SimpleNamespace

    from trainer.distributed import Dist
    from trainer.trainer import Trainer

    m, opt = _model_and_opt()
    C.save_checkpoint(tmp_path, {"policy": m}, {"policy": opt},
                      {"version": 3, "controller_state": {"accepted": -5}, "wall_time_s": 1.0})
    fake = SimpleNamespace(ckpt_root=tmp_path, dist=Dist.single(),
                           learner=SimpleNamespace(modules=lambda: {"policy": m}, optimizers=lambda: {"policy": opt}))
    with pytest.raises(C.CheckpointError, match=r"state\.json: controller_state is not a valid controller state"):
        Trainer._resume(fake)


def test_optimizer_state_round_trips(tmp_path):
    _save(tmp_path, 4)
    _, want = _model_and_opt(4)  # the optimizer `_save` stepped, rebuilt from the same seed
    m, opt = _model_and_opt(seed=99)
    C.load_latest_checkpoint(tmp_path, {"policy": m}, {"policy_opt": opt})
    got, ref = opt.state_dict(), want.state_dict()
    assert got["param_groups"] == ref["param_groups"] and got["state"].keys() == ref["state"].keys()
    for i, st in ref["state"].items():
        for k, t in st.items():
            assert torch.equal(got["state"][i][k], t), (i, k)


def test_a_checkpoint_from_before_sharding_is_refused_naming_the_directory(tmp_path):
    """The safetensors + torch.save layout of earlier versions: a clear refusal, not a fall-back to an
    even older checkpoint of the same format, nor 'damaged'."""
    from safetensors.torch import save_file

    m, opt = _model_and_opt()
    for v in (4, 8):
        d = tmp_path / f"step_{v:06d}"
        d.mkdir()
        save_file({k: t.contiguous() for k, t in m.state_dict().items()}, str(d / "model.safetensors"))
        torch.save(opt.state_dict(), d / "optimizer.pt")
        (d / "state.json").write_text(json.dumps({"version": v}))
    with pytest.raises(C.OldFormatCheckpointError) as e:
        _load(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "step_000008") in msg and "model.safetensors" in msg and "without --resume" in msg


def test_a_module_the_checkpoint_lacks_is_a_config_error_naming_it(tmp_path):
    _save(tmp_path, 4)
    m, opt = _model_and_opt(seed=99)
    critic, _ = _model_and_opt(seed=98)
    with pytest.raises(FileNotFoundError, match=r"step_000004 has no module 'critic' \(was it saved with another"):
        C.load_latest_checkpoint(tmp_path, {"policy": m, "critic": critic}, {"policy_opt": opt})


def test_saving_an_optimizer_that_never_stepped_leaves_it_fresh(tmp_path):
    """DCP creates optimizer state to save it; the live optimizer must not keep it (its first real step
    would otherwise count as step 2 in AdamW's bias correction)."""
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in m.parameters()]
    C.save_checkpoint(tmp_path, {"policy": m}, {"policy_opt": opt}, {"version": 0})
    assert not opt.state and all(p.grad is None for p in m.parameters())
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before, strict=True))


def test_resuming_a_checkpoint_from_before_the_first_update_steps_like_a_fresh_optimizer(tmp_path):
    """Saved before any update, loaded, one step: the same weights as a run that never stopped (AdamW's
    first step, not its second, in the bias correction)."""
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    C.save_checkpoint(tmp_path, {"policy": m}, {"policy_opt": torch.optim.AdamW(m.parameters(), lr=1e-2)},
                      {"version": 0})
    x = torch.randn(2, 4)
    results = []
    for resume in (False, True):
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        if resume:
            C.load_latest_checkpoint(tmp_path, {"policy": m}, {"policy_opt": opt})
        m(x).sum().backward()
        opt.step()
        results.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
