"""Checkpoints: model weights and optimizer state, sharded across the trainer's ranks, and the run's position.

The tensors are written with `torch.distributed.checkpoint` (DCP): every rank writes its own shards
(`__<rank>_<i>.distcp`), rank 0 the `.metadata` that maps each tensor to its pieces. The state dicts
come from `get_model_state_dict` / `get_optimizer_state_dict` (keyed by parameter name, DTensor
shards under FSDP2, plain tensors at world size 1) and go back through `set_*`, so a checkpoint
written at one world size loads at another: DCP reads whichever pieces each rank's shards need.
At world size 1 there is no process group and DCP runs in-process. The directory is assumed to be
on a filesystem every rank sees (DCP's own requirement for loading at another world size).

The position is what makes resume exact: the trainer version, the controller's data position and
counters as of the last trained batch, and the wall time used so far (`state.json`, from rank 0).

Crash safety. A checkpoint is written into `.tmp_step_N`, each file fsynced (DCP's `sync_files`
for the shards), then, once every rank's shards are down, `manifest.json` (every file's size and
sha256; each rank hashes a share of the files) is written last by rank 0, and the directory
renamed to `step_N`; only then does `latest` name it. So a `step_N` directory was complete when
written, and the manifest tells whether it still is (a bad copy, a disk error, a power loss on a
filesystem that reorders writes). Loading takes the newest `step_N` that verifies and reads back,
warning about each newer one it skips. A `step_N` numbered above the one being saved is from a run
abandoned at a later step (resumed from an earlier checkpoint), so saving removes it: the next
resume can never pick a checkpoint from that past.

Ranks agree at every step: after each phase they exchange "done" or the error (as JSON over an
all-reduce, `_exchange`), so a failure on any rank fails the save or the load on all of them with
its message, and all ranks fall back to the same older checkpoint.

Checkpoints from before DCP (`<name>.safetensors` + `<name>.pt`) are refused with
`OldFormatCheckpointError` naming the directory: no older checkpoint of that run would do better.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from areal_py.wire.weights import write_error
from trainer.distributed import Dist, all_reduce

log = logging.getLogger("trainer.checkpoint")
MANIFEST = "manifest.json"
STATE = "state.json"
DCP_METADATA = ".metadata"
_STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint that fails verification or cannot be read back, or no usable checkpoint at all;
    the message names the directory or file."""


class OldFormatCheckpointError(CheckpointError):
    """A checkpoint written before checkpoints were sharded (safetensors + torch.save files)."""


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


def _exchange(value: Any, dist: Dist, what: str) -> list[Any]:
    """Every rank's JSON-able `value`, in rank order (UTF-8 bytes summed into a zeroed [world, n] tensor:
    two all-reduces, each bounded by the group's timeout and named by `what`). Also a barrier."""
    if not dist.distributed:
        return [value]
    data = json.dumps(value).encode()
    sizes = torch.zeros(dist.world_size, dtype=torch.int64, device=dist.device)
    sizes[dist.rank] = len(data)
    all_reduce(sizes, dist, f"{what} (sizes)")
    buf = torch.zeros(dist.world_size, int(sizes.max()), dtype=torch.uint8, device=dist.device)
    buf[dist.rank, :len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dist.device)
    all_reduce(buf, dist, what)
    rows = buf.cpu()
    return [json.loads(bytes(rows[r, :int(sizes[r])].tolist())) for r in range(dist.world_size)]


def _agree(error: str | None, dist: Dist, what: str) -> list[str]:
    """Exchange each rank's error (None = done) after `what`; the errors, prefixed with their rank."""
    errors = _exchange(error, dist, f"checkpoint: {what}")
    return [f"rank {r}: {e}" if dist.distributed else e for r, e in enumerate(errors) if e is not None]


@contextmanager
def _dcp_in_process(dist: Dist):
    """DCP warns on every save and load without a process group; at world size 1 that is the intent."""
    with warnings.catch_warnings():
        if not dist.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _owner(opt: torch.optim.Optimizer, modules: dict[str, torch.nn.Module], name: str) -> torch.nn.Module:
    """The module whose parameters `opt` updates (DCP keys optimizer state by that module's names)."""
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    for module in modules.values():
        if ids and ids <= {id(p) for p in module.parameters()}:
            return module
    raise ValueError(f"optimizer {name!r} updates parameters of none of the modules {sorted(modules)}")


