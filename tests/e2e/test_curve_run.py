"""A run whose controller listens on every interface: `areal-py run` makes the run's CURVE keys, every role
uses them, the run trains its steps, and a peer without keys is refused and counted while it runs."""
from __future__ import annotations

import subprocess
import sys

import zmq
from conftest import ROOT, controller_rejected, free_ports, scaled, wait_for

from areal_py.config import load_config
from areal_py.telemetry.metrics import read_jsonl
from areal_py.wire import protocol as P
from areal_py.wire.transport import make_socket, send


def test_a_run_off_loopback_uses_its_keys_and_refuses_a_peer_without(tmp_path, small_cfg):
    metrics_port = free_ports(1)[0]
    steps = 4
    proc = subprocess.Popen([sys.executable, "-m", "areal_py.app.cli", "run", "--quiet", *small_cfg,
                             "net.bind_host=0.0.0.0", f"trainer.total_steps={steps}", f"run.metrics_port={metrics_port}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "t"
    rogue = []
    try:
        wait_for(lambda: (run_dir / "config.yaml").exists() or proc.poll() is not None, 60, "the run's config")
        cfg = load_config(run_dir / "config.yaml")
        assert cfg.net.keys_dir == str(run_dir / "keys"), cfg.net.keys_dir
        ctx = zmq.Context.instance()
        net = cfg.net  # a plain-ZMTP peer on loopback (allowed to try): a server's hello, the trainer's last word
        rogue = [make_socket(ctx, zmq.DEALER, f"tcp://127.0.0.1:{net.rollout_port}", bind=False, identity="rogue"),
                 make_socket(ctx, zmq.DEALER, f"tcp://127.0.0.1:{net.trainer_port}", bind=False, identity="rogue-t")]
        send(rogue[0], P.Hello(server_id="rogue", version=0))
        send(rogue[1], P.TrainerDone(version=0))
        token = (run_dir / "keys" / "http_token").read_text()  # off loopback /metrics answers only with it
        assert controller_rejected(metrics_port, "no_curve") == 0  # without it: 401, read as nothing counted
        wait_for(lambda: controller_rejected(metrics_port, "no_curve", token) > 0 or proc.poll() is not None, 180,
                 "the controller to count the peer without keys")
        _, err = proc.communicate(timeout=scaled(300))
    finally:
        for s in rogue:
            s.close(linger=0)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "authenticated and encrypted (CURVE)" in err
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, steps + 1))
    log = (run_dir / "logs" / "controller.log").read_text()
    assert "server rogue joined" not in log and "refused a client" in log and "no curve" in log
