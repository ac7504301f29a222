"""The roofline's pure floor functions, against values worked out by hand on a toy shape."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks import roofline as R
from benchmarks.roofline import (
    MachineLimits,
    ModelShape,
    decode_floor_s,
    decode_step_bytes,
    decode_step_flops,
    generation_floor_s,
    measure_machine,
    timing_clock,
    train_floor_s,
    train_step_flops,
)

# Per layer: q,o 2*4*(2*2)=32, k,v 2*4*(1*2)=16, MLP 3*4*8=96 -> 144; 2 layers 288 + LM head 10*4 -> 328.
SHAPE = ModelShape(hidden=4, layers=2, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10)
# 1000 FLOP/s, 1000 B/s from DRAM, 2000 B/s from a 1000-byte cache: floors come out in whole seconds.
SLOW = MachineLimits(threads=1, gemm_gflops=1e-6, dram_gbps=1e-6, cache_gbps=2e-6, cache_bytes=1000)


def test_shape_counts() -> None:
    assert SHAPE.linear_params == 328
    assert SHAPE.attention_flops(1) == 4 * 2 * 2 * 2  # q.k and p.v, 2 FLOPs each, every layer and head
    assert SHAPE.kv_bytes(1) == 2 * 2 * 1 * 2 * 4  # K and V, 2 layers, 1 KV head of 2 floats


def test_shape_from_config_counts_the_models_linear_weights() -> None:
    cfg = LlamaConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, vocab_size=56, tie_word_embeddings=False)
    shape = ModelShape.from_config(cfg)
    assert (shape.head_dim, shape.kv_heads) == (12, 2)
    model = LlamaForCausalLM(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert shape.linear_params == linear


def test_decode_step_counts_and_floor() -> None:
    contexts = [1, 2, 3]  # 6 cached positions
    assert decode_step_flops(SHAPE, contexts) == 2 * 328 * 3 + 32 * 6 == 2160
    assert decode_step_bytes(SHAPE, contexts) == 328 * 4 + 32 * 6 == 1504
    assert decode_floor_s(SHAPE, contexts, SLOW) == pytest.approx(2.160)  # compute-bound: 2160 FLOP at 1000/s
    fast_gemm = MachineLimits(threads=1, gemm_gflops=1e-5, dram_gbps=1e-6, cache_gbps=2e-6, cache_bytes=1000)
    assert decode_floor_s(SHAPE, contexts, fast_gemm) == pytest.approx(1.504)  # 1504 B from DRAM at 1000 B/s
    big_cache = MachineLimits(threads=1, gemm_gflops=1e-5, dram_gbps=1e-6, cache_gbps=2e-6, cache_bytes=2000)
    assert decode_floor_s(SHAPE, contexts, big_cache) == pytest.approx(0.752)  # fits: 2000 B/s
    assert decode_step_bytes(SHAPE, contexts, dtype_bytes=2) == 328 * 2 + 16 * 6


def test_read_bandwidth_switches_at_the_cache_size() -> None:
    assert SLOW.read_gbps(1000) == 2e-6 and SLOW.read_gbps(1001) == 1e-6


def test_train_step_flops_and_floor() -> None:
    # 5 tokens; causal pairs 2*3/2 + 3*4/2 = 9; forward 2*328*5 + 32*9 = 3568, times 3 with the backward.
    flops = train_step_flops(SHAPE, [2, 3])
    assert flops == 3 * 3568 == 10704
    assert train_floor_s(flops, SLOW) == pytest.approx(10.704)


def test_generation_floor() -> None:
    # Prompt 2, 3 new tokens: prefill (2 tokens, 3 pairs), then decode at contexts 3 and 4.
    # FLOPs 2*328*4 + 32*(3 + 7) = 2944; steps 3, bytes 3*1312 + 32*(2 + 7) = 4224 from DRAM.
    assert generation_floor_s(SHAPE, [2], [3], 4, SLOW) == pytest.approx(4.224)
    # Two one-token requests through one slot need two steps, so the weights are read twice.
    assert generation_floor_s(SHAPE, [1, 1], [1, 1], 1, SLOW) == pytest.approx((2 * 1312 + 64) / 1000)
    fast_mem = MachineLimits(threads=1, gemm_gflops=1e-6, dram_gbps=1.0, cache_gbps=1.0, cache_bytes=1000)
    assert generation_floor_s(SHAPE, [2], [3], 4, fast_mem) == pytest.approx(2.944)
    assert generation_floor_s(SHAPE, [], [], 4, SLOW) == 0.0
    with pytest.raises(ValueError):
        generation_floor_s(SHAPE, [1], [1, 2], 4, SLOW)


def test_measure_machine_smoke() -> None:
    """Tiny sizes: the numbers are positive and finite and the thread count is restored (no timing claim)."""
    before = torch.get_num_threads()
    lim = measure_machine(1, gemm_n=64, dram_bytes=1 << 20, repeats=1)
    assert torch.get_num_threads() == before and lim.threads == 1 and lim.cache_bytes > 0
    for v in (lim.gemm_gflops, lim.dram_gbps, lim.cache_gbps):
        assert math.isfinite(v) and v > 0
    assert set(lim.to_dict()) == {"threads", "gemm_gflops", "dram_gbps", "cache_gbps", "cache_bytes"}


def test_one_thread_is_timed_in_process_cpu_time() -> None:
    """At one thread the limits are timed like the benchmarks that use them (process CPU time, which
    another process holding the core does not inflate); at more threads in wall time."""
    import time
    assert timing_clock(1) is time.process_time
    assert timing_clock(4) is time.perf_counter
    with pytest.raises(ValueError, match="threads"):
        timing_clock(0)


def test_best_s_is_the_fastest_repetition_per_call_on_a_fake_clock() -> None:
    # warm-up call, then 3 repetitions of 2 calls each; the clock reads 0,5 | 5,9 | 9,16: per call 2.5, 2, 3.5
    ticks = iter([0.0, 5.0, 5.0, 9.0, 9.0, 16.0])
    calls = []
    assert R._best_s(lambda: calls.append(1), repeats=3, inner=2, clock=lambda: next(ticks)) == 2.0
    assert len(calls) == 1 + 3 * 2


def test_linear_gemms_cover_the_linear_params():
    """Every linear counted once: sum(in * out * count) == linear_params, by hand for a small GQA shape."""
    shape = R.ModelShape(hidden=8, layers=2, heads=4, kv_heads=2, head_dim=2, intermediate=12, vocab=5)
    gemms = R.linear_gemms(shape)
    # per layer: q 8x8, k and v 8x4 each, o 8x8, gate and up 8x12 each, down 12x8; head 8x5
    assert sum(i * o * n for i, o, n in gemms) == 2 * (64 + 2 * 32 + 64 + 2 * 96 + 96) + 40 == shape.linear_params
    assert (8, 12, 4) in gemms and (8, 8, 4) in gemms  # gate+up of 2 layers; q+o of 2 layers merged by shape


def test_model_gemm_gflops_runs_and_checks_its_input():
    shape = R.ModelShape(hidden=8, layers=1, heads=2, kv_heads=2, head_dim=4, intermediate=16, vocab=5)
    threads = torch.get_num_threads()
    rate = R.model_gemm_gflops(shape, tokens=16, repeats=1)
    assert math.isfinite(rate) and rate > 0 and torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        R.model_gemm_gflops(shape, tokens=0)
