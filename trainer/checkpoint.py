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


def save_checkpoint(root: Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                    state: dict[str, Any]) -> Path:
    d = root / f"step_{state['version']:06d}"
    tmp = root / f".tmp_{d.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, module in modules.items():
        save_file({k: v.contiguous() for k, v in named_weights(module).items()}, str(tmp / f"{name}.safetensors"))
    for name, opt in optimizers.items():
        torch.save(opt.state_dict(), tmp / f"{name}.pt")
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


def load_checkpoint(d: Path, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
    """Restore in place; a module or optimizer the checkpoint lacks is an error naming it."""
    for name, module in modules.items():
        f = d / f"{name}.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint {d} has no {f.name} (was it saved with another algo config?)")
        weights = load_file(str(f))
        params = dict(module.named_parameters())
        missing = set(params) - set(weights)
        if missing:
            raise ValueError(f"checkpoint {f} lacks parameters {sorted(missing)[:5]}")
        with torch.no_grad():
            for k, t in weights.items():
                params[k].copy_(t)
    for name, opt in optimizers.items():
        opt.load_state_dict(torch.load(d / f"{name}.pt", weights_only=True))
    return json.loads((d / "state.json").read_text())
