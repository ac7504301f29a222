"""Tests for the continuous-batching rollout engine, on tiny random Llama/Qwen2 models."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rollout_server.backend import Finished
from rollout_server.sampling import SamplingParams
from rollout_server.torch_engine.engine import Engine
from rollout_server.torch_engine.hf_runner import cache_keyword

torch.set_num_threads(1)
VOCAB, EOS = 40, 3
ATOL = 1e-4


def make_model(kind: str = "llama", seed: int = 0, **extra) -> torch.nn.Module:
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  initializer_range=0.1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    if kind.startswith("llama"):
        attn = "eager" if kind == "llama-eager" else "sdpa"
        return LlamaForCausalLM(LlamaConfig(**common, **extra, attn_implementation=attn)).eval()
    if kind == "qwen2-sliding":
        extra = dict(extra, use_sliding_window=True, sliding_window=5, max_window_layers=1)
    return Qwen2ForCausalLM(Qwen2Config(**common, **extra)).eval()


def run(engine: Engine, max_steps: int = 10_000) -> dict[str, Finished]:
    done: dict[str, Finished] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            return done
        for f in engine.step():
            done[f.rid] = f
    raise AssertionError("engine did not drain")


@torch.no_grad()
def reference_logprobs(model, prompt: list[int], output: list[int], temperature: float) -> torch.Tensor:
    """What the trainer recomputes: log_softmax(logits / T) of each output token, one full forward."""
    ids = torch.tensor([prompt + output])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
    if temperature > 0:
        logits = logits / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(output)[:, None]).squeeze(1)


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, eos_token_id=EOS, pad_token_id=0)
    return out[0, len(prompt):].tolist()


PROMPTS = [[1, 2, 5], [5, 6, 7, 8, 9, 10, 11], [4], [7, 8] * 6, [30, 1], list(range(4, 36)) * 2 + [9]]


# 1. greedy == HF generate, with staggered joins ----------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama-eager", "qwen2-sliding"])
def test_greedy_matches_generate_with_staggered_joins(kind: str) -> None:
    model = make_model(kind)
    engine = Engine(model, EOS, max_running=3)
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    engine.add("0", PROMPTS[0], params)
    engine.add("1", PROMPTS[1], params)
    done: dict[str, Finished] = {}
    pending = list(enumerate(PROMPTS))[2:]
    while engine.has_work() or pending:
        if pending:  # one new request joins every step while others are mid-decode
            i, p = pending.pop(0)
            engine.add(str(i), p, params)
        done.update({f.rid: f for f in engine.step()})
    assert engine.cache.alloc_len > 64  # the 73-token prompt grew the cache while others ran
    for i, prompt in enumerate(PROMPTS):
        f = done[str(i)]
        assert f.output_ids == greedy_reference(model, prompt, 10), (kind, i)
        assert f.prompt_ids == prompt and f.versions == [0] * len(f.output_ids)
        assert f.finish_reason == ("stop" if f.output_ids[-1] == EOS else "length")
        assert torch.allclose(torch.tensor(f.logprobs), reference_logprobs(model, prompt, f.output_ids, 0.0),
                              atol=ATOL)


# 2. sampled logprobs == full forward ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_sampled_logprobs_match_full_forward(kind: str) -> None:
    model = make_model(kind)
    settings = [(1.0, 1.0), (0.7, 1.0), (0.7, 0.8), (1.3, 0.5)]

    def go(seed: int) -> dict[str, Finished]:
        engine = Engine(model, EOS, max_running=8, seed=seed)
        for i, prompt in enumerate(PROMPTS):
            t, p = settings[i % len(settings)]
            engine.add(str(i), prompt, SamplingParams(max_new_tokens=12, temperature=t, top_p=p, ignore_eos=True))
        return run(engine)

    done = go(seed=0)
    for i, prompt in enumerate(PROMPTS):
        f, t = done[str(i)], settings[i % len(settings)][0]
        assert len(f.output_ids) == 12 and f.finish_reason == "length"
        ref = reference_logprobs(model, prompt, f.output_ids, t)
        assert torch.allclose(torch.tensor(f.logprobs), ref, atol=ATOL), (i, f.logprobs, ref)
    again = go(seed=0)
    assert all(again[k].output_ids == done[k].output_ids for k in done)  # seeded: reproducible
    other = go(seed=1)
    assert any(other[k].output_ids != done[k].output_ids for k in done)


def test_decode_only_fast_path_equals_the_general_path() -> None:
    """Steady decode steps skip the regrouping and the logits copy: with the general path forced for
    every step, the same seed gives the same tokens, logprobs and feed counts (staggered joins and
    group forks included, so both kinds of step run)."""
    model = make_model("llama")
    params = [SamplingParams(max_new_tokens=n, temperature=t, top_p=p, ignore_eos=True)
              for n, t, p in [(9, 1.0, 1.0), (3, 0.7, 0.9), (14, 0.0, 1.0), (6, 1.3, 1.0), (11, 1.0, 0.5)]]

    def go(fast: bool) -> tuple[dict[str, Finished], Engine, int]:
        engine = Engine(model, EOS, max_running=3, seed=7)
        calls = 0
        if not fast:
            engine._decode_only = lambda: False  # type: ignore[method-assign]
        else:
            check = engine._decode_only

            def counted() -> bool:
                nonlocal calls
                hit = check()
                calls += hit
                return hit
            engine._decode_only = counted  # type: ignore[method-assign]
        for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
            engine.add(str(i), prompt, p)
        engine.add_group(["g0", "g1"], PROMPTS[1], params[0])
        return run(engine), engine, calls

    fast, fe, decode_steps = go(True)
    slow, se, _ = go(False)
    assert decode_steps > 0  # the fast path ran
    assert (fe.prefill_tokens, fe.decode_tokens) == (se.prefill_tokens, se.decode_tokens)
    for k, f in slow.items():
        assert fast[k].output_ids == f.output_ids
        assert fast[k].logprobs == f.logprobs  # same forwards in the same order: bitwise
    for i, prompt in enumerate(PROMPTS[:len(params)]):
        t = params[i].temperature
        ref = reference_logprobs(model, prompt, fast[str(i)].output_ids, t)
        assert torch.allclose(torch.tensor(fast[str(i)].logprobs), ref, atol=ATOL)


# 3. interruption by a weight update ------------------------------------------------------------
def test_weight_update_mid_generation_retags_and_recomputes() -> None:
    engine = Engine(make_model("llama", seed=0), EOS, max_running=4)
    ref_a, ref_b = make_model("llama", seed=0), make_model("llama", seed=1)
    for i in range(3):
        engine.add(str(i), PROMPTS[i], SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True))
    done: dict[str, Finished] = {}
    for _ in range(4):
        done.update({f.rid: f for f in engine.step()})
    assert not done and engine.num_running == 3
    engine.update_weights(dict(ref_b.named_parameters()), version=1)
    assert engine.version == 1
    engine.add("late", PROMPTS[3], SamplingParams(max_new_tokens=5, temperature=0.7, ignore_eos=True))
    done.update(run(engine))
    for i in range(3):
        f = done[str(i)]
        assert f.versions == [0] * 4 + [1] * 6  # 1 token per step before the swap
        tokens, lps = torch.tensor(f.output_ids), torch.tensor(f.logprobs)
        full_a = reference_logprobs(ref_a, PROMPTS[i], f.output_ids, 1.0)
        full_b = reference_logprobs(ref_b, PROMPTS[i], f.output_ids, 1.0)
        assert torch.allclose(lps[:4], full_a[:4], atol=ATOL)
        assert torch.allclose(lps[4:], full_b[4:], atol=ATOL)
        assert not torch.allclose(lps[4:], full_a[4:], atol=ATOL)
        assert len(tokens) == 10
    late = done["late"]
    assert late.versions == [1] * 5
    assert torch.allclose(torch.tensor(late.logprobs), reference_logprobs(ref_b, PROMPTS[3], late.output_ids, 0.7),
                          atol=ATOL)


def test_update_to_same_weights_is_exact() -> None:
    model = make_model("qwen2")
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)

    def go(swap_at: set[int]) -> dict[str, Finished]:
        engine = Engine(model, EOS, max_running=4)
        for i, prompt in enumerate(PROMPTS[:4]):
            engine.add(str(i), prompt, params)
        done: dict[str, Finished] = {}
        for step in range(100):
            if step in swap_at:
                same = {k: v.detach().clone() for k, v in model.named_parameters()}
                engine.update_weights(same, version=engine.version + 1)
            done.update({f.rid: f for f in engine.step()})
        return done

    plain, swapped = go(set()), go({3, 7})
    for k in plain:
        assert swapped[k].output_ids == plain[k].output_ids
        assert torch.allclose(torch.tensor(swapped[k].logprobs), torch.tensor(plain[k].logprobs), atol=ATOL)
        assert swapped[k].versions == [0] * 3 + [1] * 4 + [2] * 5


# 4. continuous batching is real ----------------------------------------------------------------
def record_forwards(engine: Engine) -> list[list[tuple[int, int]]]:
    """Record every model pass of the engine as [(start position, tokens fed) per row]."""
    calls: list[list[tuple[int, int]]] = []
    inner = engine.runner.forward

    def spy(slots, starts, chunks):
        calls.append([(s, len(c)) for s, c in zip(starts, chunks)])
        return inner(slots, starts, chunks)

    engine.runner.forward = spy
    return calls


def test_short_request_overtakes_long_and_slots_are_reused() -> None:
    model = make_model("llama")
    engine = Engine(model, EOS, max_running=3)
    calls = record_forwards(engine)
    engine.add("long", PROMPTS[1], SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True))
    engine.step()
    engine.step()
    engine.add("short", PROMPTS[0], SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True))
    calls.clear()
    finished_at: dict[str, int] = {}
    for step in range(100):
        out = engine.step()
        if step == 0:  # ONE forward: the long one decodes (1 token at position 8), the joiner prefills 3
            assert calls == [[(8, 1), (0, 3)]]
        for f in out:
            finished_at[f.rid] = step
            assert f.rid not in engine._running  # leaves the moment it finishes
        if not engine.has_work():
            break
    assert finished_at["short"] == 2 < finished_at["long"]
    assert all(n == 1 for c in calls[1:] for _, n in c)  # afterwards: decode rows feed one token each

    # Many requests, few slots: never over max_running; waiting ones join as slots free up.
    engine = Engine(model, EOS, max_running=3)
    calls = record_forwards(engine)
    for i in range(8):
        engine.add(str(i), PROMPTS[i % 5], SamplingParams(max_new_tokens=2 + i, temperature=0.0, ignore_eos=True))
    assert engine.num_waiting == 8 and engine.num_running == 0
    order: list[str] = []
    while engine.has_work():
        calls.clear()
        freed = len(engine.step())
        order += [rid for rid in map(str, range(8)) if rid not in engine._waiting and rid not in order]
        assert engine.num_running <= 3 and len(calls) == 1
        assert engine.kv_usage() == engine.num_running / 3
        assert [s.slot for s in engine._rows] == list(range(engine.num_running))  # rows stay compact
        if engine.num_waiting:
            assert engine.num_running == 3 - freed  # the freed slots are refilled at the next step
    assert order == [str(i) for i in range(8)]  # FIFO admission


# 5. abort and long-run hygiene -----------------------------------------------------------------
def test_abort_waiting_and_running() -> None:
    engine = Engine(make_model("llama"), EOS, max_running=1)
    params = SamplingParams(max_new_tokens=20, temperature=1.0, ignore_eos=True)
    engine.add("a", PROMPTS[0], params)
    engine.add("b", PROMPTS[1], params)
    engine.step()
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (1, 1)
    b = engine.abort("b")
    assert b is not None and b.finish_reason == "abort" and b.output_ids == [] and b.prompt_ids == PROMPTS[1]
    a = engine.abort("a")
    assert a is not None and a.finish_reason == "abort" and len(a.output_ids) == 2
    assert len(a.logprobs) == len(a.versions) == 2
    assert engine.abort("a") is None and engine.abort("nope") is None
    assert not engine.has_work() and engine.kv_usage() == 0.0
    engine.add("a", PROMPTS[0], SamplingParams(max_new_tokens=3, ignore_eos=True))  # rid reusable
    assert len(run(engine)["a"].output_ids) == 3


def _rss_kb() -> int:
    import re
    from pathlib import Path
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def test_thousand_requests_leave_no_residue() -> None:
    engine = Engine(make_model("llama"), EOS, max_running=16)
    done: dict[str, Finished] = {}
    rss: list[int] = []
    for i in range(1000):
        engine.add(f"r{i}", PROMPTS[i % 5][:3], SamplingParams(max_new_tokens=1 + i % 2, temperature=1.0))
        if i % 40 == 39:
            done.update({f.rid: f for f in engine.step()})
            assert engine.num_running <= 16
        if i % 200 == 199:
            done.update(run(engine))
            rss.append(_rss_kb())
    done.update(run(engine))
    assert len(done) == 1000 and all(f.finish_reason in ("stop", "length") for f in done.values())
    assert engine.num_running == engine.num_waiting == 0 and engine.kv_usage() == 0.0
    assert not engine._running and not engine._waiting and not engine._rows
    assert engine.cache.num_used == 0
    assert engine.cache.alloc_slots <= 16 and engine.cache.alloc_len == 64
    assert rss[-1] - rss[1] < 8 * 1024, rss  # KB: no growth once warmed up


# 6. bad input --------------------------------------------------------------------------------
def test_bad_input_is_rejected_and_engine_keeps_working() -> None:
    model = make_model("llama")
    engine = Engine(model, EOS, max_running=2, max_seq_len=16)
    ok = SamplingParams(max_new_tokens=4, temperature=0.0)
    cases = [("e", [], ok, "empty prompt"), ("l", [1] * 16, ok, "max_seq_len"), ("v", [1, VOCAB], ok, "vocabulary"),
             ("t", [1], SamplingParams(temperature=-1.0), "temperature"), ("p", [1], SamplingParams(top_p=0.0), "top_p"),
             ("n", [1], SamplingParams(max_new_tokens=0), "max_new_tokens")]
    for rid, prompt, params, needle in cases:
        with pytest.raises(ValueError, match=needle):
            engine.add(rid, prompt, params)
    engine.add("x", [1, 2], ok)
    with pytest.raises(ValueError, match="duplicate request id 'x'"):
        engine.add("x", [1, 2], ok)
    engine.step()

    name = "model.layers.0.mlp.up_proj.weight"
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    changed = {name: torch.zeros_like(before[name])}
    with pytest.raises(KeyError, match="no.such.weight"):
        engine.update_weights({**changed, "no.such.weight": torch.zeros(2)}, version=5)
    with pytest.raises(ValueError, match=r"shape mismatch for 'lm_head.weight'"):
        engine.update_weights({**changed, "lm_head.weight": torch.zeros(3, 3)}, version=5)
    assert engine.version == 0
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())  # nothing was applied

    done = run(engine)
    assert done["x"].output_ids == greedy_reference(model, [1, 2], 4) and done["x"].versions == [0] * 4
    engine.add("edge", [5] * 15, SamplingParams(max_new_tokens=8, ignore_eos=True))  # room for exactly one
    edge = run(engine)["edge"]
    assert len(edge.output_ids) == 1 and edge.finish_reason == "length"
    assert engine.num_running == engine.num_waiting == 0


# 7. interruption modes, HF parity across an interruption --------------------------------------
@pytest.mark.parametrize("kind,fast", [("llama", None), ("llama", False), ("qwen2-sliding", None)])
def test_greedy_matches_generate_across_recompute_interruption(kind: str, fast: bool | None) -> None:
    """Greedy tokens == HF generate even when weights are swapped (to the same values) mid-generation."""
    model = make_model(kind)
    engine = Engine(model, EOS, max_running=4, fast_runner=fast)  # 6 prompts, 4 slots: some wait
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    for i, prompt in enumerate(PROMPTS):
        engine.add(str(i), prompt, params)
    done: dict[str, Finished] = {}
    for step in range(200):
        if step in (2, 5):
            engine.update_weights({k: v.detach().clone() for k, v in model.named_parameters()}, engine.version + 1)
        done.update({f.rid: f for f in engine.step()})
        if not engine.has_work():
            break
    for i, prompt in enumerate(PROMPTS):
        f = done[str(i)]
        assert f.output_ids == greedy_reference(model, prompt, 10), (kind, i)
        assert torch.allclose(torch.tensor(f.logprobs), reference_logprobs(model, prompt, f.output_ids, 0.0),
                              atol=ATOL)
    assert done["0"].versions[:4] == [0, 0, 1, 1]  # tagged by the version that sampled each token


def test_keep_mode_continues_on_old_cache() -> None:
    from transformers import DynamicCache

    model_a, model_b = make_model("llama", seed=0), make_model("llama", seed=1)
    engine = Engine(make_model("llama", seed=0), EOS, max_running=4, interrupt_mode="keep")
    calls = record_forwards(engine)
    for i in range(3):
        engine.add(str(i), PROMPTS[i], SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True))
    for _ in range(4):
        assert not engine.step()
    prefilled = engine.prefill_tokens
    engine.update_weights(dict(model_b.named_parameters()), version=1)
    calls.clear()
    done = run(engine)
    assert engine.prefill_tokens == prefilled  # no re-prefill
    assert all(n == 1 for c in calls for _, n in c) and len(calls) == 6  # decode only, one pass per step
    for i in range(3):
        f, prompt = done[str(i)], PROMPTS[i]
        assert f.versions == [0] * 4 + [1] * 6 and f.finish_reason == "length"
        lps = torch.tensor(f.logprobs)
        assert torch.allclose(lps[:4], reference_logprobs(model_a, prompt, f.output_ids, 1.0)[:4], atol=ATOL)
        # Reference for keep: K/V of prompt + first 3 outputs from A, then B decodes over that cache.
        with torch.no_grad():
            cache = DynamicCache(config=model_a.config)
            model_a(input_ids=torch.tensor([prompt + f.output_ids[:3]]), use_cache=True, **{cache_keyword(model_a): cache})
            ref = []
            for j in range(3, 9):
                logits = model_b(input_ids=torch.tensor([[f.output_ids[j]]]), use_cache=True,
                                 **{cache_keyword(model_b): cache}).logits[0, -1].float()
                ref.append(torch.log_softmax(logits, -1)[f.output_ids[j + 1]])
        assert torch.allclose(lps[4:], torch.stack(ref), atol=ATOL)
        # ...which is not what a full recompute under B would give
        assert not torch.allclose(lps[4:], reference_logprobs(model_b, prompt, f.output_ids, 1.0)[4:], atol=ATOL)


def test_keep_mode_with_same_weights_is_exact_and_bad_mode_rejected() -> None:
    model = make_model("qwen2")
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    results = []
    for mode, swap in (("recompute", False), ("keep", True), ("recompute", True)):
        engine = Engine(model, EOS, max_running=4, interrupt_mode=mode)
        for i, prompt in enumerate(PROMPTS[:4]):
            engine.add(str(i), prompt, params)
        engine.step()
        engine.step()
        if swap:
            engine.update_weights({k: v.detach().clone() for k, v in model.named_parameters()}, 1)
        results.append(run(engine))
    for k in results[0]:
        assert results[1][k].output_ids == results[2][k].output_ids == results[0][k].output_ids
        assert torch.allclose(torch.tensor(results[1][k].logprobs), torch.tensor(results[0][k].logprobs), atol=ATOL)
        assert results[1][k].versions == [0, 0] + [1] * 6
    with pytest.raises(ValueError, match="interrupt_mode"):
        Engine(model, EOS, interrupt_mode="drop")  # type: ignore[arg-type]


# 8. prompt sharing for GRPO groups -------------------------------------------------------------
@pytest.mark.parametrize("fast", [None, False])
def test_prompt_sharing_matches_separate_prefills(fast: bool | None) -> None:
    model = make_model("llama")
    prompt = PROMPTS[5]  # 73 tokens: sharing saves 3 * 73 prefill tokens
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=6, temperature=1.0, ignore_eos=True)

    def go(sharing: bool) -> tuple[dict[str, Finished], int]:
        engine = Engine(model, EOS, max_running=8, prompt_sharing=sharing, fast_runner=fast, seed=3)
        engine.add_group([f"g{i}" for i in range(4)], prompt, greedy)
        engine.add_group([f"s{i}" for i in range(4)], prompt, sampled)
        return run(engine), engine.prefill_tokens

    shared, n_shared = go(True)
    separate, n_separate = go(False)
    assert n_shared == len(prompt) and n_separate == 8 * len(prompt)  # one prefill for all 8
    ref = greedy_reference(model, prompt, 6)
    for rid, f in shared.items():
        assert torch.allclose(torch.tensor(f.logprobs), reference_logprobs(model, prompt, f.output_ids,
                                                                           0.0 if rid[0] == "g" else 1.0), atol=ATOL)
    for i in range(4):
        g, s = shared[f"g{i}"], separate[f"g{i}"]
        assert g.output_ids == s.output_ids == ref
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(s.logprobs), atol=ATOL)
    assert len({tuple(shared[f"s{i}"].output_ids) for i in range(4)}) > 1  # forked rows sample independently
    with pytest.raises(ValueError, match="duplicate"):
        Engine(model, EOS).add_group(["a", "a"], prompt, greedy)


def test_group_re_prefill_after_weight_update_shares_the_prompt() -> None:
    """Recompute mode: each group's prompt is re-prefilled once, each member then feeds its own outputs."""
    model = make_model("qwen2")
    params = SamplingParams(max_new_tokens=8, temperature=1.0, ignore_eos=True)

    def go(swap: bool) -> tuple[dict[str, Finished], Engine]:
        engine = Engine(model, EOS, max_running=8, seed=5)
        engine.add_group([f"a{i}" for i in range(3)], PROMPTS[1], params)
        engine.add_group([f"b{i}" for i in range(3)], PROMPTS[3], params)
        for _ in range(3):
            engine.step()
        if swap:
            engine.update_weights({k: v.detach().clone() for k, v in model.named_parameters()}, 1)
        return run(engine), engine

    plain, _ = go(False)
    swapped, engine = go(True)
    # prefill: 2 prompts at start; after the swap 2 prompts again + 6 members x 3 outputs each
    assert engine.prefill_tokens == 2 * (len(PROMPTS[1]) + len(PROMPTS[3])) + 6 * 3
    for k, f in plain.items():
        assert swapped[k].output_ids == f.output_ids  # same seed, same weights: same draws
        assert torch.allclose(torch.tensor(swapped[k].logprobs), torch.tensor(f.logprobs), atol=ATOL)
        assert swapped[k].versions == [0] * 3 + [1] * 5


def test_fast_runner_is_selected_and_verified() -> None:
    from rollout_server.torch_engine.model_runner import FastLlamaRunner, HFRunner

    for kind in ("llama", "qwen2"):
        assert isinstance(Engine(make_model(kind), EOS).runner, FastLlamaRunner)
    assert isinstance(Engine(make_model("qwen2-sliding"), EOS).runner, HFRunner)  # sliding window: generic path
    assert isinstance(Engine(make_model("llama"), EOS, fast_runner=False).runner, HFRunner)
    # the embedded default's shape (head_dim 48, 4 layers), where a start-up check once failed
    cfg = dict(vocab_size=56, hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
               max_position_embeddings=600)
    assert isinstance(Engine(LlamaForCausalLM(LlamaConfig(**cfg)).eval(), EOS).runner, FastLlamaRunner)
