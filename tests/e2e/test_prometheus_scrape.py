"""A real Prometheus server scrapes a short run and its HTTP API returns non-zero values for a rollout-server,
a controller and a trainer metric. Needs the `prometheus` binary (Debian: apt-get install -y prometheus)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, free_ports, scaled

from areal_py.telemetry.metrics import read_jsonl

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="the `prometheus` binary is not on PATH; install Debian's package: "
           "apt-get install -y --no-install-recommends prometheus")

QUERIES = {  # role -> a metric that must be non-zero once a few steps are done
    "rollout": "sum(areal_rollout_generated_tokens_total)",
    "controller": "max(areal_controller_accepted_groups)",
    "trainer": "sum(areal_trainer_trained_tokens_total)",
}


def _query(port: int, q: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _wait_for(pred, timeout: float, what: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                _, err = p.communicate()
                raise AssertionError(f"{p.args[0]} exited ({p.returncode}) while waiting for {what}:\n{err[-3000:]}")
        try:
            if pred():
                return
        except OSError:
            pass  # a server not listening yet
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _stop(proc: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.communicate(timeout=scaled(60))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def test_prometheus_scrapes_every_role(tmp_path: Path, small_cfg: list[str]) -> None:
    base, prom_port = free_ports(2)
    targets = {"controller": base, "trainer": base + 1, "rollout": base + 2}
    cfg = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
           "scrape_configs": [{"job_name": f"areal-{role}",
                               "static_configs": [{"targets": [f"127.0.0.1:{port}"],
                                                   "labels": {"instance": "rollout-0" if role == "rollout" else role}}]}
                              for role, port in targets.items()]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.Popen([sys.executable, "-m", "areal_py.app.cli", "run", "--quiet", *small_cfg,
                            f"run.metrics_port={base}", "trainer.total_steps=500"], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}",
                             "--log.level=warn"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = tmp_path / "runs" / "t" / "metrics.jsonl"
        _wait_for(lambda: len(read_jsonl(metrics)) >= 1, 180, "a first training step", [run, prom])

        def all_nonzero() -> bool:
            return all(any(float(r["value"][1]) > 0 for r in _query(prom_port, q)) for q in QUERIES.values())

        _wait_for(all_nonzero, 30, "Prometheus to hold non-zero values for " + ", ".join(QUERIES.values()),
                  [run, prom])
        up = {r["metric"]["job"]: float(r["value"][1]) for r in _query(prom_port, "up")}
        assert up == {"areal-controller": 1.0, "areal-trainer": 1.0, "areal-rollout": 1.0}, up
        # each target carries only its own role's metrics
        jobs = {r["metric"]["job"] for r in _query(prom_port, "areal_rollout_policy_version")}
        assert jobs == {"areal-rollout"}, jobs
    finally:
        _stop(run)
        _stop(prom, signal.SIGTERM)
