"""The generic fallback runner: the Hugging Face forward over the slot KV cache, for any causal LM.

`HFRunner` passes the slot cache (duck-typed `SlotKVCache.update`) under the keyword the model's forward
declares: `cache` in the transformers releases that deprecate `past_key_values` (5.x, removal announced
for 5.40), `past_key_values` in the older ones the project still allows (>= 4.56); a forward taking
neither is refused at construction, naming the model class (`cache_keyword`). Two
forwards per step (multi-token rows, then one-token rows), each left-padded so every row's last
token is the last column; masks are additive and per layer type for sliding-window models. It is
what `model_runner.make_runner` falls back to when the fast runner does not reproduce a model.
"""
from __future__ import annotations

import inspect

import torch
import transformers

from rollout_server.kernel_report import KernelChoice
from rollout_server.torch_engine.kv_cache import SlotKVCache

__all__ = ["HFRunner", "additive_mask", "attention_layout", "cache_keyword"]


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword under which `model`'s forward takes a KV cache: `cache` where declared (the name that
    replaces the deprecated `past_key_values`), else `past_key_values`; a ValueError when it has neither."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ValueError(f"{type(model).__name__}.forward takes no KV cache (neither `cache` nor `past_key_values`): "
                     "the generic Hugging Face path cannot run it")


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


class HFRunner:
    def __init__(self, model: transformers.PreTrainedModel, cache: SlotKVCache, source: str = "forced",
                 reason: str = "") -> None:
        """`source`/`reason`: why this runner and not the fast one (`kernel_choices`)."""
        self.model, self.cache = model, cache
        self.source, self.reason = source, reason
        cfg = model.config.get_text_config()
        self.layer_types, self.window = attention_layout(cfg)
        self.cache_kw = cache_keyword(model)
        self.forwards = 0

    def describe(self) -> str:
        return "Hugging Face forward (no kernel choice, no compiled decode)"

    def kernel_choices(self) -> list[KernelChoice]:
        return [KernelChoice(op="runner", kernel="hf_forward", source=self.source, reason=self.reason)]

    def forward(self, slots: list[int], starts: list[int], chunks: list[list[int]]) -> torch.Tensor:
        out: list[torch.Tensor | None] = [None] * len(chunks)
        for want_multi in (True, False):
            rows = [i for i, c in enumerate(chunks) if (len(c) > 1) == want_multi]
            if rows:
                logits = self._forward([slots[i] for i in rows], [starts[i] for i in rows], [chunks[i] for i in rows])
                for j, i in enumerate(rows):
                    out[i] = logits[j]
        return torch.stack(out)  # type: ignore[arg-type]

    def _forward(self, slots: list[int], starts: list[int], chunks: list[list[int]]) -> torch.Tensor:
        """Left-padded so every row's last token is the last column (logits_to_keep=1); pad columns get
        position 0, write nothing to the cache, and their outputs are ignored."""
        self.forwards += 1
        dev = self.cache.device
        width = max(len(c) for c in chunks)
        ids = torch.zeros(len(chunks), width, dtype=torch.long)
        pos = torch.zeros(len(chunks), width, dtype=torch.long)
        valid = torch.zeros(len(chunks), width, dtype=torch.bool)
        for i, (s, c) in enumerate(zip(starts, chunks)):
            ids[i, width - len(c):] = torch.tensor(c)
            pos[i, width - len(c):] = torch.arange(s, s + len(c))
            valid[i, width - len(c):] = True
        kv_len = max(s + len(c) for s, c in zip(starts, chunks))
        ids, pos, valid = ids.to(dev), pos.to(dev), valid.to(dev)
        self.cache.begin(slots, pos, valid, kv_len)
        try:
            out = self.model(input_ids=ids, position_ids=pos, attention_mask=self._mask(pos, kv_len),
                             use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache})
        finally:
            self.cache.end()
        return out.logits[:, -1].float()

    def _mask(self, pos: torch.Tensor, kv_len: int) -> torch.Tensor | dict[str, torch.Tensor]:
        """Additive 4D mask [B, 1, q, kv]: a query at position p sees cached positions <= p."""
        key_pos = torch.arange(kv_len, device=pos.device)[None, None, :]
        query_pos = pos[:, :, None]
        allowed = key_pos <= query_pos
        dtype = self.cache.dtype
        if "sliding_attention" in self.layer_types:  # hybrid models take a per-layer-type mapping
            sliding = allowed & (key_pos > query_pos - self.window)
            return {"full_attention": additive_mask(allowed, dtype)[:, None],
                    "sliding_attention": additive_mask(sliding, dtype)[:, None]}
        if self.window and not self.layer_types:  # Mistral-style: one window for every layer
            allowed &= key_pos > query_pos - self.window
        return additive_mask(allowed, dtype)[:, None]


def attention_layout(config: transformers.PretrainedConfig) -> tuple[tuple[str, ...], int | None]:
    """Return (layer types, sliding window) so masks match what the model expects."""
    layer_types = tuple(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None)
    if layer_types and "sliding_attention" not in layer_types:
        window = None  # e.g. Qwen2 without use_sliding_window: the field is informational
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(f"unsupported attention layer types {sorted(unknown)} (only full/sliding attention)")
    if "sliding_attention" in layer_types and not window:
        raise ValueError("config has sliding_attention layers but no sliding_window")
    return layer_types, window
