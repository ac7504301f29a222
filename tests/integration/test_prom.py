"""Prometheus metric definitions: naming conventions and the /metrics endpoint."""
from __future__ import annotations

import importlib
import re
import socket
import urllib.request

import pytest
from conftest import free_ports
from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from areal_py.telemetry import prom

NAME = re.compile(r"^areal_[a-z][a-z0-9_]*$")
UNIT_SUFFIXES = ("_seconds", "_bytes", "_ratio")


def families():
    for role, group in prom.ROLES.items():
        for attr, metric in vars(group).items():
            for fam in metric.describe():
                yield role, attr, metric, fam


def test_names_follow_prometheus_conventions() -> None:
    seen = set()
    for role, attr, metric, fam in families():
        name = fam.name + ("_total" if fam.type == "counter" else "")
        assert NAME.match(name), name
        assert name.startswith(f"areal_{role}_"), (role, name)
        assert name not in seen, name
        seen.add(name)
        if isinstance(metric, Counter):
            assert name.endswith("_total")
        else:
            assert not name.endswith("_total"), name
        words = set(name.split("_"))
        if words & {"seconds", "duration", "latency", "time"} or isinstance(metric, Histogram) and "staleness" not in words:
            assert fam.name.endswith("_seconds"), name  # durations in base units
        if words & {"ratio", "fraction", "busy", "occupancy"}:
            assert name.endswith("_ratio"), name
        assert not re.search(r"_(ms|milliseconds|minutes|percent|kb|mb)(_|$)", name), name
        assert fam.documentation.strip(), name
    assert "areal_rejected_messages_total" not in seen  # defined once, in areal_py.telemetry.metrics
    phase = prom.TRAINER.step_phase_seconds
    assert phase._labelnames == ("phase",) and set(prom.TRAINER_PHASES) == {
        "wait", "proximal", "forward_backward", "optimizer", "publish"}


def test_all_metric_names() -> None:
    names = prom.ALL_METRIC_NAMES
    for n in ("areal_rollout_generated_tokens_total", "areal_rollout_weight_swap_duration_seconds_bucket",
              "areal_controller_sample_staleness_versions_count", "areal_controller_server_policy_version",
              "areal_trainer_step_phase_duration_seconds_sum", "areal_trainer_busy_ratio",
              "areal_trainer_trained_tokens_total", "areal_rejected_messages_total"):
        assert n in names, n
    assert all(n.startswith("areal_") for n in names)
    kinds = {type(m) for g in prom.ROLES.values() for m in vars(g).values()}
    assert kinds == {Counter, Gauge, Histogram}


def test_reimport_does_not_redefine() -> None:
    before = prom.ROLLOUT.generated_tokens
    mod = importlib.reload(prom)
    assert mod.ROLLOUT.generated_tokens is before


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def test_metrics_server_serves_values() -> None:
    port, role_port = free_ports(2)
    assert prom.start_metrics_server(port) == port
    assert prom.start_metrics_server(role_port, role="trainer") == role_port
    try:
        prom.ROLLOUT.generated_tokens.inc(17)
        # an in-process rollout server of an earlier test may have counted version-3 tokens already
        v3_before = REGISTRY.get_sample_value("areal_rollout_version_generated_tokens_total", {"version": "3"}) or 0.0
        prom.ROLLOUT.version_tokens.labels(version="3").inc(5)
        prom.CONTROLLER.server_policy_version.labels(server="rollout-0").set(4)
        prom.TRAINER.step_phase_seconds.labels(phase="publish").observe(0.02)
        prom.TRAINER.busy.set(0.75)
        text = scrape(port)
        assert re.search(r"^areal_rollout_generated_tokens_total [1-9]", text, re.MULTILINE)
        assert f'areal_rollout_version_generated_tokens_total{{version="3"}} {v3_before + 5.0}' in text
        assert 'areal_controller_server_policy_version{server="rollout-0"} 4.0' in text
        assert re.search(r'^areal_trainer_step_phase_duration_seconds_count\{phase="publish"\} [1-9]', text, re.MULTILINE)
        assert "areal_trainer_busy_ratio 0.75" in text
        exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("areal_")}
        assert exported <= prom.ALL_METRIC_NAMES, exported - prom.ALL_METRIC_NAMES

        trainer_only = scrape(role_port)
        assert "areal_trainer_busy_ratio 0.75" in trainer_only
        assert "areal_rollout_" not in trainer_only and "areal_controller_" not in trainer_only
        assert "process_" in trainer_only or "python_info" in trainer_only
    finally:
        prom.stop_metrics_server(port)
        prom.stop_metrics_server(role_port)
    with pytest.raises(OSError):  # stopped: nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_port_zero_disables_and_bad_role() -> None:
    assert prom.start_metrics_server(0) == 0
    assert prom.start_metrics_server(0, role="rollout") == 0
    with pytest.raises(ValueError, match="unknown metrics role"):
        prom.start_metrics_server(free_ports(1)[0], role="nope")
