"""The fast runner's linear kernel, chosen by timing: the choice rule, the agreement check, the cache."""
from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from rollout_server.torch_engine.linear_choice import (
    REFERENCE,
    LinearChoice,
    choose_kernel,
    pick_linears,
    read_cache,
    time_kernels,
)

torch.set_num_threads(1)


def weights(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(48, 32, generator=gen), None), (torch.randn(32, 48, generator=gen), torch.randn(32))]


def same(x, w, b):  # agrees with F.linear: a different kernel computing the same thing
    return F.linear(x, w, b)


def wrong(x, w, b):  # a wrong kernel: off by 1%
    return F.linear(x, w, b) * 1.01


def broken(x, w, b):
    raise RuntimeError("no such kernel here")


def fake_timer(seconds_by_rows: dict[int, dict[str, float]]):
    """A timer returning given seconds per kernel for the row set it is asked about (keyed by max rows)."""
    def timer(kernels, ws, rows):
        return {k: seconds_by_rows[max(rows)][k] for k in kernels}
    return timer


def no_timing(*_):
    raise AssertionError("timed although the choice should come from the cache")


# --- the rule ------------------------------------------------------------------------------------
def test_choose_kernel_takes_the_fastest_agreeing_kernel() -> None:
    ok = {REFERENCE: True, "onednn": True}
    assert choose_kernel({REFERENCE: 1.0, "onednn": 0.5}, ok) == "onednn"
    assert choose_kernel({REFERENCE: 0.5, "onednn": 1.0}, ok) == REFERENCE
    assert choose_kernel({REFERENCE: 1.0, "onednn": 0.99}, ok) == REFERENCE  # within the margin: keep F.linear
    assert choose_kernel({REFERENCE: 1.0, "onednn": 0.5}, {REFERENCE: True, "onednn": False}) == REFERENCE
    assert choose_kernel({REFERENCE: 1.0, "onednn": 0.5}, {REFERENCE: True}) == REFERENCE  # unchecked: refused
    three = {REFERENCE: 1.0, "a": 0.6, "b": 0.4}
    assert choose_kernel(three, {REFERENCE: True, "a": True, "b": True}) == "b"
    assert choose_kernel(three, {REFERENCE: True, "a": True, "b": False}) == "a"


def test_for_rows_splits_decode_and_prefill() -> None:
    c = LinearChoice(decode="onednn", prefill=REFERENCE, decode_max_rows=8, source="timed")
    assert [c.for_rows(n) for n in (1, 8, 9, 500)] == ["onednn", "onednn", REFERENCE, REFERENCE]
    assert "decode=onednn prefill=f_linear (timed)" in c.describe()


def test_choice_is_made_per_shape_class_from_timings() -> None:
    timer = fake_timer({4: {REFERENCE: 2.0, "same": 1.0}, 16: {REFERENCE: 1.0, "same": 2.0}})
    c = pick_linears(weights(), [1, 4], [16], kernels={REFERENCE: F.linear, "same": same}, timer=timer)
    assert (c.decode, c.prefill, c.decode_max_rows, c.source, c.refused) == ("same", REFERENCE, 4, "timed", ())
    assert c.seconds == {"decode": {REFERENCE: 2.0, "same": 1.0}, "prefill": {REFERENCE: 1.0, "same": 2.0}}


def test_a_wrong_or_broken_kernel_is_refused_however_fast(caplog) -> None:
    timer = fake_timer({4: {REFERENCE: 1.0, "wrong": 0.1, "broken": 0.1}, 16: {REFERENCE: 1.0, "wrong": 0.1}})
    with caplog.at_level(logging.WARNING):
        c = pick_linears(weights(), [1, 4], [16], kernels={REFERENCE: F.linear, "wrong": wrong, "broken": broken},
                         timer=timer)
    assert (c.decode, c.prefill, c.source) == (REFERENCE, REFERENCE, "only")
    assert c.refused == ("wrong", "broken")
    assert "wrong disagrees with F.linear" in caplog.text


def test_real_timer_measures_every_kernel() -> None:
    secs = time_kernels({REFERENCE: F.linear, "same": same}, weights(), [1, 3], budget_s=0.002)
    assert set(secs) == {REFERENCE, "same"} and all(s > 0 for s in secs.values())


def test_onednn_is_only_chosen_if_it_agrees_on_the_real_model() -> None:
    """The default candidates on this machine: whichever wins, it agrees with F.linear (checked here again)."""
    ws = weights()
    c = pick_linears(ws, [1, 4], [16])
    for name in (c.decode, c.prefill):
        assert name in (REFERENCE, "onednn")
    x = torch.randn(5, 32)
    from rollout_server.torch_engine.linear_choice import candidates

    for name in (c.decode, c.prefill):
        torch.testing.assert_close(candidates(ws[0][0].device, torch.float32)[name](x, *ws[0]), F.linear(x, *ws[0]))


# --- the cache -----------------------------------------------------------------------------------
def test_cache_round_trip(tmp_path) -> None:
    path = tmp_path / "sub" / "kernels.json"
    kernels = {REFERENCE: F.linear, "same": same}
    timer = fake_timer({4: {REFERENCE: 2.0, "same": 1.0}, 16: {REFERENCE: 1.0, "same": 3.0}})
    first = pick_linears(weights(), [1, 4], [16], kernels=kernels, timer=timer, cache_path=path)
    again = pick_linears(weights(), [1, 4], [16], kernels=kernels, timer=no_timing, cache_path=path)
    assert (first.source, again.source) == ("timed", "cache")
    assert (again.decode, again.prefill, again.seconds) == (first.decode, first.prefill, first.seconds)
    entry = next(iter(read_cache(path).values()))
    assert entry["machine"]["threads"] == torch.get_num_threads() and "cpu" in entry["machine"]
    # another shape is another entry: timed, and both kept
    other = pick_linears(weights(1)[:1], [1, 4], [16], kernels=kernels, timer=timer, cache_path=path)
    assert other.source == "timed" and len(read_cache(path)) == 2


