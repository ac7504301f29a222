"""Moving policy weights trainer -> rollout servers: safetensors on a shared disk, or raw frames.

Only parameters travel (buffers such as rotary tables are derived, tied weights go once),
keyed by `named_parameters()` names, which is also how the engine copies them in place.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def named_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached parameters, shared ones once: what a server needs to reproduce the policy."""
    return {name: p.detach() for name, p in model.named_parameters()}


def weights_path(directory: Path, version: int) -> Path:
    return directory / f"v{version:06d}.safetensors"


def write_error(path: Path, e: Exception) -> OSError:
    """An OSError naming `path` for a failed write, with the free space on its disk: safetensors and
    torch.save report a full disk as their own exception types (SafetensorError; RuntimeError
    "unexpected pos"), often without an errno, so the free space is what tells the reader."""
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    msg = f"could not write {path} ({free}): {e}"
    return OSError(e.errno, msg) if isinstance(e, OSError) and e.errno else OSError(msg)


def save_weights(model: torch.nn.Module | dict[str, torch.Tensor], directory: Path, version: int,
                 keep: int = 3) -> Path:
    """Write atomically (temp + rename) so a server never reads half a file, then prune.

    The file just written is the live policy and is never pruned. Any file numbered above it, and any
    temp file left by another writer, is from a run abandoned at a later version (a crash past the last
    checkpoint, then a resume from it): stale, so removed. Of the rest the `keep` newest stay.
    A failed write (a full disk) leaves no partial file and raises an OSError naming the path.
    ``model`` may be the weights themselves (``named_weights`` names), e.g. gathered from sharded ranks.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = weights_path(directory, version)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        weights = model if isinstance(model, dict) else named_weights(model)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp),
                  metadata={"version": str(version)})
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from e
    files = {int(m.group(1)): p for p in directory.glob("v*")
             if (m := re.fullmatch(r"v(\d+)\.safetensors", p.name))}
    older = sorted(v for v in files if v <= version)
    stale = [files[v] for v in files if v > version] + [files[v] for v in older[:-keep]]
    stale += [p for p in directory.glob("v*.tmp*") if p != tmp]
    for p in stale:
        p.unlink(missing_ok=True)
    return path


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weight file {p} does not exist (is weights.dir shared between trainer and servers?)")
    return load_file(str(p))
