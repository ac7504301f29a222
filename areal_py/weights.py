"""Moving policy weights trainer -> rollout servers: safetensors on a shared disk, or raw frames.

Only parameters travel (buffers such as rotary tables are derived, tied weights go once),
keyed by `named_parameters()` names, which is also how the engine copies them in place.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def named_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached parameters, shared ones once: what a server needs to reproduce the policy."""
    return {name: p.detach() for name, p in model.named_parameters()}


def weights_path(directory: Path, version: int) -> Path:
    return directory / f"v{version:06d}.safetensors"


def save_weights(model: torch.nn.Module, directory: Path, version: int, keep: int = 3) -> Path:
    """Write atomically (temp + rename) so a server never reads half a file; prune old versions."""
    directory.mkdir(parents=True, exist_ok=True)
    path = weights_path(directory, version)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in named_weights(model).items()}, str(tmp), metadata={"version": str(version)})
    os.replace(tmp, path)
    old = sorted(p for p in directory.glob("v*.safetensors") if re.fullmatch(r"v\d+\.safetensors", p.name))
    for p in old[:-keep]:
        p.unlink(missing_ok=True)
    return path


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weight file {p} does not exist (is weights.dir shared between trainer and servers?)")
    return load_file(str(p))