def _state_dicts(modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
    """What DCP writes and reads: {"modules": {name: state}, "optimizers": {name: state}} (two namespaces,
    so a module and an optimizer may share a name). An optimizer that has not stepped yet gets its state
    here (zero moments at step 1, DCP's doing; `save_checkpoint` saves it as step 0 and clears it)."""
    return {"modules": {name: get_model_state_dict(m) for name, m in modules.items()},
            "optimizers": {name: get_optimizer_state_dict(_owner(opt, modules, name), opt)
                           for name, opt in optimizers.items()}}


def save_checkpoint(root: Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                    state: dict[str, Any], keep: int = 3, dist: Dist | None = None) -> Path:
    """Write `step_<version>` atomically (see the module docstring), then keep the `keep` newest (0 = all).

    Called on every rank with its shards of `modules` and `optimizers`; `state` is written by rank 0.
    A failed write on any rank (a full disk) removes the partial copy, leaves every earlier checkpoint
    and `latest` as they were, and raises an OSError naming the checkpoint's path on every rank.
    """
    dist = dist or Dist.single()
    d = root / f"step_{state['version']:06d}"
    tmp = root / f".tmp_{d.name}"

    def phase(what: str, fn) -> Any:
        out = err = None
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 -- any failure on any rank fails the save on every rank
            err = e
        errors = _agree(None if err is None else f"{type(err).__name__}: {err}", dist, what)
        if errors:
            if dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            cause = err  # world size 1: the error itself; several ranks: all of theirs, this rank's errno
            if dist.distributed:
                joined = "; ".join(errors)
                cause = OSError(err.errno, joined) if isinstance(err, OSError) and err.errno else OSError(joined)
            raise write_error(d, cause) from err
        return out

    def prepare() -> None:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            (tmp / STATE).write_text(json.dumps(state, indent=1))

    def write_and_hash() -> dict[str, Any]:
        fresh = {name: opt for name, opt in optimizers.items() if not opt.state}
        try:
            sds = _state_dicts(modules, optimizers)
            for name in fresh:  # DCP gave it zero moments at step 1: saved as step 0, a fresh optimizer's state
                for st in sds["optimizers"][name]["state"].values():
                    if "step" in st:
                        st["step"] = torch.zeros_like(st["step"])
            with _dcp_in_process(dist):
                dcp.save(sds, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), no_dist=not dist.distributed)
        finally:
            for opt in fresh.values():  # and the live run goes on as if it had never been saved
                opt.state.clear()
        files = sorted(p for p in tmp.rglob("*") if p.is_file())  # dcp.save returned: every rank's shards are there
        return {str(p.relative_to(tmp)): _seal(p) for p in files[dist.rank::dist.world_size]}

    def seal(parts: list[dict[str, Any]]) -> None:
        if dist.is_main:
            files = {name: meta for part in parts for name, meta in sorted(part.items())}
            (tmp / MANIFEST).write_text(json.dumps({"files": dict(sorted(files.items()))}, indent=1))
            _seal(tmp / MANIFEST)
            _fsync_dir(tmp)
            shutil.rmtree(d, ignore_errors=True)
            os.replace(tmp, d)
            (root / "latest.tmp").write_text(d.name)
            os.replace(root / "latest.tmp", root / "latest")
            _fsync_dir(root)

    phase(f"preparing {tmp}", prepare)
    mine = phase(f"writing the shards of {tmp}", write_and_hash)
    parts = _exchange(mine, dist, f"checkpoint: manifest entries of {tmp}")
    phase(f"sealing {d}", lambda: seal(parts))
    if dist.is_main:
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


def _check_format(d: Path) -> None:
    """OldFormatCheckpointError unless `d` was written by DCP (its `.metadata` is there, or it is
    not recognisably an old checkpoint either and verification will name what is wrong)."""
    if (d / DCP_METADATA).is_file() or ((d / MANIFEST).is_file() and DCP_METADATA in _manifest_names(d)):
        return
    old = sorted(p.name for p in d.glob("*.safetensors")) + sorted(p.name for p in d.glob("*.pt"))
    if old:
        raise OldFormatCheckpointError(
            f"{d} is a checkpoint from before sharded (torch.distributed.checkpoint) checkpoints ({', '.join(old)}); "
            "this version cannot resume it: finish that run with the areal-py version that wrote it, or start "
            "a new run without --resume (or under another run.name)")


def _manifest_names(d: Path) -> set[str]:
    try:
        return set(json.loads((d / MANIFEST).read_text())["files"])
    except (ValueError, KeyError, TypeError, OSError):
        return set()


