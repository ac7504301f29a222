"""Disk weight files: pruning keeps the file just written, and files from a run abandoned at a later
version (a crash past the last checkpoint, then a resume) do not survive the next publish."""
from __future__ import annotations

import errno
import os

import pytest
import torch

from areal_py.wire import weights as W


def _names(d) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_prune_keeps_the_newest(tmp_path):
    m = torch.nn.Linear(2, 2)
    for v in range(1, 6):
        W.save_weights(m, tmp_path, v, keep=3)
    assert _names(tmp_path) == ["v000003.safetensors", "v000004.safetensors", "v000005.safetensors"]


def test_resumed_version_survives_stale_newer_files(tmp_path):
    """Crash at step 25, resume from the step-20 checkpoint: publishing v20 must leave v20 on disk (the servers
    are about to load it), and v23..25 are from the abandoned run."""
    m = torch.nn.Linear(2, 2)
    for v in (21, 22, 23, 24, 25):
        W.save_weights(m, tmp_path, v, keep=3)
    (tmp_path / "v000026.tmp12345").write_bytes(b"half a file")  # the write the crash interrupted
    path = W.save_weights(m, tmp_path, 20, keep=3)
    assert path.is_file() and W.load_weights(path).keys() == dict(m.named_parameters()).keys()
    assert _names(tmp_path) == ["v000020.safetensors"]


def test_disk_full_names_the_path_and_leaves_no_partial_file(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(W, "save_file", full)
    with pytest.raises(OSError) as e:
        W.save_weights(torch.nn.Linear(2, 2), tmp_path, 7)
    assert e.value.errno == errno.ENOSPC and str(tmp_path / "v000007.safetensors") in str(e.value)
    assert _names(tmp_path) == []
