"""Single-token decode attention over the slot KV cache as two batched matmuls (not used by the runner).

A decode row has one query per head; its keys and values are a view of its slot's cache rows
(`[rows, Hkv, n, D]`, the rows of one length bucket, no copy). Attention is then two batched
matrix-vector products, q.k and p.v, each reading its half of the cache once, so its cost is
the read. This formulation avoids what else could cost on top of the read:

- No additive mask tensor: positions a row has not reached yet (it is shorter than its bucket's
  longest) get -inf written into the small `[rows, Hkv, G, n]` score tensor, in place, and only when
  some row is shorter; the K/V views themselves stay as they are.
- Grouped-query heads by reshape: the G query heads that share a KV head are one `[G, D]` block
  against that head's keys, so K/V are never repeated.
- Softmax in place on the scores.

Exact to fp32 rounding against `F.scaled_dot_product_attention` with the equivalent mask (tested).
On the CPU it was measured on it was not faster than the runner's SDPA call (both read K/V well
below a plain read's rate: docs/benchmarks.md, "Roofline and decode attention"), so the runner
keeps SDPA; `benchmarks/decode_attention.py` re-measures both.
"""
from __future__ import annotations

import torch


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int], scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v per row, row i attending to its first `lens[i]` positions.

    q: [B, Hkv, G, D] (the G query heads of each KV head); k, v: [B, Hkv, n, D], any strides (views of
    the cache; keys stored dim-major are read along positions); `1 <= lens[i] <= n`. Returns [B, Hkv, G, D].
    """
    n = k.shape[-2]
    scores = torch.matmul(q, k.transpose(-1, -2))  # [B, Hkv, G, n]
    scores.mul_(scale)
    if min(lens) < n:
        lens_t = torch.tensor(lens, device=q.device)
        unseen = torch.arange(n, device=q.device) >= lens_t[:, None]
        scores.masked_fill_(unseen[:, None, None, :], float("-inf"))
    torch.softmax(scores, dim=-1, out=scores)
    return torch.matmul(scores, v)
