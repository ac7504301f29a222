"""Several hosts on one machine: the controller, two rollout servers and two trainer ranks each in a network
namespace of its own, joined by veth pairs to a bridge in a hub namespace, so no role reaches another over
loopback. Every role starts as `ip netns exec NS python -m areal_py.app.cli serve ROLE config.yaml ...`, as a
user starts it on a cluster node.

The test touches nothing of the host's network: the namespaces, links and addresses (10.231.0.0/24) are its
own, created inside those namespaces, and deleted afterwards whatever happened. It needs root and `ip`
(iproute2); without them it skips, saying which is missing.
"""
from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, free_ports, scaled

from areal_py.config import dump_config, load_config
from areal_py.telemetry.step_record import read_step_records
from areal_py.wire.curve import generate_keys

SUBNET = "10.231.0"
CONTROLLER, TRAINER0, TRAINER1, ROLLOUT0, ROLLOUT1 = (f"{SUBNET}.{i}" for i in (1, 11, 12, 21, 22))


@dataclass(frozen=True)
class Host:
    name: str  # the role's name, as the launcher names its log
    address: str
    netns: str


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _must(*args: str) -> None:
    res = _ip(*args)
    if res.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {res.stderr.strip()}")


def _namespace_problem() -> str | None:
    """Why this machine cannot give the test its namespaces, or None."""
    if shutil.which("ip") is None:
        return "no `ip` command (install iproute2)"
    if os.geteuid() != 0:
        return f"creating network namespaces needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN); running as uid {os.geteuid()}"
    return None


