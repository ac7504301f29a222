"""A failed decode attention kernel build is remembered per machine and not retried at every start
(rollout_server.torch_engine.build_failure), with clear ways to retry."""
from __future__ import annotations

import json

import pytest
import torch

from rollout_server.torch_engine import attention_kernel
from rollout_server.torch_engine.attention_kernel import build_dir, load_kernel, remembered_failure
from rollout_server.torch_engine.build_failure import RETRY_ENV, failure_path, read_failure

BAD_CXX = "/nonexistent/areal-test-c++"


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """Each test starts with no kernel loaded in this process and no retry switch."""
    monkeypatch.setattr(attention_kernel, "_loaded", {})
    monkeypatch.delenv(RETRY_ENV, raising=False)


def must_not_build(name, directory):
    raise AssertionError("a remembered failure must not be rebuilt")


def counting_failure(calls: list):
    def builder(name, directory):
        calls.append(directory)
        raise RuntimeError("Error building extension: g++: fatal error: no input files")
    return builder


def test_a_real_build_with_a_bad_compiler_fails_fast_and_is_remembered(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CXX", BAD_CXX)
    first = load_kernel(tmp_path)  # the real load_inline, with a compiler that does not exist
    assert first.fn is None and "build/load failed" in first.reason
    marker = failure_path(build_dir(tmp_path))
    record = json.loads(marker.read_text())
    assert record["torch"] == torch.__version__ and BAD_CXX in record["compiler"]
    assert len(record["digest"]) == 12 and record["error"]

    monkeypatch.setattr(attention_kernel, "_loaded", {})  # a new process on the same machine
    again = load_kernel(tmp_path, builder=must_not_build)
    assert again.fn is None
    assert record["digest"] in again.reason and str(marker) in again.reason and RETRY_ENV in again.reason
    assert remembered_failure(tmp_path) == again.reason


def test_the_retry_switch_and_deleting_the_marker_build_again(monkeypatch, tmp_path) -> None:
    calls: list = []
    load_kernel(tmp_path, builder=counting_failure(calls))
    assert len(calls) == 1 and read_failure(build_dir(tmp_path)) is not None

    monkeypatch.setattr(attention_kernel, "_loaded", {})
    monkeypatch.setenv(RETRY_ENV, "1")
    assert remembered_failure(tmp_path) is None
    load_kernel(tmp_path, builder=counting_failure(calls))
    assert len(calls) == 2

    monkeypatch.setattr(attention_kernel, "_loaded", {})
    monkeypatch.delenv(RETRY_ENV)
    failure_path(build_dir(tmp_path)).unlink()
    load_kernel(tmp_path, builder=counting_failure(calls))
    assert len(calls) == 3


def test_a_changed_compiler_retries_on_its_own(monkeypatch, tmp_path) -> None:
    calls: list = []
    monkeypatch.setenv("CXX", BAD_CXX)
    load_kernel(tmp_path, builder=counting_failure(calls))
    monkeypatch.setattr(attention_kernel, "_loaded", {})
    monkeypatch.setenv("CXX", BAD_CXX + "-fixed")
    load_kernel(tmp_path, builder=counting_failure(calls))
    assert len(calls) == 2


def test_a_successful_build_clears_the_marker_and_a_bad_marker_is_ignored(monkeypatch, tmp_path) -> None:
    load_kernel(tmp_path, builder=counting_failure([]))
    marker = failure_path(build_dir(tmp_path))
    marker.write_text("{not json")
    assert read_failure(build_dir(tmp_path)) is None
    monkeypatch.setattr(attention_kernel, "_loaded", {})
    ok = load_kernel(tmp_path, builder=lambda name, directory: attention_kernel.decode_attention_ref)
    assert ok.fn is attention_kernel.decode_attention_ref and not marker.exists()


def test_prepare_kernels_reports_a_remembered_failure_without_building(monkeypatch) -> None:
    from areal_py.app.model_dir import prepare_kernels
    from areal_py.config import load_config

    said: list[str] = []
    monkeypatch.setattr(attention_kernel, "is_built", lambda root=None: False)
    monkeypatch.setattr(attention_kernel, "remembered_failure", lambda root=None: "an earlier build failed (x)")
    monkeypatch.setattr(attention_kernel, "load_kernel", lambda: pytest.fail("must not build"))
    prepare_kernels(load_config(None, []), say=said.append)
    assert len(said) == 1 and "use SDPA: an earlier build failed" in said[0]
