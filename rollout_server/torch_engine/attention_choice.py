"""Which decode attention the fast runner uses: SDPA or the C++ kernel, chosen by timing at start-up.

Variants: "sdpa" (the reference: PyTorch's fused attention per contiguous bucket of rows, as the
runner has always done) and "kernel" (`attention_kernel`: one call for every row at its own
length). `rollout.decode_attention` picks: "auto" times both on the runner's own head shapes,
"sdpa" never builds the kernel, "kernel" uses it without timing.

Invariants:
- The kernel is used only when it loaded and agreed with SDPA on the runner's head shapes
  (ragged lengths including a row of length 1, scattered slots) to 1e-5 of the output's scale in
  fp32 (2e-2 in 16-bit dtypes); the check runs at every start, also with "kernel" forced or the
  choice cached. Otherwise the runner uses SDPA and `AttentionChoice.reason` says why: a missing
  compiler or a wrong kernel never breaks or corrupts a run.
- A timed choice is cached per machine, torch, threads, device, dtype, head shape, probe shapes
  and kernel source in the linear kernels' cache file (`linear_choice`), under its own key.
- The kernel is CPU-only; on another device the choice is SDPA.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from rollout_server.torch_engine.attention_kernel import Kernel, KernelBuild, load_kernel, source_key
from rollout_server.torch_engine.linear_choice import (
    cache_key,
    choose_kernel,
    machine,
    read_cache,
    time_calls,
    write_cache,
)

__all__ = ["AttentionChoice", "Mode", "kernel_agrees", "pick_attention", "probe_shapes", "sdpa_decode"]

log = logging.getLogger(__name__)

Mode = Literal["auto", "sdpa", "kernel"]
REFERENCE = "sdpa"
KERNEL = "kernel"


@dataclass(frozen=True)
class AttentionChoice:
    """The decode attention variant and how it was decided.

    `source`: "timed" (measured now), "cache" (read from the cache file), "forced" (the config named
    it), "fallback" (the kernel was wanted but is unusable here: `reason` says why).
    `seconds`: variant -> median seconds of one probe pass (empty unless timed now or cached)."""

    variant: Literal["sdpa", "kernel"]
    source: str
    reason: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        why = f", {self.reason}" if self.reason else ""
        return f"decode attention={self.variant} ({self.source}{why})"


def sdpa_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The kernel's contract through one SDPA call: rows read from `slots` (a view when they are a
    contiguous range, as the runner reads them, else gathered) up to the longest length, shorter rows
    masked. q [B, Hkv, G, D], keys/values [S, Hkv, alloc, D] -> [B, Hkv, G, D]."""
    n, lo = int(lens.max()), int(slots[0])
    if torch.equal(slots, torch.arange(lo, lo + len(slots), device=slots.device)):
        k, v = keys[lo:lo + len(slots), :, :n], values[lo:lo + len(slots), :, :n]
    else:
        k, v = keys[:, :, :n].index_select(0, slots), values[:, :, :n].index_select(0, slots)
    allowed = torch.arange(n, device=q.device)[None, :] < lens[:, None]
    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None], scale=scale)


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2


def kernel_agrees(fn: Kernel, num_kv_heads: int, group: int, head_dim: int, dtype: torch.dtype,
                  device: torch.device) -> bool:
    """`fn` equals SDPA on these head shapes: ragged lengths (one of them 1), scattered slots, GQA as
    given; to `_tolerance(dtype)` of the output's largest magnitude. With an `append` (the built kernel),
    that also stores exactly each row's new K/V and then equals `fn` on the updated cache, bitwise. An
    exception counts as disagreement."""
    gen = torch.Generator().manual_seed(0)
    lens = [1, 3, 17, 64, 40, 2]
    slots = [5, 0, 7, 2, 3, 6]  # scattered, not in order
    alloc = 64
    try:
        q = torch.randn(len(lens), num_kv_heads, group, head_dim, generator=gen).to(device, dtype)
        k = torch.randn(8, num_kv_heads, alloc, head_dim, generator=gen).to(device, dtype)
        v = torch.randn(8, num_kv_heads, alloc, head_dim, generator=gen).to(device, dtype)
        s, n = torch.tensor(slots, device=device), torch.tensor(lens, device=device)
        scale = head_dim ** -0.5
        ref = sdpa_decode(q, k, v, s, n, scale).float()
        got = fn(q, k, v, s, n, scale).float()
        agrees = bool((got - ref).abs().max() <= _tolerance(dtype) * max(1.0, ref.abs().max().item()))
        append = getattr(fn, "append", None)
        if append is not None and agrees:  # the fused write: stores exactly the new rows, then attends
            kn, vn = (torch.randn(len(lens), num_kv_heads, head_dim, generator=gen).to(device, dtype) for _ in "kv")
            k2, v2 = k.clone(), v.clone()
            k2[s, :, n - 1], v2[s, :, n - 1] = kn, vn
            got2 = append(q, k, v, s, n, scale, kn, vn)
            agrees = torch.equal(k, k2) and torch.equal(v, v2) and torch.equal(got2, fn(q, k2, v2, s, n, scale))
        return agrees
    except (RuntimeError, TypeError, ValueError):
        return False


