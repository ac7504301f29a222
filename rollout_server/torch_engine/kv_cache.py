"""Slot KV cache: pre-allocated per-slot buffers, kept compact so attention reads views, not copies.

Each layer has one key and one value buffer shaped `[slots, num_kv_heads, length, head_dim]`.
Running sequence number i owns row (slot) i; the engine keeps the running rows compact
(`0..num_used-1`): when a sequence leaves, the last row's K/V (only its cached prefix) moves into
the hole. A batch of rows that form a contiguous range therefore reads its keys/values as a
*view* `buf[lo:hi, :, :kv_len]`; nothing is gathered, concatenated or re-allocated per step.
Only a batch whose rows are not contiguous (a rare case: shared-prompt prefill after a weight
update) falls back to an `index_select` of its rows.

Buffers grow geometrically (rows and length) the few times a longer or larger batch shows up, so
memory follows the real peak load rather than `max_slots * max_seq_len` up front.

Two ways in: the engine's own model runner calls `write_flat`/`read` directly (its decode rows'
new K/V may instead be stored by the decode attention kernel into these same buffers,
`attention_kernel.CompiledKernel.append`), and the generic Hugging Face fallback passes this
object as the model's KV cache argument (duck-typed `update`), addressed per forward with `begin`/`end`.
"""
from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch


def contiguous_range(slots: list[int]) -> tuple[int, int] | None:
    """(lo, hi) if `slots` is exactly lo, lo+1, ..., hi-1, else None."""
    if slots and slots[-1] - slots[0] == len(slots) - 1 and all(b == a + 1 for a, b in pairwise(slots)):
        return slots[0], slots[-1] + 1
    return None


class SlotKVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_slots: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device,
        min_len: int = 64,
    ) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        self.dtype = dtype
        self.device = device
        self.min_len = min_len
        self.num_used = 0  # rows 0..num_used-1 belong to running sequences
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.alloc_slots = 0
        self.alloc_len = 0
        # Hugging Face fallback addressing, set by `begin` and cleared by `end`.
        self._hf: tuple[tuple[int, int] | torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None
        self._valid: torch.Tensor | None = None

    # --- rows ------------------------------------------------------------------------------
    def allocate(self) -> int:
        """Claim the next row (rows stay compact: it is always `num_used`)."""
        if self.num_used >= self.max_slots:
            raise RuntimeError("no free KV slot (scheduler admitted more than max_running)")
        self.num_used += 1
        return self.num_used - 1

    @torch.inference_mode()  # buffers are inference tensors: mutate them only in that mode
    def compact(self, moves: list[tuple[int, int, int]], num_used: int) -> None:
        """Move rows (src -> dst, first `length` positions) into holes, then shrink to num_used rows."""
        if moves:
            src = torch.tensor([m[0] for m in moves], device=self.device)
            dst = torch.tensor([m[1] for m in moves], device=self.device)
            n = max(m[2] for m in moves)
            for store in (*self.keys, *self.values):
                store[dst, :, :n] = store[src, :, :n]
        self.num_used = num_used

    @torch.inference_mode()
    def fork(self, src: int, dsts: list[int], length: int) -> None:
        """Copy the first `length` cached positions of row `src` into rows `dsts` (prompt sharing)."""
        self.reserve(max(dsts) + 1, length)
        idx = torch.tensor(dsts, device=self.device)
        for store in (*self.keys, *self.values):
            store[idx, :, :length] = store[src, :, :length].clone()

    # --- storage ---------------------------------------------------------------------------
    @torch.inference_mode()
    def reserve(self, num_slots: int, length: int) -> None:
        """Make sure rows [0, num_slots) and positions [0, length) exist, growing geometrically."""
        if num_slots <= self.alloc_slots and length <= self.alloc_len:
            return
        if length > self.max_seq_len or num_slots > self.max_slots:
            raise RuntimeError(f"KV request ({num_slots} slots, {length} positions) exceeds the cache limits")
        new_slots, new_len = max(self.alloc_slots, 1), max(self.alloc_len, self.min_len)
        if num_slots > self.alloc_slots:  # grow only the dimension that is short
            new_slots = max(num_slots, 2 * self.alloc_slots)
        if length > self.alloc_len:
            new_len = max(length, 2 * self.alloc_len, self.min_len)
        new_slots, new_len = min(self.max_slots, new_slots), min(self.max_seq_len, new_len)
        shape = (new_slots, self.num_kv_heads, new_len, self.head_dim)
        for store in (self.keys, self.values):
            for layer in range(self.num_layers):
                grown = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if layer < len(store):
                    grown[: self.alloc_slots, :, : self.alloc_len] = store[layer]
                    store[layer] = grown
                else:
                    store.append(grown)
        self.alloc_slots, self.alloc_len = new_slots, new_len

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v of T tokens ([T, H, D]) at (slots[t], positions[t])."""
        self.keys[layer][slots, :, positions] = k
        self.values[layer][slots, :, positions] = v

    def flat_index(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """For `write_flat`: the row of each (token, head) in a layer buffer viewed as
        `[slots * heads * alloc_len, head_dim]`, tokens at (slots[t], positions[t]); valid until the
        buffers next grow (`reserve`)."""
        heads = torch.arange(self.num_kv_heads, device=self.device)
        return ((slots[:, None] * self.num_kv_heads + heads) * self.alloc_len + positions[:, None]).reshape(-1)

    def write_flat(self, layer: int, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """`write` with the addresses computed once per step (`flat_index`): one contiguous-row copy
        per (token, head) instead of an advanced-index assignment per layer."""
        d = self.head_dim
        self.keys[layer].view(-1, d).index_copy_(0, index, k.reshape(-1, d))
        self.values[layer].view(-1, d).index_copy_(0, index, v.reshape(-1, d))

    def read(self, layer: int, rows: tuple[int, int] | torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V [B, H, kv_len, D] of a row range (a view, no copy) or of an index tensor (a gather)."""
        k, v = self.keys[layer], self.values[layer]
        if isinstance(rows, tuple):
            lo, hi = rows
            return k[lo:hi, :, :kv_len], v[lo:hi, :, :kv_len]
        return k[:, :, :kv_len].index_select(0, rows), v[:, :, :kv_len].index_select(0, rows)

    # --- Hugging Face Cache protocol (generic fallback runner) -------------------------------
    def begin(self, slots: list[int], positions: torch.Tensor, valid: torch.Tensor, kv_len: int) -> None:
        """Address one HF forward: row i writes its valid tokens into slot slots[i] at positions[i]."""
        self.reserve(max(slots) + 1, kv_len)
        slot_t = torch.tensor(slots, device=self.device)[:, None].expand_as(positions)
        rows = contiguous_range(slots)
        self._hf = (rows if rows is not None else slot_t[:, 0].contiguous(), slot_t[valid], positions[valid], kv_len)
        self._valid = valid

    def end(self) -> None:
        self._hf = self._valid = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """HF Cache protocol: store k/v [B, H, q, D] and return this batch's k/v [B, H, kv_len, D]."""
        if self._hf is None:
            raise RuntimeError("SlotKVCache.update called outside begin()/end()")
        rows, slots, positions, kv_len = self._hf
        k = key_states.transpose(1, 2)[self._valid].to(self.dtype)  # [T, H, D]
        v = value_states.transpose(1, 2)[self._valid].to(self.dtype)
        self.write(layer_idx, slots, positions, k, v)
        return self.read(layer_idx, rows, kv_len)
