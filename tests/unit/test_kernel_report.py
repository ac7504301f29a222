"""The engine's kernel choices, and why, are visible: a typed record in the run directory, an
info-style Prometheus gauge and the server's log (rollout_server.kernel_report)."""
from __future__ import annotations

import logging

import pytest
import torch
from prometheus_client import generate_latest
from transformers import LlamaConfig, LlamaForCausalLM

from areal_py.config import load_config
from areal_py.telemetry import prom
from rollout_server import server
from rollout_server.kernel_report import OPS, KernelChoice, KernelReport, export_prometheus, read_reports, report_path
from rollout_server.torch_engine import model_runner
from rollout_server.torch_engine.attention_kernel import KernelBuild
from rollout_server.torch_engine.engine import Engine


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


def kernel_fails(monkeypatch) -> None:
    monkeypatch.setattr(model_runner, "load_kernel",
                        lambda build=True: KernelBuild(None, "build/load failed: RuntimeError: no c++"))


def test_the_engine_reports_each_op_as_the_runner_chose_it(model, tmp_path) -> None:
    engine = Engine(model, 3, max_running=4, kernel_cache=tmp_path / "kernels.json")
    runner = engine.runner
    choices = {c.op: c for c in engine.kernel_choices()}
    assert set(choices) == set(OPS)
    assert choices["runner"].kernel == "fast"
    assert choices["linear_decode"].kernel == runner.linear.decode
    assert choices["linear_prefill"].kernel == runner.linear.prefill
    assert choices["linear_decode"].source == runner.linear.source
    if runner.linear.source == "timed":  # the timings that decided it travel with the choice
        assert set(choices["linear_decode"].seconds) == set(runner.linear.seconds["decode"])
    assert (choices["decode_attention"].kernel, choices["decode_attention"].source) == (
        runner.attention.variant, runner.attention.source)
    assert choices["compiled_decode"].kernel == "off"

    hf = Engine(model, 3, fast_runner=False, kernel_cache=tmp_path / "kernels.json").kernel_choices()
    assert [(c.op, c.kernel, c.source) for c in hf] == [("runner", "hf_forward", "forced")]


def test_a_fallback_names_its_reason(model, tmp_path, monkeypatch) -> None:
    kernel_fails(monkeypatch)
    engine = Engine(model, 3, max_running=4, kernel_cache=tmp_path / "kernels.json", decode_attention="kernel")
    att = next(c for c in engine.kernel_choices() if c.op == "decode_attention")
    assert (att.kernel, att.source) == ("sdpa", "fallback") and "no c++" in att.reason


def test_the_server_writes_the_record_exports_the_gauge_and_logs_it(model, tmp_path, monkeypatch, caplog) -> None:
    kernel_fails(monkeypatch)
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r", "rollout.decode_attention=kernel"])
    engine = Engine(model, 3, max_running=4, kernel_cache=tmp_path / "kernels.json", decode_attention="kernel")
    srv = server.RolloutServer.__new__(server.RolloutServer)  # only the start-up report, no sockets
    srv.cfg, srv.server_id, srv.engine = cfg, "rollout-7", engine
    with caplog.at_level(logging.INFO, logger="rollout"):
        srv._report_kernels()

    [report] = read_reports(cfg.run_dir())
    assert report_path(cfg.run_dir(), "rollout-7").exists()
    assert report.server_id == "rollout-7" and report.torch == torch.__version__
    assert report.choices == engine.kernel_choices()
    assert "decode_attention=sdpa (fallback, build/load failed" in caplog.text and "rollout-7" in caplog.text

    text = generate_latest(prom.role_registry("rollout")).decode()
    att = [line for line in text.splitlines()
           if line.startswith("areal_rollout_kernel_info{") and 'server="rollout-7"' in line and
           'op="decode_attention"' in line]
    assert len(att) == 1 and 'kernel="sdpa"' in att[0] and 'source="fallback"' in att[0]
    assert "no c++" in att[0] and att[0].endswith(" 1.0")
    assert "areal_rollout_kernel_info" in prom.ALL_METRIC_NAMES


def test_a_restart_replaces_the_servers_series(tmp_path) -> None:
    def report(kernel: str) -> KernelReport:
        return KernelReport(server_id="rollout-9", threads=1, torch="x",
                            choices=[KernelChoice(op="linear_decode", kernel=kernel, source="timed")])

    export_prometheus(report("onednn"))
    export_prometheus(report("f_linear"))
    text = generate_latest(prom.role_registry("rollout")).decode()
    mine = [line for line in text.splitlines() if 'server="rollout-9"' in line]
    assert len(mine) == 1 and 'kernel="f_linear"' in mine[0]


def test_an_unreadable_record_is_skipped(tmp_path, caplog) -> None:
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "bad.json").write_text("{")
    with caplog.at_level(logging.WARNING):
        assert read_reports(tmp_path) == []
    assert "bad.json" in caplog.text


def test_compiled_decode_is_reported_on_and_then_off_with_its_reason(model, tmp_path) -> None:
    engine = Engine(model, 3, max_running=4, kernel_cache=tmp_path / "kernels.json", decode_attention="sdpa")
    engine.runner.enable_compile(compiler=lambda fn: fn)  # a stand-in compiler: no inductor run in the unit suite
    comp = next(c for c in engine.kernel_choices() if c.op == "compiled_decode")
    assert (comp.kernel, comp.source, comp.reason) == ("inductor", "forced", "")
    engine.runner._checked._off("a stand-in failure")
    comp = next(c for c in engine.kernel_choices() if c.op == "compiled_decode")
    assert (comp.kernel, comp.source, comp.reason) == ("off", "fallback", "a stand-in failure")
