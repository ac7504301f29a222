"""A failed kernel build, remembered per machine so later starts do not pay for the compile again.

A compile of the decode attention kernel takes about a minute of CPU; when it fails (no compiler,
a broken toolchain, a header mismatch) it fails the same way at every start. `load_kernel` writes a
`BuildFailure` marker next to the build directory, and every later load reads it instead of
compiling. The marker is one JSON file per build directory, so it is already specific to the
kernel source, the compile flags, the CPU and torch's version (the directory name hashes them).

Invariants:
- A marker applies only while what the build depended on is unchanged: the same torch version
  and the same compiler (the `CXX` environment variable and the path it resolves to). Fixing the
  compiler setting or upgrading torch retries on its own; so does deleting the marker or setting
  `AREAL_PY_KERNEL_RETRY=1` (`RETRY_ENV`), which ignores the marker and rebuilds.
- An unreadable or malformed marker counts as absent (the build is retried), never as an error.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ValidationError

__all__ = ["RETRY_ENV", "BuildFailure", "clear_failure", "compiler", "failure_path", "read_failure",
           "record_failure", "retry_requested"]

RETRY_ENV = "AREAL_PY_KERNEL_RETRY"
MARKER = "BUILD_FAILED.json"
ERROR_CHARS = 4000  # the tail of a compiler's output holds its error; keep enough of it to read


class BuildFailure(BaseModel):
    """What failed, where and under which toolchain. `digest` identifies the error text."""

    error: str
    digest: str
    torch: str
    compiler: str
    at: str

    def describe(self, path: Path) -> str:
        last = self.error.strip().splitlines()[-1][:200] if self.error.strip() else "no output"
        return (f"an earlier build on this machine failed (error {self.digest}, {self.at}: {last}); not retried: "
                f"delete {path} or set {RETRY_ENV}=1 to build again")


def compiler() -> str:
    """The C++ compiler a build would use: `$CXX` (default c++) and the file it resolves to."""
    name = os.environ.get("CXX") or "c++"
    return f"{name} -> {shutil.which(name) or 'not found'}"


def failure_path(build_dir: Path) -> Path:
    return build_dir / MARKER


def retry_requested() -> bool:
    return os.environ.get(RETRY_ENV, "").strip().lower() not in ("", "0", "false", "no")


def record_failure(build_dir: Path, error: str) -> BuildFailure | None:
    """Write the marker for a failed build (None, quietly, if the directory is not writable)."""
    tail = error[-ERROR_CHARS:]
    failure = BuildFailure(error=tail, digest=hashlib.sha256(error.encode()).hexdigest()[:12],
                           torch=torch.__version__, compiler=compiler(),
                           at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        failure_path(build_dir).write_text(failure.model_dump_json(indent=1))
    except OSError:
        return None
    return failure


def read_failure(build_dir: Path) -> BuildFailure | None:
    """The remembered failure that still applies here (same torch, same compiler), else None."""
    try:
        failure = BuildFailure.model_validate_json(failure_path(build_dir).read_text())
    except (OSError, ValueError, ValidationError):
        return None
    if failure.torch != torch.__version__ or failure.compiler != compiler():
        return None
    return failure


def clear_failure(build_dir: Path) -> None:
    with contextlib.suppress(OSError):
        failure_path(build_dir).unlink()