def verify_checkpoint(d: Path, dist: Dist | None = None) -> None:
    """Raise CheckpointError naming the file unless every file in the manifest is there with its size and
    sha256. With several ranks each hashes a share of the files and all raise if any share fails."""
    dist = dist or Dist.single()
    manifest = d / MANIFEST
    err = None
    try:
        if not manifest.is_file():
            raise CheckpointError(f"{d} has no {MANIFEST}: not a complete checkpoint")
        try:
            files = json.loads(manifest.read_text())["files"]
            expected = {name: (int(meta["bytes"]), str(meta["sha256"])) for name, meta in files.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{manifest} is unreadable ({e!r})") from None
        for name, (size, sha) in sorted(expected.items())[dist.rank::dist.world_size]:
            f = d / name
            if not f.is_file():
                raise CheckpointError(f"{f} is missing")
            if f.stat().st_size != size:
                raise CheckpointError(f"{f} has {f.stat().st_size} bytes, its manifest says {size} (truncated?)")
            if _seal(f)["sha256"] != sha:
                raise CheckpointError(f"{f} does not match the sha256 in its manifest (damaged)")
    except CheckpointError as e:
        err = str(e)
    errors = _agree(err, dist, f"verifying {d}")
    if errors:
        raise CheckpointError("; ".join(errors))


def _read(f: Path, reader: Any) -> Any:
    try:
        return reader(f)
    except Exception as e:  # DCP and json each raise their own types for a bad file
        raise CheckpointError(f"{f} cannot be read back ({type(e).__name__}: {e})") from e


def _check_keys(d: Path, saved: set[str], wanted: dict[str, Any]) -> None:
    """A module or optimizer the checkpoint lacks is a config mismatch, not damage: an error naming it,
    which no older checkpoint would fix."""
    for kind, states in wanted.items():
        for name, sd in states.items():
            prefix = f"{kind}.{name}."
            if not any(k.startswith(prefix) for k in saved):
                raise FileNotFoundError(f"checkpoint {d} has no {kind[:-1]} {name!r} "
                                        "(was it saved with another algo config?)")
            if kind == "modules":
                missing = sorted(k for k in sd if prefix + k not in saved)
                if missing:
                    raise ValueError(f"checkpoint {d} lacks parameters {missing[:5]} of {name!r}")


def load_checkpoint(d: Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                    dist: Dist | None = None) -> dict[str, Any]:
    """Verify, read, then restore every module and optimizer; the run position (state.json) is returned.

    DCP reads into the tensors of the state dicts in place, so a checkpoint that verifies but fails while
    being read back (CheckpointError on every rank) can leave the modules partly restored: the caller
    then loads an older checkpoint, which overwrites every tensor, or stops.
    """
    dist = dist or Dist.single()
    _check_format(d)
    verify_checkpoint(d, dist)
    sds = _state_dicts(modules, optimizers)
    err, mismatch = None, None
    try:
        saved = set(_read(d / DCP_METADATA, lambda p: dcp.FileSystemReader(d).read_metadata()).state_dict_metadata)
        _check_keys(d, saved, sds)
        state = _read(d / STATE, lambda p: json.loads(p.read_text()))
        with _dcp_in_process(dist):
            _read(d, lambda p: dcp.load(sds, storage_reader=dcp.FileSystemReader(p), no_dist=not dist.distributed))
    except CheckpointError as e:
        err = str(e)
    except (FileNotFoundError, ValueError) as e:  # a config mismatch: every rank reads the same metadata
        err, mismatch = f"{type(e).__name__}: {e}", e
    errors = _agree(err, dist, f"reading {d}")
    if mismatch is not None:
        raise mismatch
    if errors:
        raise CheckpointError("; ".join(errors))
    for name, module in modules.items():
        set_model_state_dict(module, sds["modules"][name])
    for name, opt in optimizers.items():
        set_optimizer_state_dict(_owner(opt, modules, name), opt, sds["optimizers"][name])
    return state


def load_latest_checkpoint(root: Path, modules: dict[str, torch.nn.Module],
                           optimizers: dict[str, torch.optim.Optimizer],
                           dist: Dist | None = None) -> tuple[Path, dict[str, Any]]:
    """Restore the newest checkpoint under `root` that verifies and reads back, warning about (and
    keeping, for inspection) each newer one skipped; CheckpointError naming `root` if none does.
    Every rank calls it and all pick the same checkpoint (they agree on each one's verdict)."""
    bad = []
    for d in checkpoint_dirs(root):
        try:
            state = load_checkpoint(d, modules, optimizers, dist)
        except OldFormatCheckpointError:
            raise
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
