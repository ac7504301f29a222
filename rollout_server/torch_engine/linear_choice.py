"""Which linear kernel the fast runner uses, chosen by timing on the runner's own shapes at start-up.

Candidates are `F.linear` (the reference: MKL sgemm / cuBLAS) and, on CPU for fp32/bf16, oneDNN's
linear. Which one is faster depends on the CPU (AVX-512 or not), the thread count and the number
of token rows, so it is measured, not assumed: each candidate runs every distinct weight shape of
one layer plus the LM head on the rows the runner will feed, interleaved in rounds, a few ms each;
per shape class ("decode": at most `decode_max_rows` token rows in a step, "prefill": more) the
faster candidate that agrees with `F.linear` wins.

Invariants:
- A kernel whose output differs from `F.linear` beyond fp32 rounding (bf16 rounding for bf16) on
  the runner's real weights is never chosen, whatever its timing; the agreement check runs at every
  start, also when the choice comes from the cache.
- The choice is cached per machine (CPU model and AVX-512, torch version, threads, device, dtype)
  and shape (weight shapes, probe rows, candidate names) in a small JSON file. A corrupt or
  unwritable cache is ignored with a warning; it never stops the engine.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["REFERENCE", "LinearChoice", "choose_kernel", "default_cache_path", "pick_linears", "time_calls",
           "time_kernels"]

log = logging.getLogger(__name__)

Linear = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Weights = Sequence[tuple[torch.Tensor, "torch.Tensor | None"]]
REFERENCE = "f_linear"
CACHE_FORMAT = 1
MAX_CACHE_ENTRIES = 64  # oldest dropped first: tests and sweeps create many shapes
# A challenger must beat the reference by this fraction: two kernels within timing noise keep the reference.
MARGIN = 0.02


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def candidates(device: torch.device, dtype: torch.dtype) -> dict[str, Linear]:
    """The kernels worth timing here; `F.linear` is always first."""
    out: dict[str, Linear] = {REFERENCE: F.linear}
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available():
        out["onednn"] = _onednn_linear
    return out


@dataclass(frozen=True)
class LinearChoice:
    """The kernel per shape class, and how it was decided.

    `source`: "timed" (measured now), "cache" (read from the cache file), "only" (one candidate).
    `seconds`: class -> kernel -> median seconds of one pass over the probe shapes (empty unless timed
    now or cached). `refused`: candidates that disagreed with `F.linear` and were never considered.
    """

    decode: str
    prefill: str
    decode_max_rows: int
    source: str
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    refused: tuple[str, ...] = ()

    def for_rows(self, rows: int) -> str:
        return self.decode if rows <= self.decode_max_rows else self.prefill

    def describe(self) -> str:
        refused = f", refused {','.join(self.refused)}" if self.refused else ""
        return f"linear decode={self.decode} prefill={self.prefill} ({self.source}{refused})"


def choose_kernel(seconds: Mapping[str, float], agrees: Mapping[str, bool], reference: str = REFERENCE,
                  margin: float = MARGIN) -> str:
    """The fastest kernel that agrees with the reference; the reference unless another beats it by `margin`.

    Pure: `seconds` maps kernel -> measured time, `agrees` kernel -> passed the agreement check.
    A kernel missing from either map is not a candidate; the reference always is.
    """
    best, best_s = reference, seconds.get(reference, float("inf"))
    for name, s in sorted(seconds.items(), key=lambda kv: kv[1]):
        if name != reference and agrees.get(name, False) and s < best_s * (1 - margin):
            best, best_s = name, s
            break
    return best


def agrees_with_reference(kernel: Linear, weights: Weights, rows: int, dtype: torch.dtype) -> bool:
    """`kernel` equals `F.linear` to the dtype's rounding on these weights (2-D input of `rows` rows),
    and on a small 3-D input; an exception counts as disagreement."""
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    gen = torch.Generator().manual_seed(0)
    try:
        for w, b in weights:
            x = torch.randn(rows, w.shape[1], generator=gen, dtype=torch.float32).to(w.device, w.dtype)
            ref = F.linear(x, w, b)
            if not torch.allclose(kernel(x, w, b), ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item())):
                return False
        w, b = weights[0]
        x = torch.randn(3, 1, w.shape[1], generator=gen, dtype=torch.float32).to(w.device, w.dtype)
        return torch.allclose(kernel(x, w, None), F.linear(x, w), rtol=tol, atol=tol)
    except (RuntimeError, AttributeError, TypeError):
        return False


def time_calls(calls: Mapping[str, Callable[[], object]], budget_s: float = 0.02, rounds: int = 5,
               clock: Callable[[], float] | None = None) -> dict[str, float]:
    """Median seconds of one call per name, rounds interleaved, after one warm-up call each.

    Each gets about `budget_s` in all (at least one call per round). `clock` None: process CPU time
    with one torch thread (other processes' load does not count), wall time with several."""
    clock = clock or (time.process_time if torch.get_num_threads() == 1 else time.perf_counter)
    for call in calls.values():
        call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            reps, start = 0, clock()
            while True:
                call()
                reps += 1
                elapsed = clock() - start
                if elapsed >= budget_s / rounds:
                    break
            samples[name].append(elapsed / reps)
    return {name: statistics.median(v) for name, v in samples.items()}


def time_kernels(kernels: Mapping[str, Linear], weights: Weights, rows: Sequence[int], budget_s: float = 0.005,
                 rounds: int = 5, clock: Callable[[], float] | None = None) -> dict[str, float]:
    """Median seconds of one pass (every weight at every row count) per kernel, rounds interleaved.

    Each kernel gets about `budget_s` in all (at least one pass per round), after one warm-up pass.
    `clock` None: process CPU time with one torch thread (other processes' load does not count
    against a kernel), wall time with several (their waits are part of the kernel's cost)."""
    gen = torch.Generator().manual_seed(0)
    w0 = weights[0][0]
    inputs = {(n, d): torch.randn(n, d, generator=gen).to(w0.device, w0.dtype)
              for n in rows for d in {w.shape[1] for w, _ in weights}}

    def one_pass(kernel: Linear) -> None:
        for n in rows:
            for w, b in weights:
                kernel(inputs[n, w.shape[1]], w, b)

    return time_calls({name: (lambda k=kernel: one_pass(k)) for name, kernel in kernels.items()}, budget_s, rounds, clock)


# --- the cache -------------------------------------------------------------------------------------
def default_cache_path() -> Path:
    """$AREAL_PY_KERNEL_CACHE, else $XDG_CACHE_HOME/areal-py/kernels.json (~/.cache by default)."""
    if os.environ.get("AREAL_PY_KERNEL_CACHE"):
        return Path(os.environ["AREAL_PY_KERNEL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "areal-py" / "kernels.json"


def machine() -> dict[str, object]:
    """What a timing depends on besides the shapes."""
    cpu, avx512 = platform.processor() or platform.machine(), False
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                avx512 = " avx512f" in line
                break
    return {"cpu": cpu, "avx512": avx512, "torch": torch.__version__, "threads": torch.get_num_threads()}


def cache_key(fields: Mapping[str, object]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def read_cache(path: Path) -> dict[str, dict]:
    """The cache's entries; {} if it is absent, and {} with a warning if it is unreadable or corrupt."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("kernel cache %s is unreadable (%s); ignoring it", path, e)
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
        log.warning("kernel cache %s has an unknown layout; ignoring it", path)
        return {}
    return data["entries"]


def write_cache(path: Path, key: str, entry: dict) -> None:
    """Add one entry (atomic replace); any failure is a warning."""
    try:
        entries = read_cache(path)
        entries.pop(key, None)
        entries[key] = entry
        entries = dict(list(entries.items())[-MAX_CACHE_ENTRIES:])
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kernels-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": CACHE_FORMAT, "entries": entries}, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot write kernel cache %s (%s); the choice is not cached", path, e)


def _from_cache(entry: object, names: set[str]) -> tuple[str, str, dict] | None:
    if not isinstance(entry, dict):
        return None
    dec, pre, sec = entry.get("decode"), entry.get("prefill"), entry.get("seconds", {})
    if dec in names and pre in names and isinstance(sec, dict):
        return dec, pre, sec
    return None


# --- the choice --------------------------------------------------------------------------------------
def pick_linears(weights: Weights, decode_rows: Sequence[int], prefill_rows: Sequence[int], *,
                 cache_path: Path | None = None, kernels: Mapping[str, Linear] | None = None,
                 timer: Callable[..., dict[str, float]] = time_kernels) -> LinearChoice:
    """Time every agreeing candidate on `weights` at `decode_rows` and at `prefill_rows`, choose per class.

    `decode_max_rows` is max(decode_rows). `cache_path` None: no cache. `kernels` None: `candidates`."""
    w0 = weights[0][0]
    kernels = dict(kernels) if kernels is not None else candidates(w0.device, w0.dtype)
    decode_max = max(decode_rows)
    agree = {name: name == REFERENCE or agrees_with_reference(k, weights, max(prefill_rows), w0.dtype)
             for name, k in kernels.items()}
    refused = tuple(n for n, ok in agree.items() if not ok)
    for name in refused:
        log.warning("linear kernel %s disagrees with F.linear on this model; not used", name)
    usable = {n: k for n, k in kernels.items() if agree[n]}
    if len(usable) == 1:
        return LinearChoice(REFERENCE, REFERENCE, decode_max, "only", refused=refused)
    fields = {**machine(), "device": str(w0.device), "dtype": str(w0.dtype), "decode_rows": list(decode_rows),
              "prefill_rows": list(prefill_rows), "kernels": sorted(usable),
              "weights": [[*w.shape, b is not None] for w, b in weights]}
    key = cache_key(fields)
    if cache_path is not None:
        hit = _from_cache(read_cache(cache_path).get(key), set(usable))
        if hit is not None:
            return LinearChoice(hit[0], hit[1], decode_max, "cache", hit[2], refused)
    seconds = {"decode": timer(usable, weights, decode_rows), "prefill": timer(usable, weights, prefill_rows)}
    choice = LinearChoice(choose_kernel(seconds["decode"], agree), choose_kernel(seconds["prefill"], agree),
                          decode_max, "timed", seconds, refused)
    log.info("%s; seconds per probe pass %s", choice.describe(), seconds)
    if cache_path is not None:
        entry = {k: v for k, v in asdict(choice).items() if k in ("decode", "prefill", "seconds")}
        write_cache(cache_path, key, {**entry, "machine": fields, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                      time.gmtime())})
    return choice
