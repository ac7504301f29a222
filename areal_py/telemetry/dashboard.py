"""Live dashboard: the report's charts, served over HTTP and redrawn every few seconds as a run writes
``metrics.jsonl``.

    server, port = start_dashboard(run_dir, port=0)   # daemon thread; port 0 = any free port
    ...                                              # http://127.0.0.1:<port>/
    stop_dashboard(server)

Routes:
  ``/``             one self-contained page (inline CSS, SVG and a few lines of inline script; nothing
                    fetched from elsewhere). The script re-fetches ``/charts`` every ``REFRESH_S``
                    seconds and swaps it in (no flicker, scroll position and open/closed tables kept); without JavaScript a
                    ``<noscript>`` meta refresh reloads the whole page instead.
  ``/charts``       the page body alone (summary, charts, config): what the script swaps in.
  ``/metrics.json`` the step records as a JSON list (non-finite numbers as null), for scripts.

Bound off loopback, the server needs a token and answers only requests carrying it (``http_auth``: a
bearer header, or a browser's Basic login with the token as password); the rest get 401 and are counted.

The charts are exactly the report's (``areal_py.telemetry.report.render_html`` over the same records), so the
live page and ``report.html`` never disagree.
"""
from __future__ import annotations

import http.client
import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from html import escape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from areal_py.telemetry.http_auth import CHALLENGE, authorized, count_refusal, is_loopback_address, refuse_open_bind
from areal_py.telemetry.report import config_mapping, load_config_rows, load_records, render_html
from areal_py.telemetry.step_record import StepRecord

__all__ = ["REFRESH_S", "announce_when_serving", "local_url", "render_fragment", "render_page", "start_dashboard",
           "stop_dashboard"]

REFRESH_S = 3

_SCRIPT = """
(function(){
  var busy = false;
  function tick(){
    if (busy) return; busy = true;
    fetch("charts", {cache: "no-store"}).then(function(r){
      if (!r.ok) throw new Error(r.status);
      return r.text();
    }).then(function(html){
      var live = document.getElementById("live");
      var open = Array.prototype.map.call(live.querySelectorAll("details"), function(d){ return d.open; });
      live.innerHTML = html;
      live.querySelectorAll("details").forEach(function(d, i){ if (i < open.length) d.open = open[i]; });
      document.getElementById("status").textContent = "live · updated " + new Date().toLocaleTimeString();
    }).catch(function(e){
      document.getElementById("status").textContent = "dashboard server unreachable (run finished?) · " + e;
    }).finally(function(){ busy = false; });
  }
  setInterval(tick, %d);
})();
"""


def _body(html: str) -> str:
    """The contents of ``<body>`` of a page made by ``render_html``."""
    start = html.index("<body>") + len("<body>")
    return html[start:html.rindex("</body>")]


def _snapshot(run_dir: Path) -> tuple[list[StepRecord], str]:
    """(records, rendered report page) for the run's files as they are now."""
    records, cfg = load_records(run_dir / "metrics.jsonl"), run_dir / "config.yaml"
    return records, render_html(run_dir.name, records, load_config_rows(cfg), config_mapping(cfg))


def render_fragment(run_dir: Path) -> str:
    """What ``/charts`` serves: the report's body for the current ``metrics.jsonl``."""
    return _body(_snapshot(Path(run_dir))[1])


def render_page(run_dir: Path, refresh_s: int = REFRESH_S) -> str:
    """What ``/`` serves: the report page, its body wrapped in ``<div id="live">`` and refreshed in place."""
    html = _snapshot(Path(run_dir))[1]
    head, body = html[:html.index("<body>")], _body(html)
    head = head.replace("</head>",
                        f'<noscript><meta http-equiv="refresh" content="{int(refresh_s)}"></noscript>'
                        "<style>#status{font-size:11px;color:#666;margin:0 0 6px}</style>"
                        f"<script>{_SCRIPT % (int(refresh_s) * 1000)}</script></head>", 1)
    head = head.replace("<title>areal-py run", "<title>areal-py live", 1)
    status = (f'<p id="status">live · refreshes every {int(refresh_s)} s · rendered '
              f'{escape(time.strftime("%H:%M:%S"))}</p>')
    return f'{head}<body>{status}<div id="live">{body}</div></body></html>'


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


