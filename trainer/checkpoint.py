"""Checkpoints: model weights (safetensors), optimizer state, and the run's position.

The position is what makes resume exact: the trainer version, the controller's data position and
counters as of the last trained batch, and the wall time used so far.

Crash safety. A checkpoint is written into `.tmp_step_N`, each file fsynced, `manifest.json` (every
file's size and sha256) last, then renamed to `step_N`; only then does `latest` name it. So a
`step_N` directory was complete when written, and the manifest tells whether it still is (a bad
copy, a disk error, a power loss on a filesystem that reorders writes). Loading takes the newest
`step_N` that verifies and reads back, warning about each newer one it skips. A `step_N` numbered
above the one being saved is from a run abandoned at a later step (resumed from an earlier
checkpoint), so saving removes it: the next resume can never pick a checkpoint from that past.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from areal_py.wire.weights import named_weights, write_error

log = logging.getLogger("trainer.checkpoint")
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint that fails verification or cannot be read back, or no usable checkpoint at all;
    the message names the directory or file."""


def _seal(path: Path) -> dict[str, Any]:
    """fsync `path` and return what the manifest records for it."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                    state: dict[str, Any], keep: int = 3) -> Path:
    """Write `step_<version>` atomically (see the module docstring), then keep the `keep` newest (0 = all).

    A failed write (a full disk) removes the partial copy, leaves every earlier checkpoint and `latest`
    as they were, and raises an OSError naming the checkpoint's path.
    """
    d = root / f"step_{state['version']:06d}"
    tmp = root / f".tmp_{d.name}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, module in modules.items():
            save_file({k: v.contiguous() for k, v in named_weights(module).items()}, str(tmp / f"{name}.safetensors"))
        for name, opt in optimizers.items():
            torch.save(opt.state_dict(), tmp / f"{name}.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        files = {f.name: _seal(f) for f in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
        _seal(tmp / MANIFEST)
        _fsync_dir(tmp)
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        (root / "latest.tmp").write_text(d.name)
        os.replace(root / "latest.tmp", root / "latest")
        _fsync_dir(root)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(d, e) from e
    _prune(root, state["version"], keep)
    return d


def _step_dirs(root: Path) -> dict[int, Path]:
    out = {}
    for d in root.glob("step_*"):
        m = _STEP_DIR.fullmatch(d.name)
        if m and d.is_dir():
            out[int(m.group(1))] = d
    return out


def _prune(root: Path, version: int, keep: int) -> None:
    """Drop checkpoints past `version` (an abandoned run's), all but the `keep` newest of the rest, and
    temp directories of saves that never finished (one writer per run, so none is in progress)."""
    dirs = _step_dirs(root)
    older = sorted(v for v in dirs if v <= version)
    stale = [dirs[v] for v in dirs if v > version] + ([dirs[v] for v in older[:-keep]] if keep else [])
    stale += [p for p in root.glob(".tmp_step_*") if p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)


def checkpoint_dirs(root: Path) -> list[Path]:
    """Every `step_N` under `root`, newest first; not yet verified (see `load_latest_checkpoint`)."""
    dirs = _step_dirs(root)
    return [dirs[v] for v in sorted(dirs, reverse=True)]


def verify_checkpoint(d: Path) -> None:
    """Raise CheckpointError naming the file unless every file in the manifest is there with its size and
    sha256. A checkpoint without a manifest but with a state.json predates manifests: it passes, and
    reading it back is its only check."""
    manifest = d / MANIFEST
    if not manifest.is_file():
        if (d / "state.json").is_file():
            return
        raise CheckpointError(f"{d} has no {MANIFEST}: not a complete checkpoint")
    try:
        files = json.loads(manifest.read_text())["files"]
        expected = {name: (int(meta["bytes"]), str(meta["sha256"])) for name, meta in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{manifest} is unreadable ({e!r})") from None
    for name, (size, sha) in expected.items():
        f = d / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f} has {f.stat().st_size} bytes, its manifest says {size} (truncated?)")
        if _seal(f)["sha256"] != sha:
            raise CheckpointError(f"{f} does not match the sha256 in its manifest (damaged)")


def _read(f: Path, reader: Any) -> Any:
    try:
        return reader(f)
    except Exception as e:  # safetensors, torch.load and json each raise their own types for a bad file
        raise CheckpointError(f"{f} cannot be read back ({type(e).__name__}: {e})") from e


def load_checkpoint(d: Path, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
    """Verify, read everything, then restore in place: a damaged checkpoint (CheckpointError) changes
    nothing. A module or optimizer the checkpoint lacks is a config mismatch, not damage: an error
    naming it, which no older checkpoint would fix."""
    verify_checkpoint(d)
    weights = {}
    for name, module in modules.items():
        f = d / f"{name}.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint {d} has no {f.name} (was it saved with another algo config?)")
        weights[name] = _read(f, lambda p: load_file(str(p)))
        missing = set(dict(module.named_parameters())) - set(weights[name])
        if missing:
            raise ValueError(f"checkpoint {f} lacks parameters {sorted(missing)[:5]}")
    opt_states = {name: _read(d / f"{name}.pt", lambda p: torch.load(p, weights_only=True)) for name in optimizers}
    state = _read(d / "state.json", lambda p: json.loads(p.read_text()))
    for name, module in modules.items():
        params = dict(module.named_parameters())
        with torch.no_grad():
            for k, t in weights[name].items():
                params[k].copy_(t)
    for name, opt in optimizers.items():
        opt.load_state_dict(opt_states[name])
    return state


def load_latest_checkpoint(root: Path, modules: dict[str, torch.nn.Module],
                           optimizers: dict[str, torch.optim.Optimizer]) -> tuple[Path, dict[str, Any]]:
    """Restore the newest checkpoint under `root` that verifies and reads back, warning about (and
    keeping, for inspection) each newer one skipped; CheckpointError naming `root` if none does."""
    bad = []
    for d in checkpoint_dirs(root):
        try:
            state = load_checkpoint(d, modules, optimizers)
        except CheckpointError as e:
            log.warning("checkpoint %s is unusable, trying an older one: %s", d, e)
            bad.append(f"{d.name}: {e}")
            continue
        if bad:
            log.warning("resuming from %s, older than the unusable %s", d, ", ".join(b.split(":")[0] for b in bad))
        return d, state
    if not bad:
        raise CheckpointError(f"no checkpoint under {root}: start the run without --resume")
    raise CheckpointError(f"no usable checkpoint under {root}:\n  " + "\n  ".join(bad)
                          + "\nstart the run without --resume under another run.name, or restore a checkpoint there")
