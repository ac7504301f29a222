"""Silent degradations made visible: steps without learning signal warn after N in a row (not before),
entropy is left out of the step record when nothing computes it, the report shows every skip reason,
and the rollout engine says whether it runs its fast path or the generic Hugging Face forward, and why."""
from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import generate_latest
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from areal_py.config import load_config
from areal_py.telemetry import prom
from areal_py.telemetry.report import render_html, skipped_html
from areal_py.telemetry.signal_watch import SignalWatch
from areal_py.telemetry.skips import SKIP_REASONS, signal_summary
from areal_py.telemetry.step_record import ControllerCounters, StepRecord
from rollout_server import server
from rollout_server.kernel_report import engine_path
from rollout_server.sampling import SamplingParams
from rollout_server.torch_engine.engine import Engine
from rollout_server.torch_engine.hf_runner import cache_keyword
from trainer.step_metrics import computed_stats
from trainer.trainer import Trainer

COMMON = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


# --- no learning signal ----------------------------------------------------------------------------
def test_signal_watch_fires_at_n_in_a_row_and_every_n_after_never_before():
    w = SignalWatch(3)
    assert [w.observe(0) for _ in range(2)] == [False, False] and w.streak == 2
    assert w.observe(4) is False and w.streak == 0  # signal: the stretch starts again
    assert [w.observe(0) for _ in range(7)] == [False, False, True, False, False, True, False]
    off = SignalWatch(0)
    assert not any(off.observe(0) for _ in range(50)) and off.streak == 50
    with pytest.raises(ValueError, match="0 = never warn"):
        SignalWatch(-1)


def test_the_trainer_warns_after_n_uninformative_steps_and_exports_the_streak(caplog):
    """Trainer._watch_signal on a stand-in trainer: steps 1-2 quiet, step 3 warns, the gauge follows."""
    t = SimpleNamespace(signal=SignalWatch(3))
    gauge = lambda: prom.TRAINER.uninformative_steps._value.get()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        for step in (1, 2):
            Trainer._watch_signal(t, step, {"informative_samples": 0.0})
        assert not caplog.records and gauge() == 2
        Trainer._watch_signal(t, 3, {"informative_samples": 0.0})
        [rec] = caplog.records
        assert "step 3: 3 steps in a row trained no informative sample" in rec.getMessage()
        assert "trainer.warn_uninformative_steps=3" in rec.getMessage() and rec.levelno == logging.WARNING
        Trainer._watch_signal(t, 4, {"informative_samples": 16.0})
    assert gauge() == 0 and len(caplog.records) == 1


def test_config_default_of_the_warning():
    cfg = load_config(None, [])
    assert cfg.trainer.warn_uninformative_steps == 10
    assert load_config(None, ["trainer.warn_uninformative_steps=0"]).trainer.warn_uninformative_steps == 0


# --- entropy ------------------------------------------------------------------------------------
def test_entropy_is_left_out_when_the_entropy_bonus_is_off():
    stats = {"loss": 0.5, "entropy": 0.0, "informative_samples": 8.0}
    off = computed_stats(stats, load_config(None, []).algo)  # algo.entropy_coef defaults to 0
    assert off == {"loss": 0.5, "informative_samples": 8.0}
    row = StepRecord(step=1, **off).to_dict()
    assert "entropy" not in row and StepRecord.from_dict(row).entropy is None
    on = computed_stats({**stats, "entropy": 2.5}, load_config(None, ["algo.entropy_coef=0.01"]).algo)
    assert on["entropy"] == 2.5


# --- the report -----------------------------------------------------------------------------------
def records(informative: list[float]) -> list[StepRecord]:
    ctrl = ControllerCounters(skipped_too_long=37, skipped_bad_lines=2, dropped_uniform=5, dropped_stale=0,
                              dropped_aborted=0, reward_errors=1, reward_timeouts=0)
    return [StepRecord(step=i + 1, informative_samples=v, controller=ctrl, reward_mean=0.0, loss=0.0,
                       rejected_groups_nonfinite_reward=1 if i == 0 else 0)
            for i, v in enumerate(informative)]


