"""The decode attention kernel and its choice: exact to SDPA, SDPA whenever it is unusable.

The choice logic runs on stand-in kernels and a fake timer. The tests that need the real kernel
share one build per machine (`attention_kernel.build_root()`): the first run on a machine compiles
it (about a minute on 2 cores), later runs load it.
"""
from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rollout_server.sampling import SamplingParams
from rollout_server.torch_engine.attention_choice import (
    AttentionChoice,
    kernel_agrees,
    pick_attention,
    probe_shapes,
    sdpa_decode,
)
from rollout_server.torch_engine.attention_kernel import KernelBuild, decode_attention_ref, load_kernel
from rollout_server.torch_engine.linear_choice import read_cache

torch.set_num_threads(1)
CPU = torch.device("cpu")
HEADS = {"num_kv_heads": 2, "group": 2, "head_dim": 16, "dtype": torch.float32, "device": CPU}


def wrong(q, k, v, slots, lens, scale):  # off by 1e-3: must be refused
    return sdpa_decode(q, k, v, slots, lens, scale) * 1.001


def good(fn=sdpa_decode):
    return lambda: KernelBuild(fn, "loaded")


def failing_loader() -> KernelBuild:
    return KernelBuild(None, "build/load failed: CalledProcessError: no g++")


def fake_timer(times: dict[str, float]):
    calls = []

    def timer(passes):
        calls.append(sorted(passes))
        for run in passes.values():  # each probe pass runs (the real timer runs them many times)
            run()
        return dict(times)

    timer.calls = calls
    return timer


# --- the choice, on stand-in kernels -------------------------------------------------------------
def test_sdpa_mode_never_loads_the_kernel() -> None:
    def loader():
        raise AssertionError("sdpa mode must not build or load the kernel")

    choice, fn = pick_attention("sdpa", **HEADS, shapes=[(2, 8)], loader=loader)
    assert choice == AttentionChoice("sdpa", "forced") and fn is None
    assert choice.describe() == "decode attention=sdpa (forced)"


@pytest.mark.parametrize("mode", ["auto", "kernel"])
def test_a_kernel_that_fails_to_build_falls_back_to_sdpa_with_the_reason(mode: str, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        choice, fn = pick_attention(mode, **HEADS, shapes=[(2, 8)], loader=failing_loader)
    assert fn is None and choice.variant == "sdpa" and choice.source == "fallback"
    assert "no g++" in choice.reason and "no g++" in choice.describe()
    assert ("unusable" in caplog.text) == (mode == "kernel")  # asked for explicitly: a warning


def test_a_kernel_that_disagrees_with_sdpa_is_refused_even_when_forced() -> None:
    for mode in ("auto", "kernel"):
        choice, fn = pick_attention(mode, **HEADS, shapes=[(2, 8)], loader=good(wrong))
        assert fn is None and choice.variant == "sdpa" and "disagrees" in choice.reason


def test_non_cpu_devices_use_sdpa() -> None:
    choice, fn = pick_attention("auto", **{**HEADS, "device": torch.device("meta")}, shapes=[(2, 8)],
                                loader=failing_loader)
    assert fn is None and "CPU-only" in choice.reason


def test_bad_mode_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="auto, sdpa or kernel"):
        pick_attention("fast", **HEADS, shapes=[(2, 8)])  # type: ignore[arg-type]


@pytest.mark.parametrize(("times", "want"), [({"sdpa": 2.0, "kernel": 1.0}, "kernel"),
                                             ({"sdpa": 1.0, "kernel": 0.99}, "sdpa"),  # within the margin
                                             ({"sdpa": 1.0, "kernel": 2.0}, "sdpa")])
def test_auto_times_both_and_caches_the_choice(tmp_path, times, want: str) -> None:
    path, timer = tmp_path / "kernels.json", fake_timer(times)
    choice, fn = pick_attention("auto", **HEADS, shapes=[(3, 10)], cache_path=path, loader=good(), timer=timer)
    assert (choice.variant, choice.source, choice.seconds) == (want, "timed", times)
    assert (fn is not None) == (want == "kernel") and timer.calls == [["kernel", "sdpa"]]
    again, _ = pick_attention("auto", **HEADS, shapes=[(3, 10)], cache_path=path, loader=good(), timer=timer)
    assert (again.variant, again.source) == (want, "cache") and len(timer.calls) == 1
    other, _ = pick_attention("auto", **{**HEADS, "head_dim": 32}, shapes=[(3, 10)], cache_path=path,
                              loader=good(), timer=timer)  # another head shape: timed again
    assert other.source == "timed" and len(timer.calls) == 2
    assert len(read_cache(path)) == 2