class _Handler(BaseHTTPRequestHandler):
    server: _DashboardServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        run_dir = self.server.run_dir
        try:
            if self.server.token is not None and not authorized(self.headers.get("Authorization"), self.server.token):
                count_refusal("controller", self.client_address[0], path)
                self._send(401, "text/plain; charset=utf-8", b"401: this dashboard needs its token (net.keys_dir/"
                           b"http_token): Authorization: Bearer <token>, or log in with it as the password\n",
                           {"WWW-Authenticate": CHALLENGE})
            elif path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", render_page(run_dir, self.server.refresh_s).encode())
            elif path == "/charts":
                self._send(200, "text/html; charset=utf-8", render_fragment(run_dir).encode())
            elif path == "/metrics.json":
                records = load_records(run_dir / "metrics.jsonl")
                self._send(200, "application/json", json.dumps(_finite([r.to_dict() for r in records]), allow_nan=False).encode())
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: try / or /metrics.json\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away mid-answer

    def _send(self, code: int, ctype: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _DashboardServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], run_dir: Path, refresh_s: int, token: str | None) -> None:
        self.run_dir, self.refresh_s = run_dir, refresh_s
        super().__init__(addr, _Handler)
        bound = self.server_address[0]
        self.token = None if is_loopback_address(bound) else token  # on loopback anyone may read, as before
        try:
            refuse_open_bind(bound, token, "the live dashboard")
        except Exception:
            self.server_close()
            raise


def start_dashboard(run_dir: Path, port: int, host: str = "127.0.0.1", refresh_s: int = REFRESH_S,
                    token: str | None = None) -> tuple[ThreadingHTTPServer, int]:
    """Serve the live dashboard of ``run_dir`` on ``host:port`` in a daemon thread.

    ``port`` 0 picks a free port. Returns (server, bound port); stop with ``stop_dashboard``. The run
    directory need not have a ``metrics.jsonl`` yet: the page says "no steps yet" until it does.
    Off loopback ``token`` is required (``HttpAuthError`` without it) and every request must carry it."""
    server = _DashboardServer((host, int(port)), Path(run_dir), refresh_s, token)
    thread = threading.Thread(target=server.serve_forever, name="areal-dashboard", daemon=True)
    thread.start()
    server._thread = thread  # type: ignore[attr-defined]
    return server, server.server_address[1]


def stop_dashboard(server: ThreadingHTTPServer) -> None:
    """Stop serving, close the socket and join the serving thread."""
    server.shutdown()
    server.server_close()
    thread = getattr(server, "_thread", None)
    if thread is not None:
        thread.join(timeout=5)


def local_url(host: str, port: int) -> str:
    """The dashboard's URL as seen from this machine: a wildcard bind address is reached via loopback."""
    return f"http://{'127.0.0.1' if host in ('', '0.0.0.0', '::') else host}:{int(port)}/"


def _answers(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True  # an HTTP error status is still an answer
    except (OSError, http.client.HTTPException):
        return False


def announce_when_serving(url: str, say: Callable[[str], None], stop: threading.Event,
                          poll_s: float = 0.5, timeout_s: float = 2.0) -> threading.Thread:
    """Call ``say(url)`` once ``url`` first answers an HTTP GET, from a daemon thread; give up when
    ``stop`` is set.

    The controller serves the dashboard only after loading its task and tokenizer, so a URL printed
    when the processes start would not answer for a while; a watcher that waits for it keeps the
    caller's own loop free of network waits."""
    def watch() -> None:
        while not stop.is_set():
            if _answers(url, timeout_s):
                if not stop.is_set():
                    say(url)
                return
            stop.wait(poll_s)

    thread = threading.Thread(target=watch, name="areal-dashboard-watch", daemon=True)
    thread.start()
    return thread