def test_the_report_lists_every_skip_reason_and_warns_on_a_long_silent_stretch():
    recs = records([4.0, 0.0, 0.0, 0.0, 4.0, 0.0])
    html = skipped_html(recs, {"trainer": {"warn_uninformative_steps": 3}})
    for s in SKIP_REASONS:
        assert f'data-reason="{s.reason}"' in html
    assert ('data-reason="too_long"><th>too_long</th><td class="count">37</td>' in html
            and 'data-reason="nonfinite_reward"><th>nonfinite_reward</th><td class="count">1</td>' in html)
    assert "Skipped: 46 item(s)" in html  # 37 + 2 + 5 + 1 + 1
    assert signal_summary(recs) == signal_summary(recs[:6]) and signal_summary(recs).longest == 3
    assert 'class="warn" id="uninformative"' in html and "4 of 6 steps" in html and "3 in a row" in html
    quiet = skipped_html(recs, {"trainer": {"warn_uninformative_steps": 4}})  # the stretch stays below the limit
    assert 'class="note" id="uninformative"' in quiet
    old = skipped_html([StepRecord(step=1)])  # a run recorded before these counters: said, not invented
    assert "Skipped: nothing" in old and old.count("not recorded") == len(SKIP_REASONS)
    page = render_html("r", records([1.0] * 3), None)
    assert 'id="skipped"' in page and 'id="uninformative"' not in page


# --- the engine path ------------------------------------------------------------------------------
def test_fast_path_for_the_embedded_architecture_generic_for_a_sliding_window_model():
    torch.manual_seed(0)
    fast = Engine(LlamaForCausalLM(LlamaConfig(**COMMON)).eval(), 3, max_running=2)
    assert engine_path(fast.kernel_choices()) == "fast"
    generic = Engine(Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=5,
                                                  max_window_layers=1)).eval(), 3, max_running=2)
    [runner] = generic.kernel_choices()
    assert engine_path([runner]) == "generic" and runner.source == "fallback"
    assert "does not support Qwen2ForCausalLM" in runner.reason
    assert engine_path(None) == "external"  # an engine of its own (SGLang) reports no choices
    # the generic path passes its cache under the non-deprecated keyword: no FutureWarning from transformers
    generic.add("r", [1, 2, 4], SamplingParams(max_new_tokens=3, temperature=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        while generic.has_work():
            generic.step()


def test_cache_keyword_follows_the_forward_signature():
    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    class NoCache(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    assert cache_keyword(Old()) == "past_key_values"
    assert cache_keyword(Qwen2ForCausalLM(Qwen2Config(**COMMON))) in ("cache", "past_key_values")
    with pytest.raises(ValueError, match="NoCache.forward takes no KV cache"):
        cache_keyword(NoCache())


def test_the_server_warns_exports_and_announces_the_generic_path(tmp_path, caplog):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=5,
                                         max_window_layers=1)).eval()
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r"])
    srv = server.RolloutServer.__new__(server.RolloutServer)  # only the start-up report, no sockets
    srv.cfg, srv.server_id, srv.engine = cfg, "rollout-9", Engine(model, 3, max_running=2)
    with caplog.at_level(logging.INFO, logger="rollout"):
        assert srv._report_kernels() == "generic"
    [warn] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "rollout-9: generating with the generic Hugging Face forward" in warn.getMessage()
    assert "does not support Qwen2ForCausalLM" in warn.getMessage()
    text = generate_latest(prom.role_registry("rollout")).decode()
    [line] = [x for x in text.splitlines() if x.startswith("areal_rollout_kernel_info{") and 'server="rollout-9"' in x]
    assert 'op="runner"' in line and 'kernel="hf_forward"' in line and 'source="fallback"' in line


def test_the_lenient_jsonl_task_exposes_its_bad_lines_to_the_counter(tmp_path):
    from areal_py.tasks.jsonl import JsonlTask
    from areal_py.telemetry.skips import skipped_lines

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\nnot json\n{"prompt": "2+2="}\n{"prompt": "3+3=", "answer": "6"}\n')
    assert skipped_lines(JsonlTask(path, strict=False)) == 2
    assert skipped_lines(object()) == 0  # a task that skips nothing