def test_forced_kernel_skips_timing() -> None:
    choice, fn = pick_attention("kernel", **HEADS, shapes=[(2, 8)], loader=good(), timer=fake_timer({}))
    assert choice == AttentionChoice("kernel", "forced") and fn is sdpa_decode


def test_probe_shapes_follow_the_engine_and_stay_small() -> None:
    assert probe_shapes(256, 768) == [(1, 400), (64, 400)]
    assert probe_shapes(4, 64) == [(1, 64), (4, 64)]
    assert probe_shapes(1, 30) == [(1, 30)]


def test_load_kernel_reports_a_failing_builder_and_never_raises(tmp_path) -> None:
    def builder(name, directory):
        raise OSError("compiler not found")

    built = load_kernel(tmp_path, builder=builder)
    assert built.fn is None and "compiler not found" in built.reason
    unbuilt = load_kernel(tmp_path / "other", builder=builder, build=False)
    assert unbuilt.fn is None and "not built" in unbuilt.reason


def test_sdpa_decode_matches_the_plain_definition() -> None:
    q, k, v, slots, lens = random_case(torch.Generator().manual_seed(1), rows=5, hkv=2, g=3, d=8, alloc=20)
    torch.testing.assert_close(sdpa_decode(q, k, v, slots, lens, 0.3), decode_attention_ref(q, k, v, slots, lens, 0.3))
    rng = torch.arange(2, 7)  # a contiguous range of slots: read as a view, same result
    torch.testing.assert_close(sdpa_decode(q, k, v, rng, lens, 0.3), decode_attention_ref(q, k, v, rng, lens, 0.3))


# --- the real kernel -------------------------------------------------------------------------------
def random_case(gen, rows: int, hkv: int, g: int, d: int, alloc: int, dtype=torch.float32):
    slots = torch.randperm(rows + 3, generator=gen)[:rows]  # scattered, some slots unused
    lens = torch.randint(1, alloc + 1, (rows,), generator=gen)
    lens[0] = 1  # always a row of length 1
    q = torch.randn(rows, hkv, g, d, generator=gen).to(dtype)
    k = torch.randn(rows + 3, hkv, alloc, d, generator=gen).to(dtype)
    v = torch.randn(rows + 3, hkv, alloc, d, generator=gen).to(dtype)
    return q, k, v, slots, lens


@pytest.mark.timeout(600)  # the first run on a machine compiles the kernel
@pytest.mark.parametrize(("hkv", "g", "d"), [(4, 1, 48), (2, 4, 64), (1, 7, 20), (3, 2, 16)])
def test_kernel_equals_sdpa(kernel, hkv: int, g: int, d: int) -> None:
    gen = torch.Generator().manual_seed(hkv * 100 + g * 10 + d)
    for rows, alloc in [(1, 1), (6, 64), (17, 200)]:
        q, k, v, slots, lens = random_case(gen, rows, hkv, g, d, alloc)
        scale = d ** -0.5
        ref = decode_attention_ref(q, k, v, slots, lens, scale)
        got = kernel(q, k, v, slots, lens, scale)
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert (got - sdpa_decode(q, k, v, slots, lens, scale)).abs().max() <= 1e-5 * ref.abs().max()
    assert kernel_agrees(kernel, hkv, g, d, torch.float32, CPU)


@pytest.mark.timeout(600)
def test_kernel_splits_work_over_threads_without_changing_the_result(kernel) -> None:
    q, k, v, slots, lens = random_case(torch.Generator().manual_seed(5), 9, 3, 2, 48, 130)
    one = kernel(q, k, v, slots, lens, 0.1)
    torch.set_num_threads(2)
    try:
        two = kernel(q, k, v, slots, lens, 0.1)
    finally:
        torch.set_num_threads(1)
    assert torch.equal(one, two)  # each (row, KV head) is computed whole by one thread: bitwise equal


@pytest.mark.timeout(600)
def test_kernel_in_bfloat16_accumulates_in_fp32(kernel) -> None:
    q, k, v, slots, lens = random_case(torch.Generator().manual_seed(3), 5, 2, 2, 32, 300, torch.bfloat16)
    ref = decode_attention_ref(q, k, v, slots, lens, 0.2)
    got = kernel(q, k, v, slots, lens, 0.2)
    assert got.dtype == torch.bfloat16 and (got.float() - ref.float()).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.timeout(600)
