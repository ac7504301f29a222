"""The dashboard and /metrics off loopback: a token or no start; a request without the token gets 401 and is
counted; with it, 200. On loopback, as before, anyone on the machine may read. Seconds in all."""
from __future__ import annotations

import base64
import urllib.error
import urllib.request

import pytest
from conftest import free_ports

from areal_py.app.cli import main
from areal_py.config import load_config
from areal_py.telemetry import prom
from areal_py.telemetry.dashboard import start_dashboard, stop_dashboard
from areal_py.telemetry.http_auth import HttpAuthError, authorized, http_token, write_token
from areal_py.telemetry.metrics import REJECTED_MESSAGES
from areal_py.wire.curve import generate_keys

TOKEN = "s3cret-token_0123456789"


def get(port: int, path: str, header: str | None = None) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": header} if header else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        assert e.code != 401 or "Bearer" in e.headers["WWW-Authenticate"]
        return e.code


def refused(role: str) -> float:
    return REJECTED_MESSAGES.labels(role=role, reason="http_unauthorized")._value.get()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_authorized_takes_the_token_as_bearer_or_as_a_basic_password_and_nothing_else() -> None:
    assert authorized(f"Bearer {TOKEN}", TOKEN) and authorized(f"bearer  {TOKEN} ", TOKEN)
    assert authorized(basic("prometheus", TOKEN), TOKEN) and authorized(basic("", TOKEN), TOKEN)
    for header in (None, "", TOKEN, f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer", f"Token {TOKEN}",
                   basic(TOKEN, "x"), "Basic !!notbase64", "Basic " + base64.b64encode(b"\xff:\xfe").decode(),
                   f"Bearer {TOKEN}\u00e9"):
        assert not authorized(header, TOKEN), header


def test_dashboard_off_loopback_answers_only_with_the_token_and_counts_the_rest(tmp_path) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    server, port = start_dashboard(tmp_path, 0, host="0.0.0.0", token=TOKEN)
    try:
        before = refused("controller")
        assert get(port, "/metrics.json") == 401
        assert get(port, "/", "Bearer wrong-token") == 401
        assert get(port, "/charts", basic("me", "wrong")) == 401
        assert refused("controller") - before == 3
        assert get(port, "/metrics.json", f"Bearer {TOKEN}") == 200
        assert get(port, "/", basic("me", TOKEN)) == 200  # a browser's login, then the page's own fetches
        assert refused("controller") - before == 3
    finally:
        stop_dashboard(server)


def test_metrics_off_loopback_answers_only_with_the_token_and_counts_the_rest() -> None:
    port = prom.start_metrics_server(free_ports(1)[0], host="0.0.0.0", role="trainer", token=TOKEN)
    try:
        before = refused("trainer")
        assert get(port, "/metrics") == 401
        assert get(port, "/metrics", "Bearer nope") == 401
        assert refused("trainer") - before == 2
        req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
        assert r.status == 200 and "areal_trainer_steps_total" in text
        assert 'areal_rejected_messages_total{reason="http_unauthorized",role="trainer"} ' in text
    finally:
        prom.stop_metrics_server(port)


def test_off_loopback_without_a_token_neither_endpoint_starts_and_the_port_is_left_free(tmp_path) -> None:
    with pytest.raises(HttpAuthError, match="without a token"):
        start_dashboard(tmp_path, 0, host="0.0.0.0")
    port = free_ports(1)[0]
    with pytest.raises(HttpAuthError, match="http_token"):
        prom.start_metrics_server(port, host="0.0.0.0", role="controller")
    port2 = prom.start_metrics_server(port, host="127.0.0.1", role="controller")  # freed, and loopback needs none
    try:
        assert port2 == port and get(port, "/metrics") == 200
    finally:
        prom.stop_metrics_server(port)
    server, dport = start_dashboard(tmp_path, 0, host="127.0.0.1", token=TOKEN)  # loopback: the token is not asked
    try:
        assert get(dport, "/metrics.json") == 200
    finally:
        stop_dashboard(server)


def test_keys_write_a_private_token_and_a_readable_one_is_refused(tmp_path) -> None:
    generate_keys(tmp_path / "k")
    token_file = tmp_path / "k" / "http_token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    net = load_config(None, [f"net.keys_dir={tmp_path / 'k'}"]).net
    token = http_token(net)
    assert token == token_file.read_text() and len(token) == 43  # 32 random bytes, url-safe base64
    assert not write_token(token_file) and http_token(net) == token  # never replaced
    token_file.chmod(0o644)
    with pytest.raises(HttpAuthError, match="chmod 600"):
        http_token(net)
    assert http_token(load_config(None, [f"net.keys_dir={tmp_path}"]).net) is None  # a keys dir without one
    with pytest.raises(HttpAuthError, match="does not exist"):
        http_token(load_config(None, [f"net.http_token_file={tmp_path / 'absent'}"]).net)


def test_serve_refuses_a_controller_serving_http_off_loopback_without_a_token(tmp_path, capsys) -> None:
    generate_keys(tmp_path / "k")
    (tmp_path / "k" / "http_token").unlink()  # keys from before the token
    base = [f"run.output_dir={tmp_path / 'runs'}", "run.name=h", "net.bind_host=0.0.0.0",
            f"net.keys_dir={tmp_path / 'k'}", f"run.dashboard_port={free_ports(1)[0]}"]
    assert main(["serve", "controller", *base]) == 2
    err = capsys.readouterr().err
    assert "need a token" in err and "http_token does not exist" in err, err
