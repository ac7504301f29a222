"""Dynamic micro-batching: pack sequences into micro-batches by a token budget, not a fixed count.

Three packers. `pack_by_padded_tokens` sorts by length and cuts runs whose
*padded* size ``rows x longest`` stays within the budget: a micro-batch is a padded tensor, so
that is what costs memory and compute, and with long-tailed lengths (a few 500-token responses
among many 20-token ones) it keeps the long ones together instead of padding short ones to 500.
`pack_by_tokens` (first-fit-decreasing, below) bounds the *summed* lengths instead: the right
packer for padding-free (varlen) kernels, where it uses the fewest micro-batches.
`pack_by_cost` (the trainer's default) also cuts the length-sorted order into contiguous runs
under the padded budget, but chooses the cuts by dynamic programming to minimise a measured cost
per micro-batch (`PackCost`: fixed overhead + linear layers + attention), so it pays for a padded
token only where one more forward pass would cost more than the padding.

With long-tailed response lengths a fixed number of sequences per forward pass either wastes
memory on short ones or runs out of it on long ones. Packing by tokens keeps every micro-batch
under one budget. First-fit-decreasing (FFD): take the sequences longest first and put each into
the first micro-batch that still has room, opening a new one when none has. FFD uses at most
11/9 OPT + 6/9 bins (Dosa 2007), and in practice almost always the minimum.

Gradient accumulation stays exact when every micro-batch loss is divided by the *whole batch's*
token count (``decoupled_ppo_loss(..., normalizer=total_valid_tokens)``): the micro-batch losses
then add up to the whole-batch token mean, whatever the packing. ``tests/unit/test_micro_batching.py``
checks this to 1e-5 on a small model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PackCost", "computed_tokens", "pack_by_cost", "pack_by_padded_tokens", "pack_by_tokens"]


@dataclass(frozen=True)
class PackCost:
    """Cost (seconds, or any unit: only ratios matter) of one padded micro-batch of ``rows`` sequences
    padded to ``maxlen``: ``c0 + c1 * rows * maxlen + c2 * rows * maxlen**2``.

    ``c0`` is the fixed per-forward/backward overhead (kernel launches, Python, the optimizer-free part
    of one micro-batch), ``c1`` the per-token cost of the linear layers (and everything else linear in
    tokens), ``c2`` the attention over full ``maxlen`` squares. All three must be finite and >= 0.
    """
    c0: float
    c1: float
    c2: float

    def __post_init__(self) -> None:
        for name in ("c0", "c1", "c2"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v) or v < 0:
                raise ValueError(f"PackCost.{name} must be a finite number >= 0, got {v!r}")

    def of(self, rows: int, maxlen: int) -> float:
        return self.c0 + self.c1 * rows * maxlen + self.c2 * rows * maxlen * maxlen


def pack_by_tokens(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into micro-batches whose summed length is <= ``max_tokens``.

    First-fit-decreasing: sequences in order of decreasing length (ties: lower index first), each
    into the first micro-batch with ``total + length <= max_tokens``, else into a new one. A
    sequence longer than ``max_tokens`` cannot share and gets a micro-batch of its own.
    Zero-length sequences fit anywhere (into the first micro-batch).

    Returns micro-batches in the order they were opened (the first holds the longest sequence),
    each a list of indices in ascending order; every index appears exactly once. The budget
    counts tokens as given (e.g. prompt + response); with padded micro-batches the memory is
    ``len(mb) * max(lengths in mb)``, which FFD does NOT keep small when lengths are long-tailed
    (the first micro-batch gets the longest sequence plus many short ones): use
    `pack_by_padded_tokens` for padded micro-batches.
    """
    lengths = list(lengths)
    _check(lengths, max_tokens)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    totals: list[int] = []
    for i in order:
        for b, total in enumerate(totals):
            if total + lengths[i] <= max_tokens:
                bins[b].append(i)
                totals[b] += lengths[i]
                break
        else:
            bins.append([i])
            totals.append(lengths[i])
    return [sorted(b) for b in bins]


def pack_by_padded_tokens(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped so each micro-batch's padded size ``len(mb) * max(lengths in mb) <= max_tokens``.

    Sequences are taken shortest first (ties: lower index first) and a new micro-batch is opened
    when adding the next one would exceed the budget; since lengths only grow along the way the
    newcomer is the micro-batch's longest. Contiguous runs of the sorted order minimise padding
    for a given number of micro-batches. A sequence longer than the budget gets one of its own.
    Returns micro-batches shortest first, each a list of indices in ascending order.
    """
    _check(lengths, max_tokens)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    bins: list[list[int]] = []
    for i in order:
        if bins and (len(bins[-1]) + 1) * lengths[i] <= max_tokens:
            bins[-1].append(i)
        else:
            bins.append([i])
    return [sorted(b) for b in bins]


def pack_by_cost(lengths: list[int], max_tokens: int, cost: PackCost) -> list[list[int]]:
    """Indices grouped into contiguous runs of the length-sorted order that minimise the summed
    ``cost.of(len(run), longest in run)`` subject to ``len(run) * longest <= max_tokens`` (the memory
    budget of a padded micro-batch); a sequence longer than the budget gets a run of its own.

    Sorted shortest first (ties: lower index first). Exact dynamic programming over the cut points:
    ``best[j] = min over i of best[i] + cost(j - i, lengths[j - 1])`` for the runs ``i..j-1`` that fit,
    O(n * rows-that-fit) vectorised. Among equal-cost packings the one with the longest last run wins
    (fewer micro-batches). Restricting to contiguous runs of the sorted order loses nothing: the cost
    grows with ``maxlen``, so swapping a long sequence into a run of short ones never helps.
    Returns micro-batches shortest first, each a list of indices in ascending order.
    """
    _check(lengths, max_tokens)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    n = len(order)
    if n == 0:
        return []
    sl = np.array([lengths[i] for i in order], dtype=np.float64)
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        longest = sl[j - 1]
        fit = int(max_tokens // longest) if longest > 0 else j
        rows = np.arange(min(j, max(fit, 1)), 0, -1, dtype=np.float64)  # longest run first
        total = best[j - rows.astype(np.int64)] + cost.c0 + rows * longest * (cost.c1 + cost.c2 * longest)
        k = int(np.argmin(total))
        best[j], cut[j] = total[k], j - int(rows[k])
    bins: list[list[int]] = []
    j = n
    while j > 0:
        bins.append(sorted(order[cut[j]:j]))
        j = int(cut[j])
    return bins[::-1]


def computed_tokens(lengths: list[int], bins: list[list[int]]) -> int:
    """Tokens a forward pass computes over ``bins`` as padded micro-batches: sum of rows x longest."""
    return sum(len(b) * max(lengths[i] for i in b) for b in bins if b)


def _check(lengths: list[int], max_tokens: int) -> None:
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
        raise ValueError(f"max_tokens must be an int > 0, got {max_tokens!r}")
    for i, n in enumerate(lengths):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"lengths must be ints >= 0, got lengths[{i}] = {n!r}")