def test_kernel_rejects_bad_input_by_name(kernel) -> None:
    q, k, v, slots, lens = random_case(torch.Generator().manual_seed(4), 3, 2, 1, 8, 10)
    with pytest.raises(RuntimeError, match="slot 99"):
        kernel(q, k, v, torch.tensor([0, 1, 99]), lens, 1.0)
    with pytest.raises(RuntimeError, match="length 11 outside 1..10"):
        kernel(q, k, v, slots, torch.tensor([1, 11, 2]), 1.0)
    with pytest.raises(RuntimeError, match="length 0"):
        kernel(q, k, v, slots, torch.tensor([0, 1, 2]), 1.0)
    with pytest.raises(RuntimeError, match="does not match the cache"):
        kernel(q[:, :1], k, v, slots, lens, 1.0)


# --- the engine with the kernel --------------------------------------------------------------------
EOS = 3
PROMPTS = [[1, 2, 5], [5, 6, 7, 8, 9], [4], [7, 8] * 6, [30, 1]]


def gqa_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=56, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.1)
    return LlamaForCausalLM(cfg).eval()


def generate(engine, n: int = 16) -> dict:
    params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add(str(i), p, params)
    done = {}
    while engine.has_work():
        for f in engine.step():
            done[f.rid] = f
    return done


@pytest.mark.timeout(600)
def test_engine_greedy_tokens_and_logprobs_equal_with_kernel_and_sdpa(kernel, tmp_path) -> None:
    from rollout_server.torch_engine.engine import Engine

    model = gqa_model()
    ref_engine = Engine(model, EOS, max_running=3, decode_attention="sdpa", kernel_cache=tmp_path / "k.json")
    engine = Engine(model, EOS, max_running=3, decode_attention="kernel", kernel_cache=tmp_path / "k.json")
    assert ref_engine.runner.attention.variant == "sdpa"
    assert engine.runner.attention == AttentionChoice("kernel", "forced")
    assert "decode attention=kernel (forced)" in engine.kernel_summary()
    ref, got = generate(ref_engine), generate(engine)
    assert set(got) == set(ref)
    for rid, f in ref.items():
        assert got[rid].output_ids == f.output_ids, rid
        torch.testing.assert_close(torch.tensor(got[rid].logprobs), torch.tensor(f.logprobs), atol=1e-4, rtol=0)


# --- the app layer builds it before the roles start ------------------------------------------------
@pytest.mark.parametrize(("overrides", "built", "builds"), [([], False, True), ([], True, False),
                                                            (["rollout.decode_attention=sdpa"], False, False)])
def test_prepare_kernels_builds_once_and_only_when_the_kernel_may_be_used(monkeypatch, overrides, built,
                                                                          builds) -> None:
    from areal_py.app.model_dir import prepare_kernels
    from areal_py.config import load_config
    from rollout_server.torch_engine import attention_kernel

    calls, said = [], []
    monkeypatch.setattr(attention_kernel, "is_built", lambda root=None: built)
    monkeypatch.setattr(attention_kernel, "load_kernel", lambda: calls.append(1) or failing_loader())
    prepare_kernels(load_config(None, overrides), say=said.append)
    assert bool(calls) == builds
    if builds:  # announced before, and a failure says the servers use SDPA
        assert "building the decode attention kernel" in said[0] and "use SDPA: build/load failed" in said[1]


def test_the_config_reaches_the_server_engine_and_its_log(monkeypatch, tmp_path, caplog) -> None:
    from areal_py.config import load_config
    from areal_py.models import build_char_tokenizer
    from rollout_server import server

    model = gqa_model()
    monkeypatch.setattr(server, "model_path", lambda c: tmp_path)
    monkeypatch.setattr(server, "load_model_and_tokenizer", lambda path, dtype: (model, build_char_tokenizer()))
    assert load_config(None, []).rollout.decode_attention == "auto"
    cfg = load_config(None, [f"model.cache_dir={tmp_path}", "rollout.max_running=2", "rollout.decode_attention=sdpa"])
    with caplog.at_level(logging.INFO, logger="rollout"):
        eng = server.build_engine(cfg, seed=1)
    assert eng.runner.attention == AttentionChoice("sdpa", "forced")
    assert "decode attention=sdpa (forced)" in caplog.text
