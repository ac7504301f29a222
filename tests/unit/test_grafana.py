"""grafana/areal-dashboard.json queries only metrics the processes export; grafana/prometheus.yml scrapes
every process of a local run (run.metrics_port=9400, two rollout servers)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from areal_py.telemetry.prom import ALL_METRIC_NAMES

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "areal-dashboard.json"
PROM_YML = ROOT / "grafana" / "prometheus.yml"
METRIC = re.compile(r"\bareal_[A-Za-z0-9_]*")


def all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(all_panels(p.get("panels", [])))  # panels inside collapsed rows
    return out


def exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in all_panels(dash["panels"]) for t in p.get("targets", [])]


def test_dashboard_parses_and_uses_the_datasource_variable() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"] and dash["title"]
    var = {v["name"]: v for v in dash["templating"]["list"]}["DS_PROMETHEUS"]
    assert var["type"] == "datasource" and var["query"] == "prometheus"
    panels = all_panels(dash["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
        if p["type"] != "row":
            assert p["targets"], p["title"]
            assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
            assert all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" for t in p["targets"]), p["title"]


def test_every_queried_metric_is_exported() -> None:
    used: set[str] = set()
    for title, expr in exprs():
        names = set(METRIC.findall(expr))
        assert names, f"panel {title!r} queries no areal_ metric: {expr}"
        unknown = names - ALL_METRIC_NAMES
        assert not unknown, f"panel {title!r} queries metrics no process exports: {sorted(unknown)}"
        used |= names
    # what the dashboard is for: each of these is on it
    for name in ("areal_rollout_generated_tokens_total", "areal_trainer_trained_tokens_total", "areal_trainer_busy_ratio",
                 "areal_trainer_step_phase_duration_seconds_sum", "areal_rollout_active_requests",
                 "areal_rollout_queued_requests", "areal_rollout_kv_cache_occupancy_ratio",
                 "areal_controller_staleness_capacity_groups", "areal_controller_sample_staleness_versions_bucket",
                 "areal_controller_reward_mean", "areal_rollout_weight_swap_duration_seconds_bucket",
                 "areal_controller_server_policy_version", "areal_rejected_messages_total"):
        assert name in used, name
    # counters are only ever rated, never plotted raw (except the step count stat)
    for title, expr in exprs():
        for m in re.finditer(r"\b(areal_\w+_total)\b", expr):
            before = expr[:m.start()]
            assert re.search(r"(rate|increase)\($", before) or title == "Train steps", (title, expr)


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool (Debian's prometheus package) is not installed: PromQL syntax not checked")
def test_every_expr_is_valid_promql(tmp_path: Path) -> None:
    # promtool checks PromQL offline only inside rule files: one recording rule per panel query
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"areal_dashboard_check_{i}", "expr": expr.replace("$__rate_interval", "1m")}
        for i, (_, expr) in enumerate(exprs())]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["promtool", "check", "config", str(PROM_YML)], capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_yml_scrapes_every_process() -> None:
    cfg = yaml.safe_load(PROM_YML.read_text())
    targets: dict[str, tuple[str, str]] = {}
    for job in cfg["scrape_configs"]:
        for sc in job["static_configs"]:
            for t in sc["targets"]:
                targets[t] = (job["job_name"], sc.get("labels", {}).get("instance"))
    assert targets == {"127.0.0.1:9400": ("areal-controller", "controller"),
                       "127.0.0.1:9401": ("areal-trainer", "trainer"),
                       "127.0.0.1:9402": ("areal-rollout", "rollout-0"),
                       "127.0.0.1:9403": ("areal-rollout", "rollout-1")}
