"""The machine's limits, measured, and the floor time they put under a decode step or a learner step.

`measure_machine(threads)` times, at `threads` torch threads, the three numbers a floor needs: the
fp32 GEMM peak (a large `torch.mm`), the DRAM read bandwidth (a sum over a buffer many times the
last-level cache) and a cache-resident read bandwidth (a sum over a buffer that fits in it). Each is
the best of a few timed repetitions: a peak is what the machine *can* do, and the shared machine's
noise only ever makes a repetition slower. At one thread the clock is the process's CPU time, as in
the benchmarks that compare against these limits (time another process holds the core would
otherwise count as slowness of this machine and inflate the floor); at more threads it is wall time
(CPU time would add the threads up). Measure once per benchmark run, at the thread count the
benchmark uses; the numbers depend on it.

The floors are pure functions of a model shape, a workload and a `MachineLimits`:

- a decode step (one new token for each of `len(contexts)` rows) must at least do its FLOPs at the
  GEMM peak and read every linear weight once plus each row's K/V cache once, at the bandwidth of
  the memory level its working set fits in: floor = max(flops / peak, bytes / bandwidth);
- a learner step must at least do its useful FLOPs (forward + backward = 3x the forward's matmul
  FLOPs, causal attention over real tokens only, no padding) at the GEMM peak.

FLOP counts are matmul FLOPs (2 per multiply-add) of the linear layers (q, k, v, o, gate, up, down
and the LM head; embeddings are lookups) and of attention (q.k and p.v); norms, RoPE, softmax and
biases are left out, so the floor stays a lower bound. Run `python -m benchmarks.roofline` to print
the limits of the machine at hand.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class MachineLimits:
    """What one process at `threads` torch threads can do at most (fp32)."""

    threads: int
    gemm_gflops: float  # fp32 GEMM, GFLOP/s
    dram_gbps: float  # read bandwidth from a buffer far larger than the last-level cache, GB/s (1e9 bytes)
    cache_gbps: float  # read bandwidth from a buffer resident in the last-level cache, GB/s
    cache_bytes: int  # the last-level cache: a working set up to this size reads at cache_gbps

    def read_gbps(self, nbytes: float) -> float:
        """The bandwidth a working set of `nbytes` is read at: the cache's if it fits there, else DRAM's."""
        return self.cache_gbps if nbytes <= self.cache_bytes else self.dram_gbps

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder that its FLOPs and bytes depend on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, cfg) -> ModelShape:
        """From a Hugging Face (text) config: Llama, Qwen2/3, Mistral field names."""
        heads = cfg.num_attention_heads
        return cls(hidden=cfg.hidden_size, layers=cfg.num_hidden_layers, heads=heads,
                   kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                   head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                   intermediate=cfg.intermediate_size, vocab=cfg.vocab_size)

    @property
    def linear_params(self) -> int:
        """Weights every token multiplies by: the attention and MLP projections of each layer and the LM head."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (q_o + k_v + mlp) + self.vocab * self.hidden

    def attention_flops(self, query_key_pairs: int) -> int:
        """FLOPs of q.k and p.v over `query_key_pairs` (query, key) pairs in every layer and head."""
        return 4 * self.layers * self.heads * self.head_dim * query_key_pairs

    def kv_bytes(self, positions: int, dtype_bytes: int = 4) -> int:
        """Bytes of the K and V cache entries of `positions` token positions, all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * positions * dtype_bytes


# --- floors (pure) ---------------------------------------------------------------------------------
def decode_step_flops(shape: ModelShape, contexts: Sequence[int]) -> int:
    """One new token per row; row i attends to `contexts[i]` positions (its cache plus the new token)."""
    return 2 * shape.linear_params * len(contexts) + shape.attention_flops(sum(contexts))


def decode_step_bytes(shape: ModelShape, contexts: Sequence[int], dtype_bytes: int = 4) -> int:
    """Bytes a decode step must read: every linear weight once, and each row's K/V over its context once."""
    return shape.linear_params * dtype_bytes + shape.kv_bytes(sum(contexts), dtype_bytes)