def test_cached_kernel_that_now_disagrees_is_refused(tmp_path) -> None:
    path = tmp_path / "kernels.json"
    timer = fake_timer({4: {REFERENCE: 2.0, "k": 1.0}, 16: {REFERENCE: 2.0, "k": 1.0}})
    assert pick_linears(weights(), [1, 4], [16], kernels={REFERENCE: F.linear, "k": same}, timer=timer,
                        cache_path=path).decode == "k"
    c = pick_linears(weights(), [1, 4], [16], kernels={REFERENCE: F.linear, "k": wrong}, timer=no_timing,
                     cache_path=path)
    assert (c.decode, c.prefill, c.refused) == (REFERENCE, REFERENCE, ("k",))


@pytest.mark.parametrize("content", ["{not json", json.dumps([1, 2]), json.dumps({"format": 99, "entries": {}})])
def test_corrupt_cache_is_ignored_with_a_warning_and_replaced(tmp_path, caplog, content: str) -> None:
    path = tmp_path / "kernels.json"
    path.write_text(content)
    timer = fake_timer({4: {REFERENCE: 2.0, "same": 1.0}, 16: {REFERENCE: 2.0, "same": 1.0}})
    with caplog.at_level(logging.WARNING):
        c = pick_linears(weights(), [1, 4], [16], kernels={REFERENCE: F.linear, "same": same}, timer=timer,
                         cache_path=path)
    assert (c.decode, c.source) == ("same", "timed")
    assert "kernel cache" in caplog.text
    assert len(read_cache(path)) == 1  # rewritten in the current layout


def test_corrupt_entry_is_timed_again(tmp_path) -> None:
    path = tmp_path / "kernels.json"
    kernels = {REFERENCE: F.linear, "same": same}
    timer = fake_timer({4: {REFERENCE: 2.0, "same": 1.0}, 16: {REFERENCE: 2.0, "same": 1.0}})
    pick_linears(weights(), [1, 4], [16], kernels=kernels, timer=timer, cache_path=path)
    data = json.loads(path.read_text())
    for entry in data["entries"].values():
        entry["decode"] = "no-such-kernel"
    path.write_text(json.dumps(data))
    assert pick_linears(weights(), [1, 4], [16], kernels=kernels, timer=timer, cache_path=path).source == "timed"


def test_unwritable_cache_is_a_warning_not_an_error(tmp_path, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    timer = fake_timer({4: {REFERENCE: 2.0, "same": 1.0}, 16: {REFERENCE: 2.0, "same": 1.0}})
    with caplog.at_level(logging.WARNING):
        c = pick_linears(weights(), [1, 4], [16], kernels={REFERENCE: F.linear, "same": same}, timer=timer,
                         cache_path=blocker / "kernels.json")  # its parent is a file
    assert c.decode == "same" and "cannot write kernel cache" in caplog.text


# --- the engine ----------------------------------------------------------------------------------
def test_engine_reports_its_kernel_choice(tmp_path) -> None:
    from rollout_server.torch_engine.engine import Engine

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    path = tmp_path / "kernels.json"
    engine = Engine(model, 3, max_running=4, kernel_cache=path)
    assert isinstance(engine.runner.linear, LinearChoice) and engine.runner.linear.decode_max_rows == 4
    assert engine.runner.linear.source in ("timed", "only")
    assert "linear decode=" in engine.kernel_summary() and "compile_decode=off" in engine.kernel_summary()
    if engine.runner.linear.source == "timed":
        assert Engine(model, 3, max_running=4, kernel_cache=path).runner.linear.source == "cache"
    assert "Hugging Face forward" in Engine(model, 3, fast_runner=False, kernel_cache=path).kernel_summary()


def test_rollout_server_caches_the_choice_under_the_model_cache_and_logs_it(monkeypatch, tmp_path, caplog) -> None:
    from areal_py.config import load_config
    from areal_py.models import build_char_tokenizer
    from rollout_server import server

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=64)).eval()
    monkeypatch.setattr(server, "model_path", lambda c: tmp_path)
    monkeypatch.setattr(server, "load_model_and_tokenizer", lambda path, dtype: (model, build_char_tokenizer()))
    cfg = load_config(None, [f"model.cache_dir={tmp_path / 'cache'}", "rollout.max_running=3"])
    assert cfg.rollout.compile_decode is False  # off by default: it did not pay on CPU (docs/benchmarks.md)
    with caplog.at_level(logging.INFO, logger="rollout"):
        eng = server.build_engine(cfg, seed=1)
    assert eng.runner.compile_status is None
    assert "linear decode=" in caplog.text and "compile_decode=off" in caplog.text
    if eng.runner.linear.source != "only":
        assert read_cache(tmp_path / "cache" / "kernels.json")


def test_timer_takes_medians_over_interleaved_rounds_on_its_clock() -> None:
    """A fake clock that advances only inside kernels: 'slow' costs 3 ticks a pass, 'fast' 1 (2 weights x 1 row)."""
    now = [0.0]

    def ticking(cost: float):
        def kernel(x, w, b):
            now[0] += cost
            return F.linear(x, w, b)
        return kernel

    secs = time_kernels({"slow": ticking(1.5), "fast": ticking(0.5)}, weights(), [1], budget_s=10.0, rounds=4,
                        clock=lambda: now[0])
    assert secs == {"slow": 3.0, "fast": 1.0}
