"""Checking a published weight file before anything loads it: where it is, what it hashes to, which version.

The trainer writes version v to exactly one place, `weights_path(weights.dir, v)` (`save_weights`), and
publishes that path with the SHA-256 of the file. A receiver accepts a notice only when

- the path is absolute, has no `..` component and is named `v{v:06d}.safetensors` (`path_problem`: no disk
  needed, so the controller can check it too);
- it resolves, symlinks followed, to exactly that name in the receiver's own resolved weights directory
  (a symlink pointing out of it, or a file elsewhere, is refused);
- it is a regular file (not a FIFO or device that could block or never end), opened without following a
  symlink swapped in after the check;
- the bytes read hash to the published SHA-256, and the safetensors header's `version` metadata is v.

The bytes are read once, hashed, and deserialized from that same buffer, so a file replaced between the
check and the load cannot slip in (for an in-process model; a backend that loads the path itself, SGLang,
reopens it). Every refusal is a `WeightFileError` whose `reason` is the metric label.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path, PurePath

import torch
from safetensors.torch import load

from areal_py.wire.weights import weights_path

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own bound on the JSON header


class WeightFileError(ValueError):
    """A weight notice or file refused; `reason` (weights_path, weights_hash, bad_weights) labels the metric."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def path_problem(path: str, version: int) -> str | None:
    """Why `path` cannot be the file of `version` by its text alone, or None: it must be absolute, hold no
    `..` component and be named `v{version:06d}.safetensors` (the one name `save_weights` gives it)."""
    p = PurePath(path)
    if not p.is_absolute():
        return f"weight path {path!r} is not absolute"
    if ".." in p.parts:
        return f"weight path {path!r} has a '..' component"
    expected = weights_path(Path("."), version).name
    if p.name != expected:
        return f"weight path {path!r} is not named {expected} (version {version})"
    return None


def confined_path(path: str, weights_dir: Path, version: int) -> Path:
    """`path` resolved (symlinks followed, must exist), if it is exactly the file of `version` in the resolved
    `weights_dir`; else WeightFileError(weights_path)."""
    problem = path_problem(path, version)
    if problem is not None:
        raise WeightFileError("weights_path", problem)
    expected = weights_path(Path(weights_dir).expanduser().resolve(), version)
    try:
        resolved = Path(path).resolve(strict=True)
    except (OSError, RuntimeError) as e:  # missing, a symlink loop
        raise WeightFileError("weights_path", f"weight path {path!r} does not resolve: {e}") from None
    if resolved != expected:
        raise WeightFileError("weights_path", f"weight path {path!r} resolves to {resolved}, not {expected} "
                              "(weights are loaded only from this run's weights.dir)")
    return resolved


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` map of a safetensors buffer: 8 bytes little-endian header length n, then n bytes of
    JSON. WeightFileError(bad_weights) when the buffer is not shaped so."""
    if len(data) < 8:
        raise WeightFileError("bad_weights", f"{len(data)} bytes: too short for a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n > min(MAX_HEADER_BYTES, len(data) - 8):
        raise WeightFileError("bad_weights", f"safetensors header of {n} bytes in a {len(data)}-byte file")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightFileError("bad_weights", f"safetensors header is not JSON: {e}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def read_verified(path: str, weights_dir: Path, version: int, sha256: str | None) -> tuple[Path, bytes]:
    """(resolved path, its bytes) once every rule of the module docstring holds; else WeightFileError."""
    if sha256 is None:
        raise WeightFileError("weights_hash", f"weight notice for version {version} carries no sha256")
    resolved = confined_path(path, weights_dir, version)
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise WeightFileError("weights_path", f"cannot open {resolved}: {e}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise WeightFileError("weights_path", f"{resolved} is not a regular file")
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise WeightFileError("weights_hash", f"{resolved} hashes to {digest}, the notice says {sha256}")
    got = header_metadata(data).get("version")
    if got != str(version):
        raise WeightFileError("bad_weights", f"{resolved} holds version {got!r} by its metadata, not {version}")
    return resolved, data


def load_verified(path: str, weights_dir: Path, version: int, sha256: str | None) -> dict[str, torch.Tensor]:
    """The tensors of a checked weight file, deserialized from the very bytes that were hashed."""
    resolved, data = read_verified(path, weights_dir, version, sha256)
    try:
        return load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError on a corrupt body
        raise WeightFileError("bad_weights", f"{resolved}: not loadable as safetensors: {e}") from None
