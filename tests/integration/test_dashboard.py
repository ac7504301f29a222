"""Live dashboard: served over HTTP from a synthetic metrics.jsonl, grows as records are appended,
says "no steps yet" on an empty run, stops cleanly; and draws its data points in headless Chromium."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_report import Points, synthetic_records

from areal_py.telemetry.dashboard import announce_when_serving, local_url, start_dashboard, stop_dashboard

N = 20


def fetch(port: int, path: str = "/") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def points(html: str) -> Points:
    p = Points()
    p.feed(html)
    return p


def write_records(path: Path, recs: list[dict], mode: str = "w") -> None:
    with path.open(mode) as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "live1"
    d.mkdir()
    write_records(d / "metrics.jsonl", synthetic_records(N))
    (d / "config.yaml").write_text("run:\n  name: live1\ncontroller:\n  max_staleness: 2\n")
    return d


@pytest.fixture
def dashboard(run_dir: Path):
    server, port = start_dashboard(run_dir, 0)
    try:
        yield port
    finally:
        stop_dashboard(server)


def test_page_holds_data_and_grows(run_dir: Path, dashboard: int) -> None:
    port = dashboard
    html = fetch(port)
    p = points(html)
    # self-contained: nothing loaded from elsewhere (the only URL is the SVG namespace)
    rest = html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http://" not in rest and "https://" not in rest and "<link" not in html and " src=" not in html
    assert 'class="pt"' in html
    assert len([a for a in p.charts["reward"]]) == N
    assert {a["data-series"] for a in p.charts["throughput"]} == {"generated", "trained"}
    assert len(p.charts["throughput"]) == 2 * (N - 1)
    first = synthetic_records(N)
    assert [float(a["data-y"]) for a in p.charts["reward"]] == pytest.approx([r["reward_mean"] for r in first])
    assert 'id="live"' in html and "setInterval" in html and 'http-equiv="refresh"' in html  # refreshes itself
    assert "controller.max_staleness" in html

    # live: append steps, the next fetch (page and fragment) has more points
    more = synthetic_records(N + 5)[N:]
    write_records(run_dir / "metrics.jsonl", more, mode="a")
    for path in ("/", "/charts"):
        p2 = points(fetch(port, path))
        assert len(p2.charts["reward"]) == N + 5, path
        assert len(p2.charts["throughput"]) == 2 * (N + 4), path
    frag = fetch(port, "/charts")
    assert "<body" not in frag and "<script" not in frag and 'data-chart="reward"' in frag

    recs = json.loads(fetch(port, "/metrics.json"))
    assert [r["step"] for r in recs] == list(range(1, N + 6))
    with pytest.raises(urllib.error.HTTPError) as e:
        fetch(port, "/nope")
    assert e.value.code == 404


def test_empty_run_dir_says_no_steps_yet(tmp_path: Path) -> None:
    d = tmp_path / "fresh"
    d.mkdir()
    server, port = start_dashboard(d, 0)
    try:
        html = fetch(port)
        assert "no steps yet" in html and 'class="pt"' not in html
        assert json.loads(fetch(port, "/metrics.json")) == []
        write_records(d / "metrics.jsonl", synthetic_records(3))  # the first steps arrive
        assert len(points(fetch(port, "/charts")).charts["reward"]) == 3
    finally:
        stop_dashboard(server)


def test_fixed_port_and_clean_stop(run_dir: Path) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    want = s.getsockname()[1]
    s.close()
    server, port = start_dashboard(run_dir, want)
    assert port == want
    fetch(port)
    stop_dashboard(server)
    assert not server._thread.is_alive()  # type: ignore[attr-defined]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
    server2, port2 = start_dashboard(run_dir, want)  # the port is free again
    try:
        assert port2 == want and "reward" in fetch(port2)
    finally:
        stop_dashboard(server2)


CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed here (shutil.which('chromium') is None); "
                           "install it with `apt-get install -y --no-install-recommends chromium`")
def test_dashboard_draws_in_headless_chromium(run_dir: Path, dashboard: int, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{dashboard}/"
    # DOM after the page's script has run at least one refresh (virtual time lets its timer fire)
    dom = subprocess.run([*CHROMIUM, f"--user-data-dir={tmp_path / 'profile1'}", "--virtual-time-budget=5000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=60, check=False)
    assert 'data-chart="reward"' in dom.stdout, dom.stderr[-2000:]
    p = points(dom.stdout)
    assert len(p.charts["reward"]) == N and len(p.charts["throughput"]) == 2 * (N - 1)
    assert "updated" in dom.stdout  # the in-place refresh ran and swapped /charts in
    png = tmp_path / "dashboard.png"
    subprocess.run([*CHROMIUM, f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={png}",
                    "--window-size=1200,2000", url], capture_output=True, timeout=60, check=False)
    assert png.exists() and png.stat().st_size > 20_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("AREAL_TEST_ARTIFACTS"):  # keep the screenshot for CI to upload
        out = Path(os.environ["AREAL_TEST_ARTIFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, out / "dashboard.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_url_is_announced_once_it_answers(run_dir: Path) -> None:
    """`areal-py run` prints the dashboard URL when it serves, not when the controller process starts
    (which serves it only after loading its task and tokenizer)."""
    port = free_port()
    url = local_url("0.0.0.0", port)
    assert url == f"http://127.0.0.1:{port}/"
    said: list[str] = []
    stop = threading.Event()
    watcher = announce_when_serving(url, said.append, stop, poll_s=0.05)
    try:
        assert watcher.is_alive() and said == []  # nothing listens on the port yet: nothing to announce
        server, _ = start_dashboard(run_dir, port)
        try:
            watcher.join(timeout=30)
            assert not watcher.is_alive() and said == [url]
            assert "reward" in fetch(port)
        finally:
            stop_dashboard(server)
    finally:
        stop.set()

    # a run that ends before its dashboard answers: the watcher stops silently
    stop2, said2 = threading.Event(), []
    watcher2 = announce_when_serving(local_url("127.0.0.1", free_port()), said2.append, stop2, poll_s=0.05)
    stop2.set()
    watcher2.join(timeout=30)
    assert not watcher2.is_alive() and said2 == []


def test_controller_writes_the_report_when_its_serve_ends(tmp_path: Path) -> None:
    """Roles started by hand (`areal-py serve`) have no launcher: the controller, which owns the
    dashboard, records its config.yaml (absent: no launcher wrote it) and writes report.html when
    its serve ends."""
    import zmq
    from conftest import net_overrides

    from areal_py.config import load_config
    from areal_py.models import build_char_tokenizer
    from areal_py.tasks.arith import ArithTask
    from areal_py.wire import protocol as P
    from areal_py.wire.transport import make_socket, send
    from controller.controller import Controller

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=byhand", *net_overrides(), "run.dashboard_port=0",
                             "controller.batch_size=2", "controller.group_size=2"])
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True)
    write_records(run_dir / "metrics.jsonl", synthetic_records(N))  # what the trainer wrote
    ctrl = Controller(cfg, task=ArithTask(), tokenizer=build_char_tokenizer())
    push = make_socket(zmq.Context.instance(), zmq.DEALER, cfg.net.addr(cfg.net.trainer_port), bind=False, identity="trainer")
    try:
        send(push, P.TrainerHello(version=0))
        send(push, P.TrainerDone(version=0))
        ctrl.serve()  # hello, then done: the whole serve, through its end-of-run path
    finally:
        push.close()
    report = run_dir / "report.html"
    assert report.is_file()
    p = points(report.read_text())
    assert len(p.charts["reward"]) == N and "value_loss" not in p.charts
    assert "algo.adv_estimator=gae" in report.read_text()  # value loss explained from the config it recorded
    assert load_config(run_dir / "config.yaml") == cfg


def test_controller_report_without_metrics_is_skipped(tmp_path: Path) -> None:
    """A controller whose run directory holds no metrics.jsonl (the trainer on another machine) writes
    no empty report."""
    from conftest import net_overrides

    from areal_py.config import load_config
    from areal_py.models import build_char_tokenizer
    from areal_py.tasks.arith import ArithTask
    from controller.controller import Controller

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=apart", *net_overrides(), "run.dashboard_port=0"])
    ctrl = Controller(cfg, task=ArithTask(), tokenizer=build_char_tokenizer())
    try:
        assert ctrl.write_report() is None and not (cfg.run_dir() / "report.html").exists()
    finally:
        ctrl.close()