@pytest.fixture
def hosts():
    """Five namespaces on one bridge (in a sixth, the hub), each with `lo` up and one address; deleted at the end.
    Skips, with the reason, where namespaces or veth/bridge links cannot be created."""
    problem = _namespace_problem()
    if problem:
        pytest.skip(problem)
    tag = f"arealmh{os.getpid()}"
    hub = f"{tag}-hub"
    spec = [("controller", CONTROLLER), ("trainer", TRAINER0), ("trainer-1", TRAINER1), ("rollout-0", ROLLOUT0),
            ("rollout-1", ROLLOUT1)]
    made: list[str] = []
    try:
        for ns in [hub] + [f"{tag}-{name}" for name, _ in spec]:
            res = _ip("netns", "add", ns)
            if res.returncode != 0:
                pytest.skip(f"cannot create a network namespace here: `ip netns add` says {res.stderr.strip()!r}")
            made.append(ns)
        res = _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        if res.returncode != 0:
            pytest.skip(f"cannot create a bridge in a namespace: {res.stderr.strip()!r}")
        _must("-n", hub, "link", "set", "br0", "up")
        out = []
        for i, (name, address) in enumerate(spec):
            ns = f"{tag}-{name}"
            res = _ip("-n", hub, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            if res.returncode != 0:
                pytest.skip(f"cannot create a veth pair between namespaces: {res.stderr.strip()!r}")
            _must("-n", hub, "link", "set", f"v{i}", "master", "br0", "up")
            _must("-n", ns, "link", "set", "lo", "up")
            _must("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _must("-n", ns, "link", "set", "eth0", "up")
            out.append(Host(name, address, ns))
        yield out
    finally:
        for ns in made:
            left = _ip("netns", "pids", ns).stdout.split()
            for pid in left:  # a role that outlived the test: never leave it behind in a deleted namespace
                subprocess.run(["kill", "-9", pid], capture_output=True, timeout=10)
            _ip("netns", "del", ns)


def test_namespaces_reach_each_other_only_over_the_bridge(hosts):
    """The topology the run relies on: each namespace has loopback and its one address, reaches the others over
    the bridge, and has no loopback route to them (a listener on a role's 127.0.0.1 is not seen elsewhere)."""
    ctrl, rest = hosts[0], hosts[1:]
    for h in hosts:
        addrs = _ip("-n", h.netns, "-4", "-o", "addr", "show").stdout
        assert sorted(line.split()[3] for line in addrs.splitlines()) == sorted(["127.0.0.1/8", f"{h.address}/24"])
    port = free_ports(1)[0]
    # a listener on the controller's own address and one on its loopback
    serve = (f"import socket, time\na = socket.create_server(({ctrl.address!r}, {port}))\n"
             f"b = socket.create_server(('127.0.0.1', {port}))\nprint('up', flush=True)\ntime.sleep(60)")
    listener = subprocess.Popen(["ip", "netns", "exec", ctrl.netns, sys.executable, "-c", serve],
                                stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([listener.stdout], [], [], scaled(20))
        assert ready and listener.stdout.readline().strip() == "up", "timed out waiting for the test's listener"
        probe = ("import socket, sys\n"
                 "def ok(h):\n"
                 "    try:\n"
                 f"        socket.create_connection((h, {port}), timeout=5).close(); return 1\n"
                 "    except OSError: return 0\n"
                 f"print(ok({ctrl.address!r}), ok('127.0.0.1'))")
        for h in rest:
            res = subprocess.run(["ip", "netns", "exec", h.netns, sys.executable, "-c", probe], capture_output=True,
                                 text=True, timeout=30)
            assert res.stdout.split() == ["1", "0"], (h, res.stdout, res.stderr)
    finally:
        listener.kill()
        listener.wait(timeout=10)


def _run_roles(hosts: list[Host], cfg_file: Path, env: dict[str, str], timeout_s: float) -> dict[str, int]:
    """Start every role in its namespace, wait (at most `timeout_s`) for all to exit; their exit codes."""
    logs = cfg_file.parent / "logs"
    logs.mkdir(exist_ok=True)
    master_port = free_ports(1)[0]
    rank_env = {"WORLD_SIZE": "2", "MASTER_ADDR": TRAINER0, "MASTER_PORT": str(master_port)}
    args = {"controller": ["controller"], "trainer": ["trainer"], "trainer-1": ["trainer"],
            "rollout-0": ["rollout", "rollout.server_id=rollout-0"], "rollout-1": ["rollout", "rollout.server_id=rollout-1"]}
    procs: dict[str, subprocess.Popen] = {}
    try:
        for h in hosts:
            role_env = dict(env)
            if h.name.startswith("trainer"):
                rank = "1" if h.name == "trainer-1" else "0"
                role_env.update(rank_env, RANK=rank, LOCAL_RANK="0")  # one rank per host
            role, *rest = args[h.name]
            with (logs / f"{h.name}.log").open("w") as f:
                procs[h.name] = subprocess.Popen(
                    ["ip", "netns", "exec", h.netns, sys.executable, "-m", "areal_py.app.cli", "serve", role,
                     str(cfg_file), *rest], cwd=ROOT, env=role_env, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs.values()):
            failed = {n: p.returncode for n, p in procs.items() if p.returncode not in (None, 0)}
            running = [n for n, p in procs.items() if p.poll() is None]
            if failed or time.monotonic() > deadline:
                tails = "\n".join(f"--- {n}\n" + "\n".join((logs / f"{n}.log").read_text().splitlines()[-15:])
                                  for n in procs)
                pytest.fail(f"roles failed {failed} or still running after {timeout_s:.0f}s: {running}\n{tails}")
            time.sleep(0.3)
        return {n: p.returncode for n, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)


# dist is the stricter check (a second process group, its members binding their own addresses); a stream run
# (weights through the controller's sockets) costs as long again, so it is in the slow set
@pytest.mark.parametrize("transfer", ["dist", pytest.param("stream", marks=pytest.mark.slow)])
def test_roles_on_five_hosts_finish_a_run(hosts, tmp_path, model_cache, transfer):
    """Controller, two servers and two trainer ranks, each on its own address, every socket CURVE (off loopback
    nothing else is allowed): the run finishes its steps, both servers generate, both ranks train, and no
    process is left in any namespace."""
    # the first server to say hello may get every group admitted before the second one does; groups admitted
    # after step 1 are spread by load, and by step 4 both servers' tokens are in the record (as in test_dist_run)
    steps = 4
    run_dir = tmp_path / "runs" / "mh"
    ports = free_ports(6)
    overrides = [f"run.output_dir={tmp_path / 'runs'}", "run.name=mh", f"model.cache_dir={model_cache}",
                 "run.dashboard_port=0", "run.torch_threads=1", "controller.batch_size=8", "controller.group_size=4",
                 "trainer.checkpoint_every=0", f"trainer.total_steps={steps}", "trainer.world_size=2",
                 "rollout.num_servers=2", "rollout.max_running=8", "controller.startup_timeout_s=120", "trainer.batch_timeout_s=120",
                 f"net.bind_host={CONTROLLER}", f"net.controller_host={CONTROLLER}",
                 f"net.rollout_port={ports[0]}", f"net.weights_port={ports[1]}", f"net.trainer_port={ports[2]}",
                 f"net.batch_port={ports[3]}", f"weights.transfer={transfer}", f"run.metrics_port={ports[5]}"]
    if transfer == "dist":
        overrides += [f"weights.dist_host={TRAINER0}", f"weights.dist_port={ports[4]}", "weights.dist_timeout_s=30",
                      "weights.dist_join_timeout_s=120"]
    generate_keys(run_dir / "keys")  # off loopback every socket is CURVE (what `areal-py keys` writes)
    overrides.append(f"net.keys_dir={run_dir / 'keys'}")
    cfg = load_config(None, overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("GLOO_SOCKET_IFNAME", None)  # the trainer must find its interface itself

    codes = _run_roles(hosts, run_dir / "config.yaml", env, scaled(90))

    assert codes == dict.fromkeys(codes, 0), codes
    recs = read_step_records(run_dir / "metrics.jsonl")
    assert [r.step for r in recs] == list(range(1, steps + 1))
    assert all(len(r.rank_tokens) == 2 and min(r.rank_tokens) > 0 for r in recs), [r.rank_tokens for r in recs]
    generated = recs[-1].server_generated_tokens
    assert set(generated) == {"rollout-0", "rollout-1"} and min(generated.values()) > 0, generated
    logs = run_dir / "logs"
    assert f"GLOO_SOCKET_IFNAME=eth0 (the interface toward MASTER_ADDR={TRAINER0})" in (logs / "trainer-1.log").read_text()
    # each role serves /metrics on its own address, not on net.bind_host (the controller's)
    for name, address, offset in [("controller", CONTROLLER, 0), ("trainer", TRAINER0, 1), ("rollout-0", ROLLOUT0, 2),
                                  ("rollout-1", ROLLOUT1, 3)]:
        assert f"Prometheus metrics on http://{address}:{ports[5] + offset}/metrics" in (logs / f"{name}.log").read_text()
    if transfer == "dist":
        trainer_log = (logs / "trainer.log").read_text()
        assert "forming the weight group" in trainer_log and "stream frames" not in trainer_log
        for server in ("rollout-0", "rollout-1"):
            log = (logs / f"{server}.log").read_text()
            assert f"joining the weight group at {TRAINER0}" in log and "now at version 1 " in log, log[-2000:]
    for h in hosts:  # every role exited, and nothing it started is left behind
        assert _ip("netns", "pids", h.netns).stdout.split() == [], h
