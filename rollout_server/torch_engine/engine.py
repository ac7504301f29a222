"""Continuous-batching generation engine over a Hugging Face causal LM, interruptible for weights.

Shape follows nano-vllm, kept small: a `Sequence` per request, a FIFO of waiting requests, a
slot KV cache (`kv_cache.SlotKVCache`, running rows kept compact), a model runner
(`model_runner`: a packed fast path for Llama-family models, the HF forward otherwise) and the
loop (`step`).

One `step` = admit waiting requests into free rows, then ONE forward over every running sequence:
decode rows feed their last sampled token, joining rows feed their whole prompt (batched prefill).
Requests added in the same step with the same prompt (a GRPO group) prefill that prompt once and
fork its K/V into their rows (`prompt_sharing`). Every running sequence gains one token per step;
a finished sequence (EOS unless `ignore_eos`, or its token budget) leaves at once, the last row
moves into its hole, and the freed row is refilled by the next step's joiners.

Weight updates happen between steps (the server loop is single-threaded) and copy tensors into the
live parameters in place. What happens to sequences in flight is `interrupt_mode`:
- "recompute" (default, AReaL): their K/V is dropped and the next step re-prefills prompt + tokens
  so far under the new weights (the prompt once per group), so every logprob is exactly what the
  version that sampled the token computes over the whole sequence.
- "keep" (PipelineRL / prime-rl): decoding continues on the K/V computed by the old weights; no
  re-prefill. New tokens are tagged with the new version and their logprobs come from the new
  weights' forward over the (partly old) cache.
Either way a trajectory can span versions, each token tagged with the version that sampled it.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import transformers

from areal_py.wire.weights import load_weights
from rollout_server.backend import Finished, Trajectory, WeightSource
from rollout_server.kernel_report import KernelChoice
from rollout_server.sampling import SamplingParams, sample
from rollout_server.torch_engine.attention_choice import Mode
from rollout_server.torch_engine.kv_cache import SlotKVCache
from rollout_server.torch_engine.linear_choice import default_cache_path
from rollout_server.torch_engine.model_runner import make_runner

__all__ = ["Engine", "InterruptMode"]

InterruptMode = Literal["recompute", "keep"]


@dataclass
class Sequence(Trajectory):
    """A trajectory while this engine runs it: its KV slot and how much of it is cached."""

    slot: int = -1
    # Tokens whose K/V sit in the slot. 0 means "needs a (re-)prefill"; a sequence is ready to
    # decode when everything but its last (just sampled) token is cached.
    num_cached: int = 0
    done: str | None = None  # finish reason, set when it finishes inside a step

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


class Engine:
    """The built-in `rollout_server.backend.Backend`: continuous batching over a model in this process."""

    def __init__(
        self,
        model: transformers.PreTrainedModel,
        eos_token_id: int,
        *,
        max_running: int = 64,
        max_seq_len: int | None = None,
        seed: int = 0,
        version: int = 0,
        interrupt_mode: InterruptMode = "recompute",
        prompt_sharing: bool = True,
        fast_runner: bool | None = None,
        compile_decode: bool = False,
        kernel_cache: str | os.PathLike | None = None,
        decode_attention: Mode = "auto",
    ) -> None:
        """`fast_runner`: None = use the packed fast path when the architecture supports it (checked
        numerically against the HF forward at start), False = always the generic HF forward.
        `compile_decode`: the fast path's decode steps run `torch.compile`d, checked against eager
        (`model_runner.FastLlamaRunner.enable_compile`). `kernel_cache`: the JSON file caching the
        linear kernel timed at start-up (None = `linear_choice.default_cache_path()`).
        `decode_attention`: auto | sdpa | kernel, the fast path's decode attention (`attention_choice`)."""
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        if interrupt_mode not in ("recompute", "keep"):
            raise ValueError(f"interrupt_mode must be 'recompute' or 'keep', got {interrupt_mode!r}")
        self.model = model.eval()
        self.eos_token_id = int(eos_token_id)
        self.max_running = max_running
        self.version = version
        self.interrupt_mode: InterruptMode = interrupt_mode
        self.prompt_sharing = prompt_sharing
        cfg = model.config.get_text_config()
        self.vocab_size: int = cfg.vocab_size
        self.max_seq_len: int = max_seq_len or cfg.max_position_embeddings
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
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
        self.runner = make_runner(model, self.cache, fast_runner, compile_decode=compile_decode,
                                  decode_attention=decode_attention, kernel_cache=Path(kernel_cache) if kernel_cache else default_cache_path())
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._waiting: OrderedDict[str, Sequence] = OrderedDict()  # FIFO, O(1) abort
        self._running: dict[str, Sequence] = {}
        self._rows: list[Sequence] = []  # running sequences by slot: self._rows[i].slot == i
        self.prefill_tokens = 0  # tokens fed through the model for prefill / re-prefill (stats)
        self.decode_tokens = 0  # one-token decode rows fed (stats)

    # --- public API ------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def kernel_summary(self) -> str:
        """Which runner, linear kernels and compiled decode this engine uses (for the start-up log)."""
        return self.runner.describe()

    def kernel_choices(self) -> list[KernelChoice]:
        """The same as typed records, one per op (`rollout_server.kernel_report`: the run directory, Prometheus)."""
        return self.runner.kernel_choices()

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

    def add_group(self, rids: list[str], prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue n samples of one prompt (a GRPO group). Validated as a whole before any is queued;
        members admitted in the same step prefill the prompt once and fork its K/V."""
        if len(set(rids)) != len(rids):
            raise ValueError("duplicate request ids in group")
        for rid in rids:
            if rid in self._waiting or rid in self._running:
                raise ValueError(f"duplicate request id {rid!r}")
        self.add(rids[0], prompt_ids, params)
        for rid in rids[1:]:
            self._waiting[rid] = Sequence(rid, list(self._waiting[rids[0]].prompt_ids), params)

    def abort(self, rid: str) -> Finished | None:
        """Drop a waiting or running request (freeing its slot); None if it is unknown."""
        seq = self._waiting.pop(rid, None)
        if seq is None:
            seq = self._running.get(rid)
            if seq is None:
                return None
            self._release([seq])
        return seq.result("abort")

    def close(self) -> None:
        """Nothing to release: the model and its KV cache live in this process."""

    def requests_older_than(self, min_version: int) -> list[str]:
        """Running requests holding a token generated before `min_version` (too stale to train on)."""
        return [s.rid for s in self._running.values() if s.versions and s.versions[0] < min_version]

    def update_weights(self, weights: WeightSource, version: int) -> None:
        """Copy new weights into the live model in place; in "recompute" mode invalidate all cached KV.

        `weights`: name -> tensor, or the path of a published weight file (loaded here first).
        Everything is validated before the first copy, so a bad update leaves the model untouched.
        Tied aliases (e.g. `lm_head.weight` tied to the embeddings) are accepted by either name.
        """
        named_tensors = load_weights(weights) if isinstance(weights, (str, os.PathLike)) else weights
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for name, tensor in named_tensors.items():
            if name not in params:
                raise KeyError(f"unknown parameter {name!r} in weight update (model has {len(params)} parameters)")
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(
                    f"weight {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"shape mismatch for {name!r}: got {tuple(tensor.shape)}, "
                                 f"model has {tuple(params[name].shape)}")
        with torch.no_grad():
            for name, tensor in named_tensors.items():
                params[name].data.copy_(tensor)
        self.version = int(version)
        if self.interrupt_mode == "recompute":
            for seq in self._rows:
                seq.num_cached = 0  # re-prefill under the new weights at the next step

    def step(self) -> list[Finished]:
        """One scheduler iteration: admit joiners, one forward for everyone, sample, retire finished."""
        while self._waiting and len(self._rows) < self.max_running:
            _, seq = self._waiting.popitem(last=False)
            seq.slot = self.cache.allocate()
            self._running[seq.rid] = seq
            self._rows.append(seq)
        if not self._rows:
            return []
        with torch.inference_mode():
            self._sample(*self._run())
        done = [s for s in self._rows if s.done is not None]
        if done:
            self._release(done)
        return [s.result(s.done) for s in done]  # type: ignore[arg-type]

    # --- scheduling --------------------------------------------------------------------------
    def _run(self) -> tuple[list[Sequence], torch.Tensor]:
        """Feed every running sequence's uncached tokens; return the sequences that sample this step
        (every running one) and their next-token logits, row i for sequence i.

        A decode-only step (every sequence has all but its last token cached: the steady state) feeds
        the rows in slot order and returns the forward's logits as they are, no regrouping or copy.
        Otherwise rows with nothing cached are grouped by prompt: a group's first member prefills the
        prompt only and the others get a copy of its K/V. Members with no output yet sample from that
        prompt's logits; members that already have outputs (a re-prefill after a weight update)
        feed those in a second forward, so everyone still gains exactly one token this step.
        """
        if self._decode_only():
            seqs = list(self._rows)
            self.decode_tokens += len(seqs)
            logits = self.runner.forward([s.slot for s in seqs], [s.num_cached for s in seqs],
                                         [[s.output_ids[-1] if s.output_ids else s.prompt_ids[-1]] for s in seqs])
            for seq in seqs:
                seq.num_cached += 1
            return seqs, logits
        groups: dict[tuple[int, ...], list[Sequence]] = {}
        rows: list[tuple[Sequence, int, list[int]]] = []  # (seq, start, tokens) fed in forward 1
        for seq in self._rows:
            if seq.num_cached == 0 and self.prompt_sharing and len(seq.prompt_ids) > 1:
                groups.setdefault(tuple(seq.prompt_ids), []).append(seq)
            else:
                rows.append((seq, seq.num_cached, seq.tokens[seq.num_cached:]))
        shared = []
        for members in groups.values():
            if len(members) == 1:
                seq = members[0]
                rows.append((seq, 0, seq.tokens))
            else:
                rows.append((members[0], 0, members[0].prompt_ids))
                shared.append(members)
        logits = self._forward(rows)
        reps = {id(members[0]) for members in shared}
        seqs: list[Sequence] = []
        pick: list[int] = []  # row of `logits` each sampling sequence reads
        for i, (seq, _, toks) in enumerate(rows):
            if id(seq) not in reps and seq.num_cached + len(toks) == len(seq):
                seqs.append(seq)
                pick.append(i)
        for seq, _, toks in rows:
            seq.num_cached += len(toks)
        extend: list[tuple[Sequence, int, list[int]]] = []
        row_of = {id(seq): i for i, (seq, _, _) in enumerate(rows)}
        for members in shared:
            rep, n = members[0], len(members[0].prompt_ids)
            self.cache.fork(rep.slot, [m.slot for m in members[1:]], n)
            for m in members:
                m.num_cached = n
                if len(m) == n:
                    seqs.append(m)
                    pick.append(row_of[id(rep)])
                else:
                    extend.append((m, n, m.output_ids))
        out = logits if pick == list(range(len(rows))) else logits[torch.tensor(pick, dtype=torch.long, device=logits.device)]
        if extend:
            more = self._forward(extend)
            seqs += [seq for seq, _, _ in extend]
            out = torch.cat([out, more])
            for seq, _, toks in extend:
                seq.num_cached += len(toks)
        return seqs, out

    def _decode_only(self) -> bool:
        """Every running sequence has all but its last token cached: this step feeds one token per row."""
        return all(seq.num_cached == len(seq) - 1 for seq in self._rows)

    def _forward(self, rows: list[tuple[Sequence, int, list[int]]]) -> torch.Tensor:
        for _, _, toks in rows:
            if len(toks) == 1:
                self.decode_tokens += 1
            else:
                self.prefill_tokens += len(toks)
        return self.runner.forward([s.slot for s, _, _ in rows], [st for _, st, _ in rows], [t for _, _, t in rows])

    def _sample(self, batch: list[Sequence], logits: torch.Tensor) -> None:
        """Draw row i's token for `batch[i]` from `logits[i]`, record it, and mark finished sequences."""
        temps = torch.tensor([s.params.temperature for s in batch], dtype=torch.float32, device=logits.device)
        top_ps = torch.tensor([s.params.top_p for s in batch], dtype=torch.float32, device=logits.device)
        tokens, logps = sample(logits, temps, top_ps, self.generator)
        for seq, tok, lp in zip(batch, tokens.tolist(), logps.tolist()):
            seq.output_ids.append(tok)
            seq.logprobs.append(lp)
            seq.versions.append(self.version)
            seq.done = self._finish_reason(seq, tok)

    def _finish_reason(self, seq: Sequence, tok: int) -> str | None:
        if tok == self.eos_token_id and not seq.params.ignore_eos:
            return "stop"
        if len(seq.output_ids) >= seq.params.max_new_tokens or len(seq) >= self.max_seq_len:
            return "length"
        return None

    def _release(self, leaving: list[Sequence]) -> None:
        """Remove sequences and keep the rows compact: live rows past the new end move into holes."""
        gone = {id(s) for s in leaving}
        for seq in leaving:
            del self._running[seq.rid]
            seq.slot = -1
        n = len(self._rows) - len(leaving)
        holes = [i for i in range(n) if id(self._rows[i]) in gone]
        movers = [s for s in self._rows[n:] if id(s) not in gone]
        moves = []
        for hole, seq in zip(holes, movers):
            moves.append((seq.slot, hole, seq.num_cached))
            self._rows[hole] = seq
            seq.slot = hole
        del self._rows[n:]
        self.cache.compact([m for m in moves if m[2] > 0], n)
