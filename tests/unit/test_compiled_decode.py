"""The compiled decode step: checked against eager per row bucket, falling back on any error or mismatch.

The default suite exercises the check and the fallback with stand-in compilers (identity, failing,
perturbing); the real `torch.compile` exactness test is marked slow (it compiles with a C++ toolchain).
"""
from __future__ import annotations

import logging
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rollout_server.sampling import SamplingParams
from rollout_server.torch_engine.compiled_decode import CheckedCompile, row_bucket
from rollout_server.torch_engine.engine import Engine

torch.set_num_threads(1)
EOS = 3
PROMPTS = [[1, 2, 5], [5, 6, 7, 8, 9], [4], [7, 8] * 6, [30, 1]]


def embedded_shape_model(seed: int = 0) -> LlamaForCausalLM:
    """The embedded default's shape (hidden 192, 4 layers, 4 heads, vocab 56), random init."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=56, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      initializer_range=0.1)
    return LlamaForCausalLM(cfg).eval()


def generate(engine: Engine, temperature: float = 0.0, n: int = 12) -> dict:
    params = SamplingParams(max_new_tokens=n, temperature=temperature, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add(str(i), p, params)
    done = {}
    while engine.has_work():
        for f in engine.step():
            done[f.rid] = f
    return done


def assert_same(got: dict, ref: dict) -> None:
    assert set(got) == set(ref)
    for rid, f in ref.items():
        assert got[rid].output_ids == f.output_ids, rid
        torch.testing.assert_close(torch.tensor(got[rid].logprobs), torch.tensor(f.logprobs), atol=1e-4, rtol=0)


# --- the check, on stand-in steps ------------------------------------------------------------------
def test_row_bucket() -> None:
    assert [row_bucket(n) for n in (1, 2, 3, 4, 5, 64, 65)] == [1, 2, 4, 4, 8, 64, 128]


def test_check_passes_then_uses_compiled_and_a_mismatch_turns_it_off(caplog) -> None:
    cc = CheckedCompile(atol=1e-4)
    ref = torch.tensor([1.0, 2.0])
    calls: list[str] = []

    def eager():
        calls.append("eager")
        return ref

    def good():
        calls.append("compiled")
        return ref + 1e-6

    assert cc.step(3, good, eager) is ref  # first step in bucket 4: both run, eager's result returned
    assert calls == ["compiled", "eager"] and cc.status.checked == [4]
    calls.clear()
    assert torch.equal(cc.step(4, good, eager), ref + 1e-6) and calls == ["compiled"]  # checked bucket
    assert cc.status.compiled_steps == 1 and cc.status.active
    with caplog.at_level(logging.WARNING):
        assert cc.step(5, lambda: ref + 1e-2, eager) is ref  # bucket 8 mismatches
    assert not cc.status.active and "differ from eager" in cc.status.reason and "differ" in caplog.text
    calls.clear()
    assert cc.step(3, good, eager) is ref and calls == ["eager"]  # off for good, every bucket


def test_a_recompile_inside_a_checked_bucket_is_checked_again() -> None:
    graphs = [1]
    cc = CheckedCompile(graphs=lambda: graphs[0])
    ref, calls = torch.ones(2), []

    def eager():
        calls.append("eager")
        return ref

    def recompiling():
        graphs[0] += 1  # this call compiled a new graph (e.g. the row count turned dynamic)
        return ref + 1e-2

    cc.step(2, lambda: ref, eager)
    calls.clear()
    assert cc.step(2, recompiling, eager) is ref and calls == ["eager"]  # checked: and it mismatches
    assert not cc.status.active


@pytest.mark.parametrize("bad", ["raise", "nan", "shape"])
def test_errors_and_nan_fall_back(bad: str) -> None:
    cc = CheckedCompile()
    ref = torch.zeros(2, 3)

    def compiled():
        if bad == "raise":
            raise RuntimeError("inductor says no")
        return torch.full((2, 3), float("nan")) if bad == "nan" else torch.zeros(3, 2)

    assert cc.step(2, compiled, lambda: ref) is ref
    assert not cc.status.active and cc.status.reason
    assert "compile_decode=off" in cc.status.describe()


def test_compiler_that_refuses_at_compile_time_leaves_eager() -> None:
    def refuse(fn):
        raise RuntimeError("no C++ compiler")

    cc = CheckedCompile(compiler=refuse)
    f = lambda: 1
    assert cc.compile(f) is f and not cc.status.active and "no C++ compiler" in cc.status.reason


# --- the engine ------------------------------------------------------------------------------------
def perturbing(fn):
    """A 'compiler' whose result is wrong: logits off by 1e-3."""
    if fn.__name__ != "head":
        return fn
    return lambda *args: fn(*args) + 1e-3


def failing(fn):
    def run(*args):
        raise RuntimeError("compiled kernel crashed")
    return run


@pytest.mark.parametrize("compiler", [perturbing, failing], ids=["mismatch", "error"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_forced_failure_falls_back_and_stays_exact(tmp_path, compiler, temperature: float) -> None:
    model = embedded_shape_model()
    ref = generate(Engine(model, EOS, max_running=4, seed=1, kernel_cache=tmp_path / "k.json"), temperature)
    engine = Engine(model, EOS, max_running=4, seed=1, kernel_cache=tmp_path / "k.json")
    engine.runner.enable_compile(compiler=compiler)
    assert_same(generate(engine, temperature), ref)
    status = engine.runner.compile_status
    assert not status.active and status.reason and status.compiled_steps == 0
    assert "compile_decode=off" in engine.kernel_summary()


def test_identity_compiler_runs_compiled_path_exactly(tmp_path) -> None:
    """The compiled path's plumbing (F.linear dense functions, checks per bucket) with no compiler at all."""
    model = embedded_shape_model()
    ref = generate(Engine(model, EOS, max_running=4, seed=1, kernel_cache=tmp_path / "k.json"), 1.0)
    engine = Engine(model, EOS, max_running=4, seed=1, kernel_cache=tmp_path / "k.json")
    engine.runner.enable_compile(compiler=lambda fn: fn)
    assert_same(generate(engine, 1.0), ref)
    status = engine.runner.compile_status
    assert status.active and status.compiled_steps > 0 and set(status.checked) <= {1, 2, 4}
    assert "compile_decode=on" in engine.kernel_summary()


@pytest.mark.slow
def test_torch_compile_decode_is_exact_on_the_embedded_shape(tmp_path) -> None:
    """Greedy tokens equal and logprobs within 1e-4 of eager, with the real torch.compile."""
    model = embedded_shape_model()
    ref = generate(Engine(model, EOS, max_running=4, kernel_cache=tmp_path / "k.json"), n=20)
    start = time.perf_counter()
    engine = Engine(model, EOS, max_running=4, compile_decode=True, kernel_cache=tmp_path / "k.json")
    got = generate(engine, n=20)
    status = engine.runner.compile_status
    assert status.active, status.reason
    assert status.compiled_steps > 0
    assert_same(got, ref)
    print(f"compile {status.seconds:.1f}s, whole run {time.perf_counter() - start:.1f}s")
