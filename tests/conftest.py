"""Shared fixtures: free loopback ports, a session-wide model cache, and a helper to run areal-py."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def net_overrides() -> list[str]:
    a, b, c, d = free_ports(4)
    return [f"net.rollout_port={a}", f"net.weights_port={b}", f"net.trainer_port={c}", f"net.batch_port={d}"]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


# Small enough for seconds per step on 2 cores, large enough to exercise batching and staleness.
SMALL_RUN = ["run.dashboard_port=0", "controller.batch_size=8", "controller.group_size=4", "trainer.checkpoint_every=0",
             "controller.startup_timeout_s=120", "trainer.batch_timeout_s=120"]


@pytest.fixture
def small_cfg(tmp_path, model_cache) -> list[str]:
    """Overrides for a short, isolated run under tmp_path."""
    return [f"run.output_dir={tmp_path / 'runs'}", "run.name=t", f"model.cache_dir={model_cache}",
            *SMALL_RUN, *net_overrides()]


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "areal_py.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
