"""Decode attention as one C++ kernel over the slot K/V cache: every row at its own length, one call.

`decode_attention(q, keys, values, slots, lens, scale)` computes, for each decode row i, KV head h
and query head g of that KV head's group (GQA),

    out[i, h, g] = softmax(q[i, h, g] . keys[slots[i], h, :lens[i]]^T * scale) @ values[slots[i], h, :lens[i]]

reading the cache buffers (`[slots, Hkv, alloc, D]`, as `kv_cache.SlotKVCache` holds them) in place:
no view per bucket, no gather of scattered rows, no padding to the batch's longest row. The built
library (`CompiledKernel`) is called like that; its `append` also stores each row's new key and
value at position `lens[i] - 1` first (the decode step's cache write, fused). The C++ source, its
invariants and its entry points are in `attention_kernel_source`; `decode_attention_ref` is the
contract in plain torch.

Building: `torch.utils.cpp_extension.load_inline` with -O3 -march=native into a directory keyed by
the source's hash, the CPU's flags and torch's version (`source_key`: editing the source makes a new
directory, so a stale build is never loaded), under the per-machine cache ($AREAL_PY_EXT_DIR, else
$XDG_CACHE_HOME/areal-py/ext), so it compiles once per machine; later loads find the built library.
`load_kernel` never raises: a missing compiler or any build or load error gives a `KernelBuild`
with `fn=None` and the reason, and the caller keeps SDPA. A failed build is remembered in the build
directory (`build_failure`): later loads report it without compiling until the compiler or torch
changes, the marker is deleted, or $AREAL_PY_KERNEL_RETRY=1.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rollout_server.torch_engine.attention_kernel_source import CPP_SOURCE, FUNCTIONS
from rollout_server.torch_engine.build_failure import (
    clear_failure,
    failure_path,
    read_failure,
    record_failure,
    retry_requested,
)

__all__ = ["CompiledKernel", "KernelBuild", "build_dir", "decode_attention_ref", "is_built", "load_kernel",
           "remembered_failure"]

log = logging.getLogger(__name__)


CFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math")
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
AppendKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor,
                         torch.Tensor], torch.Tensor]
Builder = Callable[[str, Path], Kernel]


@dataclass(frozen=True)
class CompiledKernel:
    """The built library's entry points (`attention_kernel_source`). Calling it attends (`Kernel`);
    `append(q, keys, values, slots, lens, scale, k_new, v_new)` first stores row i's new key/value
    (`[rows, Hkv, D]`) at position `lens[i] - 1` of slot `slots[i]` (distinct slots), then attends."""

    attend: Kernel
    append: AppendKernel

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                 lens: torch.Tensor, scale: float) -> torch.Tensor:
        return self.attend(q, keys, values, slots, lens, scale)

    @classmethod
    def of(cls, module: object) -> CompiledKernel:
        return cls(*(getattr(module, name) for name in FUNCTIONS))


@dataclass(frozen=True)
class KernelBuild:
    """The outcome of building/loading the kernel: `fn` None means unusable, and `reason` says why."""

    fn: Kernel | None
    reason: str
    seconds: float = 0.0


def _cpu_flags() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def source_key() -> str:
    """What the built library depends on: the source, the flags, the CPU (for -march=native), torch."""
    text = "\n".join([CPP_SOURCE, " ".join(CFLAGS), _cpu_flags(), torch.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_root() -> Path:
    """$AREAL_PY_EXT_DIR, else $XDG_CACHE_HOME/areal-py/ext (~/.cache by default): per machine, not per run."""
    if os.environ.get("AREAL_PY_EXT_DIR"):
        return Path(os.environ["AREAL_PY_EXT_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "areal-py" / "ext"


def build_dir(root: Path | None = None) -> Path:
    return (root or build_root()) / f"decode_attention_{source_key()}"


def _module_name() -> str:
    return f"areal_decode_attention_{source_key()}"


def is_built(root: Path | None = None) -> bool:
    """True when this machine already has the library for this source (loading it costs no compile)."""
    return (build_dir(root) / f"{_module_name()}.so").exists()


def _load_inline(name: str, directory: Path) -> Kernel:
    from torch.utils.cpp_extension import load_inline

    directory.mkdir(parents=True, exist_ok=True)
    module = load_inline(name=name, cpp_sources=[CPP_SOURCE], functions=list(FUNCTIONS),
                         extra_cflags=list(CFLAGS), build_directory=str(directory), verbose=False)
    return CompiledKernel.of(module)


def _import_built(name: str, directory: Path) -> Kernel:
    """The already-built library, imported directly (no compiler, no ninja run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, directory / f"{name}.so")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {directory / name}.so")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return CompiledKernel.of(module)


def remembered_failure(root: Path | None = None) -> str | None:
    """Why the kernel is not built, when an earlier build on this machine failed and still applies
    (`build_failure.read_failure`; None with $AREAL_PY_KERNEL_RETRY=1 or once it is built)."""
    directory = build_dir(root)
    if is_built(root) or retry_requested():
        return None
    failed = read_failure(directory)
    return None if failed is None else failed.describe(failure_path(directory))


_loaded: dict[Path, KernelBuild] = {}


def load_kernel(root: Path | None = None, builder: Builder = _load_inline, build: bool = True) -> KernelBuild:
    """Load the kernel, building it first if this machine has not (with a log line: a compile takes
    tens of seconds); with `build=False` an unbuilt kernel is reported unusable instead.

    Never raises: any failure (no compiler, a compile error, an import error) is a `KernelBuild`
    with `fn=None` and the reason, logged as a warning. One load per process and directory. A build
    that failed before on this machine is not retried (`remembered_failure`)."""
    directory = build_dir(root)
    if directory in _loaded:
        return _loaded[directory]
    built = is_built(root)
    failed = remembered_failure(root)
    if failed is not None:
        return KernelBuild(None, failed)
    if not built and not build:
        return KernelBuild(None, "not built on this machine yet (areal-py run and serve build it before the roles "
                           "start)")
    if not built:
        log.info("building the decode attention kernel into %s (once per machine; a compile takes tens of seconds)",
                 directory)
    start = time.perf_counter()
    try:
        fn = _import_built(_module_name(), directory) if built and builder is _load_inline else \
            builder(_module_name(), directory)
    except Exception as e:  # noqa: BLE001 - a build may fail in any way; SDPA must keep the run going
        error = f"{type(e).__name__}: {str(e).strip()}"
        if not built:  # a compile failure repeats at every start: remember it (a load failure may not)
            record_failure(directory, error)
        result = KernelBuild(None, f"build/load failed: {error[:150]} ... {error[-150:]}" if len(error) > 300
                             else f"build/load failed: {error}", time.perf_counter() - start)
        log.warning("decode attention kernel unavailable (%s); using SDPA", result.reason)
    else:
        clear_failure(directory)
        seconds = time.perf_counter() - start
        result = KernelBuild(fn, "loaded" if built else f"built in {seconds:.0f}s", seconds)
        if not built:
            log.info("decode attention kernel %s", result.reason)
    _loaded[directory] = result
    return result


def decode_attention_ref(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                         lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The kernel's contract in plain torch (row by row SDPA in fp64): what the tests compare against."""
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        n, s = int(lens[i]), int(slots[i])
        k, v = keys[s, :, :n].double(), values[s, :, :n].double()  # [Hkv, n, D]
        w = torch.softmax(q[i].double() @ k.transpose(1, 2) * scale, dim=-1)  # [Hkv, G, n]
        out[i] = (w @ v).to(q.dtype)
    return out
