"""Checkpoints: model weights (safetensors), optimizer state, and the run's position.

The position is what makes resume exact: the trainer version, the controller's data position and
counters as of the last trained batch, and the wall time used so far.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from areal_py.weights import named_weights


def save_checkpoint(root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
    d = root / f"step_{state['version']:06d}"
    tmp = root / f".tmp_{d.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in named_weights(model).items()}, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)
    (root / "latest.tmp").write_text(d.name)
    os.replace(root / "latest.tmp", root / "latest")
    return d


def latest_checkpoint(root: Path) -> Path | None:
    marker = root / "latest"
    if not marker.is_file():
        return None
    d = root / marker.read_text().strip()
    return d if d.is_dir() else None


def load_checkpoint(d: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    weights = load_file(str(d / "model.safetensors"))
    params = dict(model.named_parameters())
    missing = set(params) - set(weights)
    if missing:
        raise ValueError(f"checkpoint {d} lacks parameters {sorted(missing)[:5]}")
    with torch.no_grad():
        for name, t in weights.items():
            params[name].copy_(t)
    optimizer.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
    return json.loads((d / "state.json").read_text())
