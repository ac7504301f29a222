"""A compiled decode step with a checked fallback to eager.

The fast runner's dense per-layer work (norms, projections, RoPE, MLP, LM head) is a handful of
small ops per layer whose per-op overhead dominates a decode step at few sequences; `torch.compile`
fuses them. The KV-cache writes and the attention stay eager, so the compiled graphs are pure
functions of `[T, hidden]` activations and the weights: compiled for the first row count seen,
then once more with the row count dynamic (torch.compile's automatic dynamic shapes).

Invariants:
- A step's result never comes from an unchecked compiled graph: the first decode step in each
  row-count bucket (powers of two), and any step during which a graph was (re)compiled, runs
  compiled, then eager, compares the logits (max |diff| <= `atol * max(1, max |eager|)`) and
  returns the eager logits; the eager run rewrites every K/V the compiled run wrote, so the cache
  holds eager values after a check.
- Any error (compiling or running) or a mismatch turns compilation off for good, with the reason
  logged and kept in `status.reason`; that step and every later one run eager.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["CheckedCompile", "CompileStatus", "row_bucket"]

log = logging.getLogger(__name__)


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters  # lazy: dynamo is imported only when compiling

    return counters["stats"]["unique_graphs"]


def row_bucket(rows: int) -> int:
    """The power of two at or above `rows`: a new bucket is checked against eager on its first step."""
    return 1 << max(0, rows - 1).bit_length()


@dataclass
class CompileStatus:
    """`active`: compiled steps are being used; `seconds`: wall time of the first compiled call of
    each bucket (compilation included); `reason`: why it fell back to eager (None while it has not)."""

    active: bool = True
    seconds: float = 0.0
    checked: list[int] = field(default_factory=list)
    compiled_steps: int = 0
    reason: str | None = None

    def describe(self) -> str:
        if self.reason is not None:
            return f"compile_decode=off ({self.reason})"
        return f"compile_decode=on ({self.seconds:.1f}s compiling, buckets {self.checked})"


class CheckedCompile:
    """Runs decode steps through compiled functions once they matched eager in their bucket.

    `compiler` maps a function to its compiled version (default: `torch.compile`);
    tests pass one that fails or perturbs the result to exercise the fallback."""

    def __init__(self, atol: float = 1e-4, compiler: Callable[[Callable], Callable] | None = None,
                 graphs: Callable[[], int] = _graphs_compiled) -> None:
        """`graphs`: how many graphs this process has compiled so far (a change during a step means
        that step ran a new, unchecked graph)."""
        self.atol = atol
        self.compiler = compiler or torch.compile
        self.graphs = graphs
        self.status = CompileStatus()

    def compile(self, fn: Callable) -> Callable:
        """Compiled `fn`, or `fn` itself (and compilation off) if the compiler refuses it."""
        if not self.status.active:
            return fn
        try:
            return self.compiler(fn)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: stay eager
            self._off(f"compile failed: {type(e).__name__}: {e}")
            return fn

    def step(self, rows: int, compiled: Callable[[], torch.Tensor], eager: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Logits of one decode step of `rows` rows: compiled once its bucket is checked, else eager."""
        if not self.status.active:
            return eager()
        bucket = row_bucket(rows)
        graphs, start = self.graphs(), time.perf_counter()
        try:
            got = compiled()
        except Exception as e:  # noqa: BLE001 - inductor/dynamo raise many types; all mean: stay eager
            self._off(f"compiled step failed at {rows} rows: {type(e).__name__}: {str(e)[:200]}")
            return eager()
        if bucket in self.status.checked and self.graphs() == graphs:
            self.status.compiled_steps += 1
            return got
        seconds = time.perf_counter() - start
        self.status.seconds += seconds
        ref = eager()
        err = (got - ref).abs().max().item() if got.shape == ref.shape else float("inf")
        bound = self.atol * max(1.0, ref.abs().max().item())
        if not err <= bound:  # also catches NaN
            self._off(f"compiled logits differ from eager by {err:.3g} (> {bound:.3g}) at {rows} rows")
        elif bucket not in self.status.checked:
            self.status.checked.append(bucket)
            log.info("compiled decode step checked at %d rows (bucket %d): max |diff| %.2g, first call %.2fs",
                     rows, bucket, err, seconds)
        return ref

    def _off(self, reason: str) -> None:
        self.status.active, self.status.reason = False, reason
        log.warning("compiled decode step off, running eager: %s", reason)
