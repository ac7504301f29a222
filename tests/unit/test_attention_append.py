"""The decode kernel's fused cache write (`CompiledKernel.append`): exactly the separate
write followed by the kernel, bitwise, in the kernel alone and in the runner's steps (ragged rows, GQA,
scattered slots, a slot reused by a new sequence next to decoding rows). The build cache is keyed by
the C++ source, so an edited kernel is never loaded from a stale build.

The tests that need the real kernel share one build per machine (`attention_kernel.build_root()`).
"""
from __future__ import annotations

import pytest
import torch
from test_attention_kernel import gqa_model

from rollout_server.torch_engine import attention_kernel
from rollout_server.torch_engine.attention_choice import kernel_agrees
from rollout_server.torch_engine.attention_kernel import decode_attention_ref
from rollout_server.torch_engine.kv_cache import SlotKVCache
from rollout_server.torch_engine.model_runner import FastLlamaRunner

torch.set_num_threads(1)
CPU = torch.device("cpu")


def test_an_edited_source_gets_its_own_build_directory(monkeypatch, tmp_path) -> None:
    before, key = attention_kernel.build_dir(tmp_path), attention_kernel.source_key()
    (before / f"{attention_kernel._module_name()}.so").parent.mkdir(parents=True)
    (before / f"{attention_kernel._module_name()}.so").write_bytes(b"")
    assert attention_kernel.is_built(tmp_path)
    monkeypatch.setattr(attention_kernel, "CPP_SOURCE", attention_kernel.CPP_SOURCE + "\n// edited\n")
    assert attention_kernel.source_key() != key and attention_kernel.build_dir(tmp_path) != before
    assert not attention_kernel.is_built(tmp_path)  # the old library is not this source's: rebuilt


def case(gen, rows: int, hkv: int, g: int, d: int, alloc: int, dtype=torch.float32):
    slots = torch.randperm(rows + 3, generator=gen)[:rows]  # scattered, distinct, some slots unused
    lens = torch.randint(1, alloc + 1, (rows,), generator=gen)
    lens[0] = 1  # a row whose only key is the one it appends
    q = torch.randn(rows, hkv, g, d, generator=gen).to(dtype)
    k, v = (torch.randn(rows + 3, hkv, alloc, d, generator=gen).to(dtype) for _ in "kv")
    kn, vn = (torch.randn(rows, hkv, d, generator=gen).to(dtype) for _ in "kv")
    return q, k, v, slots, lens, kn, vn


@pytest.mark.timeout(600)  # the first run on a machine compiles the kernel
@pytest.mark.parametrize(("hkv", "g", "d", "dtype"), [(4, 1, 48, torch.float32), (2, 4, 64, torch.float32),
                                                      (1, 7, 20, torch.float32), (3, 2, 32, torch.bfloat16)])
def test_append_is_the_separate_write_then_the_kernel_bitwise(kernel, hkv: int, g: int, d: int, dtype) -> None:
    gen = torch.Generator().manual_seed(hkv * 100 + g * 10 + d)
    for rows, alloc in [(1, 1), (6, 64), (17, 200)]:
        q, k, v, slots, lens, kn, vn = case(gen, rows, hkv, g, d, alloc, dtype)
        k2, v2 = k.clone(), v.clone()
        k2[slots, :, lens - 1], v2[slots, :, lens - 1] = kn, vn  # the runner's separate write
        got = kernel.append(q, k, v, slots, lens, d ** -0.5, kn, vn)
        assert torch.equal(k, k2) and torch.equal(v, v2)  # the new rows and nothing else
        assert torch.equal(got, kernel(q, k2, v2, slots, lens, d ** -0.5))
        ref = decode_attention_ref(q, k2, v2, slots, lens, d ** -0.5).float()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert (got.float() - ref).abs().max() <= tol * ref.abs().max()
    assert kernel_agrees(kernel, hkv, g, d, dtype, CPU)  # the start-up check covers append too


@pytest.mark.timeout(600)
def test_append_rejects_bad_input_by_name(kernel) -> None:
    q, k, v, slots, lens, kn, vn = case(torch.Generator().manual_seed(4), 3, 2, 1, 8, 10)
    with pytest.raises(RuntimeError, match="appears twice"):
        kernel.append(q, k, v, torch.tensor([1, 4, 1]), lens, 1.0, kn, vn)
    with pytest.raises(RuntimeError, match=r"k_new and v_new must be \[rows, kv_heads, head_dim\]"):
        kernel.append(q, k, v, slots, lens, 1.0, kn[:, :1], vn)
    with pytest.raises(RuntimeError, match="q's dtype"):
        kernel.append(q, k, v, slots, lens, 1.0, kn.double(), vn)
    k0 = k.clone()
    with pytest.raises(RuntimeError, match="length 11 outside 1..10"):
        kernel.append(q, k, v, slots, torch.tensor([1, 11, 2]), 1.0, kn, vn)
    assert torch.equal(k, k0)  # checked before anything is written


@pytest.mark.timeout(600)
@torch.inference_mode()
def test_runner_steps_with_the_fused_write_equal_the_separate_write(kernel) -> None:
    model = gqa_model()

    def runner(kind: str) -> FastLlamaRunner:
        cache = SlotKVCache(num_layers=2, num_kv_heads=2, head_dim=32, max_slots=4, max_seq_len=64,
                            dtype=torch.float32, device=CPU)
        r = FastLlamaRunner(model, cache, decode_attention="sdpa" if kind == "sdpa" else "kernel")
        if kind == "separate":  # the same kernel without its append: the runner writes K/V itself
            r._kernel = lambda *args: kernel(*args)
        return r

    fused, separate, sdpa = runner("fused"), runner("separate"), runner("sdpa")
    assert getattr(fused._kernel, "append", None) is not None
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 56, (n,), generator=gen).tolist() for n in (5, 2, 9, 4)]
    steps = [([0, 1, 2, 3], [0, 0, 0, 0], prompts)]  # prefill, ragged
    lens = [len(p) for p in prompts]
    for t in range(4):  # decode steps, rows in a scattered order
        order = [2, 0, 3, 1]
        steps.append((order, [lens[i] + t for i in order], [[(7 * i + t) % 56] for i in order]))
    lens = [n + 4 for n in lens]
    # slot 1 reused by a new sequence (prefilled from 0) while the other rows decode in the same step
    steps.append(([0, 1, 2, 3], [lens[0], 0, lens[2], lens[3]], [[3], [9, 8, 7], [4], [5]]))
    steps.append(([3, 1, 0], [lens[3] + 1, 3, lens[0] + 1], [[6], [2], [1]]))
    for slots, starts, chunks in steps:
        a, b, c = (r.forward(slots, starts, chunks) for r in (fused, separate, sdpa))
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=1e-4, rtol=0)
    for li in range(2):
        assert torch.equal(fused.cache.keys[li], separate.cache.keys[li])
        assert torch.equal(fused.cache.values[li], separate.cache.values[li])