def decode_floor_s(shape: ModelShape, contexts: Sequence[int], limits: MachineLimits, dtype_bytes: int = 4) -> float:
    """The fastest a decode step over rows with these context lengths can run on this machine."""
    flops = decode_step_flops(shape, contexts)
    nbytes = decode_step_bytes(shape, contexts, dtype_bytes)
    return max(flops / (limits.gemm_gflops * 1e9), nbytes / (limits.read_gbps(nbytes) * 1e9))


def train_step_flops(shape: ModelShape, seq_lens: Sequence[int]) -> int:
    """Useful FLOPs of a forward + backward over these sequences: no padding, causal attention
    (a sequence of n tokens has n(n+1)/2 query-key pairs); the backward costs twice the forward."""
    tokens = sum(seq_lens)
    pairs = sum(n * (n + 1) // 2 for n in seq_lens)
    return 3 * (2 * shape.linear_params * tokens + shape.attention_flops(pairs))


def linear_gemms(shape: ModelShape) -> list[tuple[int, int, int]]:
    """(in features, out features, count) of every linear a token goes through: q, k, v, o, gate, up, down per
    layer and the LM head; sum(2 * in * out * count) == 2 * `ModelShape.linear_params` FLOPs per token."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    out = [(shape.hidden, q, shape.layers), (shape.hidden, kv, 2 * shape.layers), (q, shape.hidden, shape.layers),
           (shape.hidden, shape.intermediate, 2 * shape.layers), (shape.intermediate, shape.hidden, shape.layers),
           (shape.hidden, shape.vocab, 1)]
    merged: dict[tuple[int, int], int] = {}
    for i, o, n in out:
        merged[(i, o)] = merged.get((i, o), 0) + n
    return [(i, o, n) for (i, o), n in merged.items()]


def model_gemm_gflops(shape: ModelShape, tokens: int, threads: int = 1, repeats: int = 3) -> float:
    """The fp32 GEMM rate at the model's own linear shapes: forward (x W^T), input gradient (g W) and weight
    gradient (g^T x) of each linear at `tokens` rows, the fastest of `repeats` each, weighted as a training
    step weights them (FLOPs over summed times). An extra column beside the 2048^3 peak, not the floor's rate."""
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    before = torch.get_num_threads()
    clock = timing_clock(threads)
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    flops = seconds = 0.0
    try:
        with torch.inference_mode():
            for i, o, n in linear_gemms(shape):
                x, w, g = (torch.randn(*dims, generator=gen) for dims in ((tokens, i), (o, i), (tokens, o)))
                for a, b in ((x, w.t()), (g, w), (g.t(), x)):
                    seconds += n * _best_s(functools.partial(torch.mm, a, b), repeats, clock=clock)
                    flops += n * 2.0 * tokens * i * o
    finally:
        torch.set_num_threads(before)
    return flops / seconds / 1e9


def train_floor_s(flops: float, limits: MachineLimits) -> float:
    """The fastest `flops` useful FLOPs (e.g. `train_step_flops`) can run: at the measured GEMM peak."""
    return flops / (limits.gemm_gflops * 1e9)


def generation_floor_s(shape: ModelShape, prompt_lens: Sequence[int], new_lens: Sequence[int], max_running: int,
                       limits: MachineLimits, dtype_bytes: int = 4) -> float:
    """A lower bound on generating `new_lens[i]` tokens after prompt i with at most `max_running` rows a step.

    Request i runs a prefill of its p prompt tokens (which yields its first token) and n - 1 decode
    steps at contexts p + 1 .. p + n - 1. FLOPs do not depend on the schedule. Bytes do: each step reads
    the weights once, and no schedule has fewer than max(longest n, ceil(sum n / max_running)) steps;
    each cached position is read once per query that attends to it in a decode step (a prefill reads
    its own K/V once). The bandwidth is that of the average step's working set. Since a sum of
    per-step maxima is at least the maximum of the sums, max(flops / peak, bytes / bandwidth) is a floor.
    """
    if len(prompt_lens) != len(new_lens):
        raise ValueError("one prompt length per request")
    if not new_lens:
        return 0.0
    flops = kv_positions = 0
    for p, n in zip(prompt_lens, new_lens):
        decode_ctx = (n - 1) * p + n * (n - 1) // 2  # sum of contexts p+1 .. p+n-1
        flops += 2 * shape.linear_params * (p + n - 1) + shape.attention_flops(p * (p + 1) // 2 + decode_ctx)
        kv_positions += p + decode_ctx
    steps = max(max(new_lens), math.ceil(sum(new_lens) / max_running))
    kv = shape.kv_bytes(kv_positions, dtype_bytes)
    weights = shape.linear_params * dtype_bytes
    nbytes = steps * weights + kv
    bandwidth = limits.read_gbps(weights + kv / steps)
    return max(flops / (limits.gemm_gflops * 1e9), nbytes / (bandwidth * 1e9))


# --- measurement -----------------------------------------------------------------------------------
def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """The largest CPU cache Linux reports for cpu0 (sysfs), else `default`."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        try:
            sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[text[-1]])
        except (KeyError, ValueError):
            continue
    return max(sizes, default=default)


def timing_clock(threads: int):
    """The clock a measurement at `threads` torch threads is timed by (see the module docstring)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return time.process_time if threads == 1 else time.perf_counter


def _best_s(fn, repeats: int, inner: int = 1, clock=time.perf_counter) -> float:
    """Fastest of `repeats` timings of `inner` calls, per call (a warm-up call first)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t = clock()
        for _ in range(inner):
            fn()
        best = min(best, (clock() - t) / inner)
    return best


@torch.inference_mode()
def measure_machine(threads: int, gemm_n: int = 2048, dram_bytes: int | None = None, repeats: int = 5) -> MachineLimits:
    """Time the fp32 GEMM peak and the DRAM and cache read bandwidths at `threads` torch threads.

    The thread count is restored afterwards. `dram_bytes` defaults to 8x the last-level cache (at
    least 256 MiB); the cache-resident buffer is a quarter of the last-level cache. Smaller
    `gemm_n`/`dram_bytes`/`repeats` measure faster and less exactly (the benchmarks' quick modes).
    """
    before = torch.get_num_threads()
    clock = timing_clock(threads)
    torch.set_num_threads(threads)
    try:
        llc = last_level_cache_bytes()
        gemm_gflops = _gemm_gflops(gemm_n, repeats, clock)
        dram_gbps = _read_gbps((dram_bytes or max(8 * llc, 256 << 20)) // 4, repeats, clock)
        cache_gbps = _read_gbps(llc // 4 // 4, repeats, clock)
    finally:
        torch.set_num_threads(before)
    return MachineLimits(threads=threads, gemm_gflops=gemm_gflops, dram_gbps=dram_gbps, cache_gbps=cache_gbps,
                         cache_bytes=llc)


def _gemm_gflops(n: int, repeats: int, clock) -> float:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    return 2 * n ** 3 / _best_s(lambda: torch.mm(a, b, out=out), repeats, clock=clock) / 1e9


def _read_gbps(numel: int, repeats: int, clock) -> float:
    """A full fp32 sum over a buffer of `numel` floats: each byte read once, ~64 MiB read per timing."""
    buf = torch.ones(numel)
    inner = max(1, (64 << 20) // (4 * numel))
    return 4 * numel / _best_s(buf.sum, repeats, inner, clock) / 1e9


def main(argv: list[str] | None = None) -> MachineLimits:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="small buffers and few repetitions (less exact)")
    args = ap.parse_args(argv)
    limits = (measure_machine(args.threads, gemm_n=512, dram_bytes=64 << 20, repeats=2) if args.quick
              else measure_machine(args.threads))
    print(json.dumps(limits.to_dict()))
    return limits


if __name__ == "__main__":
    main()