def probe_shapes(max_running: int, max_seq_len: int) -> list[tuple[int, int]]:
    """(rows, context) the variants are timed at: a small and a full decode batch (capped at 64 rows)
    at a context the model can hold (capped at 400 positions, so start-up timing stays short)."""
    context = max(1, min(400, max_seq_len))
    return sorted({(1, context), (min(64, max_running), context)})


def _probe_calls(fns: Mapping[str, Kernel], shapes: Sequence[tuple[int, int]], num_kv_heads: int, group: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> dict[str, Callable[[], object]]:
    """One pass = every (rows, context) shape, rows contiguous from slot 0 at lengths spread over the
    upper half of the context (the engine's decode rows are ragged)."""
    gen = torch.Generator().manual_seed(0)
    inputs = []
    for rows, context in shapes:
        q = torch.randn(rows, num_kv_heads, group, head_dim, generator=gen).to(device, dtype)
        kv = [torch.randn(rows, num_kv_heads, context, head_dim, generator=gen).to(device, dtype) for _ in "kv"]
        lens = torch.linspace(max(1, context // 2), context, rows).round().long().to(device)
        inputs.append((q, *kv, torch.arange(rows, device=device), lens, head_dim ** -0.5))

    def one_pass(fn: Kernel) -> Callable[[], object]:
        return lambda: [fn(*args) for args in inputs]

    return {name: one_pass(fn) for name, fn in fns.items()}


def pick_attention(mode: Mode, *, num_kv_heads: int, group: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device, shapes: Sequence[tuple[int, int]], cache_path: Path | None = None,
                   loader: Callable[[], KernelBuild] = load_kernel,
                   timer: Callable[[Mapping[str, Callable[[], object]]], dict[str, float]] = time_calls,
                   ) -> tuple[AttentionChoice, Kernel | None]:
    """The variant for `mode` on these head shapes, and the kernel function when it is the kernel.

    `loader` builds/loads the kernel (tests pass a failing one); `timer` times the probe passes."""
    if mode not in ("auto", "sdpa", "kernel"):
        raise ValueError(f"decode attention mode must be auto, sdpa or kernel, got {mode!r}")
    if mode == "sdpa":
        return AttentionChoice("sdpa", "forced"), None
    if device.type != "cpu":
        return _fallback(mode, f"the kernel is CPU-only (device {device})"), None
    built = loader()
    if built.fn is None:
        return _fallback(mode, built.reason), None
    if not kernel_agrees(built.fn, num_kv_heads, group, head_dim, dtype, device):
        return _fallback(mode, "refused: the kernel disagrees with SDPA on this model's heads"), None
    if mode == "kernel":
        return AttentionChoice("kernel", "forced"), built.fn
    fields = {**machine(), "what": "decode_attention", "device": str(device), "dtype": str(dtype),
              "heads": [num_kv_heads, group, head_dim], "shapes": [list(s) for s in shapes], "source": source_key()}
    key = cache_key(fields)
    if cache_path is not None:
        entry = read_cache(cache_path).get(key)
        if isinstance(entry, dict) and entry.get("variant") in (REFERENCE, KERNEL):
            choice = AttentionChoice(entry["variant"], "cache", seconds=dict(entry.get("seconds") or {}))
            return choice, built.fn if choice.variant == KERNEL else None
    fns: dict[str, Kernel] = {REFERENCE: sdpa_decode, KERNEL: built.fn}
    seconds = timer(_probe_calls(fns, shapes, num_kv_heads, group, head_dim, dtype, device))
    variant = choose_kernel(seconds, {REFERENCE: True, KERNEL: True}, reference=REFERENCE)
    choice = AttentionChoice(KERNEL if variant == KERNEL else REFERENCE, "timed", seconds=seconds)
    log.info("%s; seconds per probe pass %s", choice.describe(), seconds)
    if cache_path is not None:
        write_cache(cache_path, key, {"variant": choice.variant, "seconds": seconds, "machine": fields,
                                      "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return choice, built.fn if choice.variant == KERNEL else None


def _fallback(mode: Mode, reason: str) -> AttentionChoice:
    if mode == "kernel":
        log.warning("decode attention kernel was asked for but is unusable (%s); using SDPA", reason)
    return AttentionChoice("sdpa", "fallback", reason)
