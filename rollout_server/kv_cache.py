"""Slot-based KV cache that Hugging Face attention layers write into.

Every running sequence owns one slot: a row of per-layer key/value buffers shaped
`[slots, num_kv_heads, length, head_dim]`. HF attention layers call
`past_key_values.update(k, v, layer_idx)` (duck-typed), so this object only needs `update`:
it scatters the new keys/values into each row's slot at that row's positions and hands back the
keys/values of the batch's slots up to the longest length needed. Nothing is concatenated per
step; buffers only grow geometrically (slots and length) the few times a batch needs more, so
memory follows the real peak load instead of `max_running * max_seq_len` up front.
"""
from __future__ import annotations

import heapq
from typing import Any

import torch


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
        self._free: list[int] = list(range(max_slots))  # min-heap: lowest slots reused first
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.alloc_slots = 0
        self.alloc_len = 0
        # Per-forward addressing, set by `begin` and cleared by `end`.
        self._slots: torch.Tensor | None = None
        self._write_slots: torch.Tensor | None = None
        self._write_pos: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None
        self._kv_len = 0

    # --- slot bookkeeping ------------------------------------------------------------------
    @property
    def num_used(self) -> int:
        return self.max_slots - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV slot (scheduler admitted more than max_running)")
        return heapq.heappop(self._free)

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    # --- storage ---------------------------------------------------------------------------
    def reserve(self, num_slots: int, length: int) -> None:
        """Make sure slots [0, num_slots) and positions [0, length) exist, growing geometrically."""
        if num_slots <= self.alloc_slots and length <= self.alloc_len:
            return
        if length > self.max_seq_len or num_slots > self.max_slots:
            raise RuntimeError(f"KV request ({num_slots} slots, {length} positions) exceeds the cache limits")
        new_slots = min(self.max_slots, max(num_slots, 2 * self.alloc_slots, 1))
        new_len = min(self.max_seq_len, max(length, 2 * self.alloc_len, self.min_len))
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

    def begin(self, slots: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, kv_len: int) -> None:
        """Address one forward pass: row i writes its valid tokens into slot slots[i] at positions[i]."""
        self.reserve(int(slots.max()) + 1, kv_len)
        self._slots = slots
        self._valid = None if bool(valid.all()) else valid
        expanded = slots[:, None].expand_as(positions)
        self._write_slots = expanded if self._valid is None else expanded[valid]
        self._write_pos = positions if self._valid is None else positions[valid]
        self._kv_len = kv_len

    def end(self) -> None:
        self._slots = self._write_slots = self._write_pos = self._valid = None
        self._kv_len = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """HF Cache protocol: store k/v [B, H, q, D] and return this batch's k/v [B, H, kv_len, D]."""
        if self._slots is None:
            raise RuntimeError("SlotKVCache.update called outside begin()/end()")
        out = []
        for new, store in ((key_states, self.keys[layer_idx]), (value_states, self.values[layer_idx])):
            rows = new.transpose(1, 2)  # [B, q, H, D]
            rows = rows.reshape(-1, *rows.shape[2:]) if self._valid is None else rows[self._valid]
            store[self._write_slots.reshape(-1), :, self._write_pos.reshape(-1)] = rows.to(store.dtype)
            out.append(store[:, :, : self._kv_len].index_select(0, self._slots))
        return out[0], out[1]
