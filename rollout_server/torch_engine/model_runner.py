"""Model runners: one call computes next-token logits for a batch of (slot, start, tokens) rows.

A row feeds `tokens` (the not-yet-cached tail of its sequence) at positions `start, start+1, ...`,
attends to everything cached in its slot before them, writes their K/V into the slot, and yields
the logits after its last token. Decode rows have one token, prefill/re-prefill rows many.

`FastLlamaRunner` (Llama / Qwen2 / Qwen3 / Mistral without an active sliding window) runs the
layers directly on the model's live parameters, so an in-place weight update is seen at once.
All tokens of a step, decode and prefill alike, are packed into one `[T, hidden]` matrix: every
linear layer runs once per step with no padding; only attention is split into the decode group
(one query per row, keys read as a view of the slot buffers) and the prefill group (queries
padded to the longest chunk). Logits are computed only for each row's last token. The linear
kernel is chosen per step size by timing at start-up (`linear_choice`); so is the decode group's
attention (`attention_choice`: SDPA per contiguous bucket of rows, or one C++ kernel call for all
rows at their own lengths, `attention_kernel`, which then also stores the decode rows' new K/V
itself); prefill attention is always SDPA. Decode-only steps
can run their dense work compiled, checked against eager (`compiled_decode`, `enable_compile`).

`HFRunner` (`hf_runner`) is the generic fallback for any other causal LM: the Hugging Face forward
with the slot cache passed as its KV cache (`hf_runner.cache_keyword`). `make_runner` picks between the two.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from rollout_server.kernel_report import KernelChoice
from rollout_server.torch_engine.attention_choice import AttentionChoice, Mode, pick_attention, probe_shapes
from rollout_server.torch_engine.attention_kernel import load_kernel
from rollout_server.torch_engine.compiled_decode import CheckedCompile, CompileStatus
from rollout_server.torch_engine.hf_runner import HFRunner, additive_mask, attention_layout
from rollout_server.torch_engine.kv_cache import SlotKVCache, contiguous_range
from rollout_server.torch_engine.linear_choice import LinearChoice, candidates, pick_linears

log = logging.getLogger(__name__)

FAST_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated, so RoPE is `x * cos + roll(x, D/2) * signed_sin`: the same
    products as HF's `x * cos + rotate_half(x) * sin` (only where the sign sits), one op fewer per tensor."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q [B, Hkv, M, D] against k/v [B, Hkv, L, D] (views are fine).

    PyTorch's fused kernel (online softmax, fp32 accumulation): on the 2-core CI machine it ran the
    sum_cot decode attention a few percent faster than two matmuls and a softmax, which it replaced.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class DenseFns:
    """A layer's dense work around attention, and the LM head, as pure functions of tensors.

    `layer_in`: input norm, q/k/v projections (and Qwen3's per-head q/k norms), RoPE (`sin` is
    `_signed_sin` of the rotary embedding's sin).
    `layer_out`: output projection + residual, post-attention norm, gated MLP + residual.
    `head`: final norm, LM head, fp32 logits. Weights are arguments (read from the live model
    each step), so one compiled graph serves every layer and sees in-place weight updates."""

    def __init__(self, lin: Callable, num_heads: int, num_kv_heads: int, head_dim: int, act: Callable) -> None:
        H, Hkv, D = num_heads, num_kv_heads, head_dim

        half = D // 2

        def layer_in(x, cos, sin, ln_w, eps, wq, bq, wk, bk, wv, bv, qn_w, qn_eps, kn_w, kn_eps):
            h = F.rms_norm(x, (x.shape[-1],), ln_w, eps)
            q = lin(h, wq, bq).view(-1, H, D)
            k = lin(h, wk, bk).view(-1, Hkv, D)
            v = lin(h, wv, bv).view(-1, Hkv, D)
            if qn_w is not None:  # Qwen3: per-head RMSNorm before RoPE
                q, k = F.rms_norm(q, (D,), qn_w, qn_eps), F.rms_norm(k, (D,), kn_w, kn_eps)
            return q * cos + q.roll(half, -1) * sin, k * cos + k.roll(half, -1) * sin, v

        def layer_out(x, o, wo, bo, ln_w, eps, wg, bg, wu, bu, wd, bd):
            x = x + lin(o, wo, bo)
            h = F.rms_norm(x, (x.shape[-1],), ln_w, eps)
            return x + lin(act(lin(h, wg, bg)) * lin(h, wu, bu), wd, bd)

        def head(x, ln_w, eps, w, b):
            return lin(F.rms_norm(x, (x.shape[-1],), ln_w, eps), w, b).float()

        self.layer_in, self.layer_out, self.head = layer_in, layer_out, head

    def mapped(self, transform: Callable[[Callable], Callable]) -> DenseFns:
        """A copy with every function passed through `transform` (e.g. a compiler)."""
        out = copy.copy(self)
        out.layer_in, out.layer_out, out.head = (transform(f) for f in (self.layer_in, self.layer_out, self.head))
        return out


def _layer_weights(layer: torch.nn.Module) -> tuple[tuple, tuple]:
    """(layer_in weights, layer_out weights) in `DenseFns` argument order, from the live modules."""
    attn, mlp, ln, post = layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm
    qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    w_in = (ln.weight, ln.variance_epsilon, attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight,
            attn.k_proj.bias, attn.v_proj.weight, attn.v_proj.bias,
            None if qn is None else qn.weight, None if qn is None else qn.variance_epsilon,
            None if kn is None else kn.weight, None if kn is None else kn.variance_epsilon)
    w_out = (attn.o_proj.weight, attn.o_proj.bias, post.weight, post.variance_epsilon, mlp.gate_proj.weight,
             mlp.gate_proj.bias, mlp.up_proj.weight, mlp.up_proj.bias, mlp.down_proj.weight, mlp.down_proj.bias)
    return w_in, w_out


def probe_rows(max_running: int) -> tuple[list[int], list[int]]:
    """Token-row counts the linear kernels are timed at: decode steps (1 .. max_running rows) and a
    prefill step (more rows than any decode step; capped so start-up timing stays short)."""
    decode = sorted({1, min(16, max_running), max_running})
    return decode, [max(max_running + 1, min(4 * max_running, 512))]


class FastLlamaRunner:
    def __init__(self, model: transformers.PreTrainedModel, cache: SlotKVCache,
                 kernel_cache: Path | None = None, decode_attention: Mode = "auto") -> None:
        """`kernel_cache`: the JSON file caching the linear kernel and attention choices (None: not
        cached). `decode_attention`: "auto" times SDPA against the kernel if this machine has built it,
        "sdpa" or "kernel" force one (`attention_choice.pick_attention`; an unusable kernel means SDPA)."""
        cfg = model.config.get_text_config()
        self.model, self.cache = model, cache
        inner = model.model
        self.embed, self.layers, self.norm, self.rotary = inner.embed_tokens, inner.layers, inner.norm, inner.rotary_emb
        self.lm_head = model.lm_head
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.group = self.num_heads // self.num_kv_heads
        self.silu = getattr(cfg, "hidden_act", "silu") == "silu"
        self.act = F.silu if self.silu else self.layers[0].mlp.act_fn  # activations are stateless
        # Each layer's parameters, looked up once: the tuples hold the live Parameter objects, so an
        # in-place update (Engine.update_weights copies into them) is seen at the next step.
        self._weights = [_layer_weights(layer) for layer in self.layers]
        self.scaling = self.layers[0].self_attn.scaling
        w_in, w_out = self._weights[0]
        weights = [(w_in[i], w_in[i + 1]) for i in (2, 4, 6)] + [(w_out[i], w_out[i + 1]) for i in (0, 4, 6, 8)]
        self.linear: LinearChoice = pick_linears(weights + [(self.lm_head.weight, self.lm_head.bias)],
                                                 *probe_rows(cache.max_slots), cache_path=kernel_cache)
        kernels = candidates(cache.device, cache.dtype)
        self._eager = {name: DenseFns(kernels[name], self.num_heads, self.num_kv_heads, self.head_dim, self.act)
                       for name in {self.linear.decode, self.linear.prefill}}
        loader = (lambda: load_kernel(build=decode_attention == "kernel"))
        self.attention: AttentionChoice
        self.attention, self._kernel = pick_attention(
            decode_attention, num_kv_heads=self.num_kv_heads, group=self.group, head_dim=self.head_dim,
            dtype=cache.dtype, device=cache.device, shapes=probe_shapes(cache.max_slots, cache.max_seq_len),
            cache_path=kernel_cache, loader=loader)
        self._compiled: DenseFns | None = None
        self._checked: CheckedCompile | None = None
        # A kernel call's fixed overhead (30 us) expressed in K/V row-positions at the attention kernels'
        # K/V read rate (4 GB/s: one small GEMM per row and head is far below a plain memory read), so a
        # new bucket is worth it only when it saves more padded positions than that (docs/benchmarks.md,
        # Rollout engine, for where the two constants come from).
        self.bucket_cost = max(16, int(30e-6 * 4e9 / (2 * self.num_kv_heads * self.head_dim * cache.dtype.itemsize)))
        self.forwards = 0  # number of model passes (tests and benchmarks read it)

    def _buckets(self, lens: list[int]) -> list[tuple[int, int, int]]:
        """Split decode rows (in slot order) into contiguous runs [a, b) attended up to their own longest
        length n, instead of every row reading up to the batch's longest. Greedy on a cost model: a
        run costs `bucket_cost` (per-call overhead, in row-positions of K/V read) + rows * longest."""
        out, a, m = [], 0, lens[0]
        for i in range(1, len(lens)):
            n = lens[i]
            grow = (i - a) * (n - m) if n > m else m - n  # extra padded positions if row i joins
            if grow > self.bucket_cost:
                out.append((a, i, m))
                a, m = i, n
            else:
                m = max(m, n)
        out.append((a, len(lens), m))
        return out

    def enable_compile(self, compiler: Callable[[Callable], Callable] | None = None, atol: float = 1e-4) -> None:
        """Run decode-only steps through compiled dense functions, each row bucket checked against
        eager first (`compiled_decode.CheckedCompile`); `compiler` defaults to `torch.compile`."""
        self._checked = CheckedCompile(atol=atol, compiler=compiler)
        plain = DenseFns(F.linear, self.num_heads, self.num_kv_heads, self.head_dim, self.act)
        self._compiled = plain.mapped(self._checked.compile)

    def use_linear(self, name: str) -> None:
        """Force one linear kernel for every step (benchmarks compare them); it must agree with F.linear."""
        if name in self.linear.refused or name not in candidates(self.cache.device, self.cache.dtype):
            raise ValueError(f"linear kernel {name!r} is not usable here")
        self.linear = replace(self.linear, decode=name, prefill=name, source="forced")
        self._eager = {name: DenseFns(candidates(self.cache.device, self.cache.dtype)[name], self.num_heads,
                                      self.num_kv_heads, self.head_dim, self.act)}

    def use_attention(self, variant: Mode) -> None:
        """Force one decode attention variant (benchmarks and tests compare them); "kernel" builds it
        if needed and falls back to SDPA, with the reason in `self.attention`, if it is unusable."""
        self.attention, self._kernel = pick_attention(
            variant, num_kv_heads=self.num_kv_heads, group=self.group, head_dim=self.head_dim,
            dtype=self.cache.dtype, device=self.cache.device, shapes=[])

    @property
    def compile_status(self) -> CompileStatus | None:
        return None if self._checked is None else self._checked.status

    def describe(self) -> str:
        status = self.compile_status
        return (f"fast runner, {self.linear.describe()}, {self.attention.describe()}, "
                + (status.describe() if status else "compile_decode=off"))

    def kernel_choices(self) -> list[KernelChoice]:
        """The kernel of each op and how it was chosen (`rollout_server.kernel_report`)."""
        lin, att, status = self.linear, self.attention, self.compile_status
        refused = f"refused {','.join(lin.refused)} (disagrees with F.linear)" if lin.refused else ""
        out = [KernelChoice(op="runner", kernel="fast", source="only")]
        out += [KernelChoice(op=f"linear_{cls}", kernel=getattr(lin, cls), source=lin.source, reason=refused,
                             seconds=lin.seconds.get(cls, {})) for cls in ("decode", "prefill")]
        out.append(KernelChoice(op="decode_attention", kernel=att.variant, source=att.source, reason=att.reason,
                                seconds=att.seconds))
        if status is None:
            out.append(KernelChoice(op="compiled_decode", kernel="off", source="forced"))
        else:
            out.append(KernelChoice(op="compiled_decode", kernel="off" if status.reason else "inductor",
                                    source="fallback" if status.reason else "forced", reason=status.reason or ""))
        return out

    def forward(self, slots: list[int], starts: list[int], chunks: list[list[int]]) -> torch.Tensor:
        self.forwards += 1
        rows = sum(len(c) for c in chunks)
        eager = self._eager[self.linear.for_rows(rows)]
        if self._checked is not None and self._compiled is not None and rows == len(chunks):  # decode only
            compiled = self._compiled
            return self._checked.step(rows, lambda: self._forward(slots, starts, chunks, compiled),
                                      lambda: self._forward(slots, starts, chunks, eager))
        return self._forward(slots, starts, chunks, eager)

    def _forward(self, slots: list[int], starts: list[int], chunks: list[list[int]], fns: DenseFns) -> torch.Tensor:
        dev, H, Hkv, D, G = self.cache.device, self.num_heads, self.num_kv_heads, self.head_dim, self.group
        single = [i for i, c in enumerate(chunks) if len(c) == 1]
        multi = [i for i, c in enumerate(chunks) if len(c) > 1]
        # Flat token layout: one token per decode row, then every prefill row's tokens in order.
        ids = [chunks[i][0] for i in single]
        pos = [starts[i] for i in single]
        tok_slot = [slots[i] for i in single]
        last = [0] * len(chunks)
        for j, i in enumerate(single):
            last[i] = j
        width = max((len(chunks[i]) for i in multi), default=0)
        pad_idx: list[int] = []
        for r, i in enumerate(multi):
            n, s = len(chunks[i]), starts[i]
            ids += chunks[i]
            pos += range(s, s + n)
            tok_slot += [slots[i]] * n
            pad_idx += range(r * width, r * width + n)
            last[i] = len(ids) - 1
        ends = [starts[i] + len(chunks[i]) for i in range(len(chunks))]
        self.cache.reserve(max(slots) + 1, max(ends))
        ids_t = torch.tensor(ids, device=dev)
        pos_t = torch.tensor(pos, device=dev)
        slot_t = torch.tensor(tok_slot, device=dev)
        nd = len(single)
        x = self.embed(ids_t)
        cos, sin = self.rotary(x[None], pos_t[None])
        cos, sin = cos[0, :, None], _signed_sin(sin[0, :, None])  # [T, 1, D]
        dtype = x.dtype

        if single:  # decode group: keys are views of the slot rows (gathered only if rows are scattered)
            d_slots = [slots[i] for i in single]
            d_lens = [ends[i] for i in single]
            rng = contiguous_range(d_slots)
            kernel = self._kernel
            if kernel is not None:  # one call for every row at its own length: no buckets, no mask
                d_slot_t, d_len_t = torch.tensor(d_slots, device=dev), torch.tensor(d_lens, device=dev)
            elif rng is None:
                buckets = [(0, nd, max(d_lens), torch.tensor(d_slots, device=dev))]
            else:
                buckets = [(a, b, n, (rng[0] + a, rng[0] + b)) for a, b, n in self._buckets(d_lens)]
            if kernel is None:
                key_pos = torch.arange(max(d_lens), device=dev)
                d_mask = additive_mask(key_pos[None, :] <= pos_t[:nd, None], dtype)[:, None, None]  # [Bd, 1, 1, L]
        if multi:  # prefill group: queries padded to the longest chunk
            p_slots = [slots[i] for i in multi]
            p_rows = contiguous_range(p_slots) or torch.tensor(p_slots, device=dev)
            p_len = max(ends[i] for i in multi)
            pad_t = torch.tensor(pad_idx, device=dev)
            q_pos = torch.zeros(len(multi) * width, dtype=torch.long, device=dev)
            q_pos[pad_t] = pos_t[nd:]
            key_pos = torch.arange(p_len, device=dev)
            allowed = key_pos[None, None, :] <= q_pos.view(len(multi), width, 1)
            p_mask = additive_mask(allowed, dtype)[:, None].repeat(1, 1, G, 1)  # [Bp, 1, G*W, L]

        # Where each token's K/V goes, the same in every layer; with `append` the decode rows' K/V is
        # stored by the attention kernel itself, so only the prefill tokens are written here.
        append = getattr(self._kernel, "append", None) if single else None  # the built kernel has it
        fused = append is not None
        first = nd if fused else 0
        at = self.cache.flat_index(slot_t[first:], pos_t[first:]) if len(ids) > first else None
        scaling = self.scaling
        for li, (w_in, w_out) in enumerate(self._weights):
            q, k, v = fns.layer_in(x, cos, sin, *w_in)
            if at is not None:
                self.cache.write_flat(li, at, k[first:], v[first:])
            outs = []
            if single:
                qd = q[:nd].view(nd, Hkv, G, D)
                if fused:
                    o = append(qd, self.cache.keys[li], self.cache.values[li], d_slot_t, d_len_t, scaling, k[:nd],
                               v[:nd])
                    outs.append(o.reshape(nd, H * D))
                elif kernel is not None:
                    o = kernel(qd, self.cache.keys[li], self.cache.values[li], d_slot_t, d_len_t, scaling)
                    outs.append(o.reshape(nd, H * D))
                for a, b, n, rows in [] if kernel is not None else buckets:
                    kc, vc = self.cache.read(li, rows, n)
                    outs.append(_attend(qd[a:b], kc, vc, d_mask[a:b, ..., :n], scaling).reshape(b - a, H * D))
            if multi:
                kc, vc = self.cache.read(li, p_rows, p_len)
                qp = q.new_zeros(len(multi) * width, H, D)
                qp[pad_t] = q[nd:]
                qp = qp.view(len(multi), width, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(len(multi), Hkv, G * width, D)
                o = _attend(qp, kc, vc, p_mask, scaling)  # [Bp, Hkv, G*W, D]
                o = o.view(len(multi), H, width, D).transpose(1, 2).reshape(len(multi) * width, H * D)
                outs.append(o[pad_t])
            o = outs[0] if len(outs) == 1 else torch.cat(outs)
            x = fns.layer_out(x, o, *w_out)
        x = x[torch.tensor(last, device=dev)] if multi else x  # decode only: row i is already token i
        return fns.head(x, self.norm.weight, self.norm.variance_epsilon, self.lm_head.weight, self.lm_head.bias)


@torch.inference_mode()
def _fast_path_agrees(model: transformers.PreTrainedModel, runner: FastLlamaRunner, vocab: int) -> bool:
    """Run a prefill + one decode step through the fast runner and compare with the HF forward."""
    gen = torch.Generator().manual_seed(0)
    n = min(8, runner.cache.max_seq_len)
    ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
    got = torch.cat([runner.forward([0], [0], [ids[:-1]]), runner.forward([0], [n - 1], [ids[-1:]])])
    runner.forwards = 0
    ref = model(input_ids=torch.tensor([ids], device=runner.cache.device)).logits[0, [-2, -1]].float()
    tol = (1e-3 if runner.cache.dtype == torch.float32 else 5e-2) * max(1.0, ref.abs().max().item())
    return bool((got - ref).abs().max() <= tol)


def make_runner(model: transformers.PreTrainedModel, cache: SlotKVCache, fast: bool | None = None, *,
                kernel_cache: Path | None = None, compile_decode: bool = False, decode_attention: Mode = "auto"):
    """The fast runner when the architecture is one it reproduces (verified numerically), else HF's forward.

    `kernel_cache`: where the fast runner caches its linear kernel choice; `compile_decode`: its decode
    steps run compiled (checked against eager, falling back on any error); `decode_attention`: its decode
    attention variant (`FastLlamaRunner`). The HF path ignores all three."""
    cfg = model.config.get_text_config()
    layer_types, window = attention_layout(cfg)
    supported = (type(model).__name__ in FAST_ARCHITECTURES and "sliding_attention" not in layer_types
                 and not (window and window < cache.max_seq_len)
                 and getattr(cfg, "partial_rotary_factor", 1.0) in (None, 1.0)
                 and all(hasattr(model.model, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")))
    if fast is False or (fast is None and not supported):
        why = f"the fast runner does not support {type(model).__name__} with this config"
        return HFRunner(model, cache, *(("forced", "") if fast is False else ("fallback", why)))
    if not supported:
        raise ValueError(f"the fast runner does not support {type(model).__name__} with this config")
    runner = FastLlamaRunner(model, cache, kernel_cache, decode_attention)
    if _fast_path_agrees(model, runner, cfg.vocab_size):
        if compile_decode:
            runner.enable_compile()
        return runner
    log.warning("fast runner disagrees with the Hugging Face forward for %s; using the generic path",
                type(model).__name__)
    return HFRunner(model, cache, "fallback", "the fast runner disagrees with the Hugging Face forward")
