"""Continuous-batching generation engine over a Hugging Face causal LM, interruptible for weights.

Shape follows nano-vllm, kept small: a `Sequence` per request, a FIFO of waiting requests, a
slot-based KV cache (`kv_cache.SlotKVCache`), a model runner (`_forward`) and the loop (`step`).

One `step` = admit waiting requests into free slots, one batched prefill of every running
sequence without cached KV (new joiners, plus everyone after a weight update), one batched
decode over the sequences that were already running. A finished sequence leaves at once and
its slot is reused by the next step's joiners.

Weight updates happen between steps (the server loop is single-threaded). They copy tensors into
the live parameters and drop every running sequence's KV: the next step re-prefills prompt +
tokens so far under the new weights, so a trajectory can span versions, each token tagged with
the version that sampled it, and its logprob is exactly what that version computes.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import transformers

from rollout_server.kv_cache import SlotKVCache
from rollout_server.sampling import SamplingParams, sample

__all__ = ["Engine", "Finished", "SamplingParams"]


@dataclass
class Finished:
    rid: str
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]  # behaviour logprob of each output token
    versions: list[int]  # policy version that produced each output token
    finish_reason: str  # "stop" (EOS emitted, included in output_ids) | "length" | "abort"


@dataclass
class Sequence:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    slot: int = -1
    # Tokens whose K/V sit in the slot. 0 means "needs a (re-)prefill"; a sequence is ready to
    # decode when everything but its last (just sampled) token is cached.
    num_cached: int = 0

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def result(self, reason: str) -> Finished:
        return Finished(self.rid, list(self.prompt_ids), list(self.output_ids), list(self.logprobs),
                        list(self.versions), reason)


def _attention_layout(config: transformers.PretrainedConfig) -> tuple[tuple[str, ...], int | None]:
    """Return (layer types, sliding window) so `_mask` can build the masks the model expects."""
    layer_types = tuple(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None)
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(f"unsupported attention layer types {sorted(unknown)} (only full/sliding attention)")
    if "sliding_attention" in layer_types and not window:
        raise ValueError("config has sliding_attention layers but no sliding_window")
    return layer_types, window


class Engine:
    def __init__(
        self,
        model: transformers.PreTrainedModel,
        eos_token_id: int,
        *,
        max_running: int = 64,
        max_seq_len: int | None = None,
        seed: int = 0,
        version: int = 0,
    ) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        self.model = model.eval()
        self.eos_token_id = int(eos_token_id)
        self.max_running = max_running
        self.version = version
        cfg = model.config.get_text_config()
        self.vocab_size: int = cfg.vocab_size
        self.max_seq_len: int = max_seq_len or cfg.max_position_embeddings
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        self._layer_types, self._window = _attention_layout(cfg)
        num_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache = SlotKVCache(
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            max_slots=max_running,
            max_seq_len=self.max_seq_len,
            dtype=self.dtype,
            device=self.device,
        )
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._waiting: OrderedDict[str, Sequence] = OrderedDict()  # FIFO, O(1) abort
        self._running: dict[str, Sequence] = {}  # insertion order = admission order

    # --- public API ------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def kv_usage(self) -> float:
        """Fraction of KV slots held by running sequences."""
        return self.cache.num_used / self.max_running

    def add(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; it joins the running batch at the next step with a free slot."""
        if rid in self._waiting or rid in self._running:
            raise ValueError(f"duplicate request id {rid!r}")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError(f"request {rid!r}: empty prompt")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"request {rid!r}: prompt has {len(prompt)} tokens but max_seq_len is "
                             f"{self.max_seq_len} (room is needed for at least one new token)")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"request {rid!r}: token ids {bad[:5]} outside vocabulary [0, {self.vocab_size})")
        params.validate()
        self._waiting[rid] = Sequence(rid, prompt, params)

    def abort(self, rid: str) -> Finished | None:
        """Drop a waiting or running request (freeing its slot); None if it is unknown."""
        seq = self._waiting.pop(rid, None)
        if seq is None:
            seq = self._running.get(rid)
            if seq is None:
                return None
            self._release(seq)
        return seq.result("abort")

    def update_weights(self, named_tensors: Mapping[str, torch.Tensor], version: int) -> None:
        """Copy new weights into the live model in place and invalidate all cached KV.

        Everything is validated before the first copy, so a bad update leaves the model untouched.
        Tied aliases (e.g. `lm_head.weight` tied to the embeddings) are accepted by either name.
        """
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for name, tensor in named_tensors.items():
            if name not in params:
                raise KeyError(f"unknown parameter {name!r} in weight update (model has {len(params)} parameters)")
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"weight {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"shape mismatch for {name!r}: got {tuple(tensor.shape)}, "
                                 f"model has {tuple(params[name].shape)}")
        with torch.no_grad():
            for name, tensor in named_tensors.items():
                params[name].data.copy_(tensor)
        self.version = int(version)
        for seq in self._running.values():
            seq.num_cached = 0  # re-prefill under the new weights at the next step

    def step(self) -> list[Finished]:
        """One scheduler iteration: admit, prefill joiners/invalidated, decode the rest."""
        while self._waiting and len(self._running) < self.max_running:
            _, seq = self._waiting.popitem(last=False)
            seq.slot = self.cache.allocate()
            self._running[seq.rid] = seq
        to_prefill = [s for s in self._running.values() if s.num_cached == 0]
        to_decode = [s for s in self._running.values() if s.num_cached > 0]
        finished: list[Finished] = []
        with torch.inference_mode():
            for batch, prefill in ((to_prefill, True), (to_decode, False)):
                if batch:
                    logits = self._forward(batch, prefill)
                    finished.extend(self._sample(batch, logits))
        return finished

    # --- model runner ----------------------------------------------------------------------
    def _forward(self, batch: list[Sequence], prefill: bool) -> torch.Tensor:
        """Run one batched forward and return the last-position logits [B, V] in float32.

        Prefill is left-padded so every row's last token is the last column (logits_to_keep=1);
        pad columns get position 0, write nothing to the cache, and their outputs are ignored.
        """
        if prefill:
            width = max(len(s) for s in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            pos = torch.zeros(len(batch), width, dtype=torch.long)
            valid = torch.zeros(len(batch), width, dtype=torch.bool)
            for i, s in enumerate(batch):
                n = len(s)
                ids[i, width - n:] = torch.tensor(s.tokens)
                pos[i, width - n:] = torch.arange(n)
                valid[i, width - n:] = True
            kv_len = width
        else:
            ids = torch.tensor([[s.output_ids[-1]] for s in batch])
            pos = torch.tensor([[s.num_cached] for s in batch])
            valid = torch.ones(len(batch), 1, dtype=torch.bool)
            kv_len = max(s.num_cached for s in batch) + 1
        ids, pos, valid = ids.to(self.device), pos.to(self.device), valid.to(self.device)
        slots = torch.tensor([s.slot for s in batch], device=self.device)
        self.cache.begin(slots, pos, valid, kv_len)
        try:
            out = self.model(input_ids=ids, position_ids=pos, attention_mask=self._mask(pos, kv_len),
                             past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        finally:
            self.cache.end()
        return out.logits[:, -1].float()

    def _mask(self, pos: torch.Tensor, kv_len: int) -> torch.Tensor | dict[str, torch.Tensor]:
        """Additive 4D mask [B, 1, q, kv]: a query at position p sees cached positions <= p."""
        key_pos = torch.arange(kv_len, device=self.device)[None, None, :]
        query_pos = pos[:, :, None]
        allowed = key_pos <= query_pos

        def additive(ok: torch.Tensor) -> torch.Tensor:
            m = torch.zeros(ok.shape, dtype=self.dtype, device=self.device)
            return m.masked_fill(~ok, torch.finfo(self.dtype).min)[:, None]

        if "sliding_attention" in self._layer_types:  # hybrid models take a per-layer-type mapping
            sliding = allowed & (key_pos > query_pos - self._window)
            return {"full_attention": additive(allowed), "sliding_attention": additive(sliding)}
        if self._window and not self._layer_types:  # Mistral-style: one window for every layer
            allowed &= key_pos > query_pos - self._window
        return additive(allowed)

    # --- sampling / bookkeeping -------------------------------------------------------------
    def _sample(self, batch: list[Sequence], logits: torch.Tensor) -> list[Finished]:
        temps = torch.tensor([s.params.temperature for s in batch], dtype=torch.float32, device=logits.device)
        top_ps = torch.tensor([s.params.top_p for s in batch], dtype=torch.float32, device=logits.device)
        tokens, logps = sample(logits, temps, top_ps, self.generator)
        finished = []
        for seq, tok, lp in zip(batch, tokens.tolist(), logps.tolist()):
            seq.num_cached = len(seq)  # everything before the new token now has K/V in the slot
            seq.output_ids.append(tok)
            seq.logprobs.append(lp)
            seq.versions.append(self.version)
            reason = self._finish_reason(seq, tok)
            if reason is not None:
                self._release(seq)
                finished.append(seq.result(reason))
        return finished

    def _finish_reason(self, seq: Sequence, tok: int) -> str | None:
        if tok == self.eos_token_id and not seq.params.ignore_eos:
            return "stop"
        if len(seq.output_ids) >= seq.params.max_new_tokens or len(seq) >= self.max_seq_len:
            return "length"
        return None

    def _release(self, seq: Sequence) -> None:
        del self._running[seq.rid]
        self.cache.release(seq.slot)
        seq.slot = -1
