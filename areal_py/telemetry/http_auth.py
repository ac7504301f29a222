"""A shared secret token for the HTTP endpoints (the live dashboard and every role's ``/metrics``) off loopback.

The ZeroMQ sockets off loopback are CURVE or nothing; the HTTP endpoints follow the same rule with a token:

- bound to a loopback address they answer any request, as a local process could read the run directory anyway;
- bound to any other address (a wildcard included) they refuse to start without a token, and answer only a
  request carrying it, in either form:

      Authorization: Bearer <token>                    Prometheus: authorization: {credentials_file: <file>}
      Authorization: Basic base64(<any user>:<token>)   a browser's login prompt; Prometheus basic_auth.password_file

  Anything else gets ``401`` (with ``WWW-Authenticate``, so a browser asks) and is counted in
  ``areal_rejected_messages_total{role, reason="http_unauthorized"}``. Tokens are compared in constant time
  (``hmac.compare_digest``), so the time of a refusal says nothing about how much of a guess was right.

The token lives in a file: ``net.http_token_file``, or ``<net.keys_dir>/http_token``, which ``areal-py keys``
(and a run's own keys, ``<run dir>/keys``) writes beside the CURVE keys: 43 url-safe characters (256 random bits),
mode 600, never replaced. Like a ``.key_secret``, a token file that group or others can read is refused.
Plain HTTP still carries the token in clear: it keeps strangers out, it does not hide the traffic.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import os
import secrets
import stat
import time
from pathlib import Path

from areal_py.config import ConfigError, NetConfig
from areal_py.telemetry.metrics import REJECTED_MESSAGES

__all__ = ["CHALLENGE", "TOKEN_FILE", "UNAUTHORIZED", "HttpAuthError", "authorized", "count_refusal", "http_token",
           "is_loopback_address", "refuse_open_bind", "token_path", "write_token"]

TOKEN_FILE = "http_token"
UNAUTHORIZED = "http_unauthorized"
CHALLENGE = 'Bearer realm="areal-py", Basic realm="areal-py"'  # WWW-Authenticate of a 401
log = logging.getLogger(__name__)


class HttpAuthError(ConfigError):
    """An HTTP endpoint that may not start as configured; the message names the file or key to change."""


def write_token(path: Path) -> bool:
    """Write a fresh token (``secrets.token_urlsafe(32)``, no newline) to ``path`` with mode 600, unless the
    file exists: replacing it would lock out every scraper holding the old one. True when written."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32))
    return True


def token_path(net: NetConfig) -> Path | None:
    """Where the token is read from: ``net.http_token_file``, else ``<net.keys_dir>/http_token``, else none."""
    if net.http_token_file:
        return Path(net.http_token_file).expanduser()
    return Path(net.keys_dir).expanduser() / TOKEN_FILE if net.keys_dir else None


def http_token(net: NetConfig) -> str | None:
    """The token of ``token_path(net)``; None when none is configured or the keys dir has no ``http_token``.

    Raises HttpAuthError for an explicit ``net.http_token_file`` that does not exist, and for any token file
    that group or others can read, or that is empty or holds whitespace inside (a pasted line break)."""
    path = token_path(net)
    if path is None or (not net.http_token_file and not path.exists()):
        return None
    if not path.is_file():
        raise HttpAuthError(f"net.http_token_file={path} does not exist: write a token there (e.g. `python -c "
                            "\"import secrets; print(secrets.token_urlsafe(32))\" > FILE; chmod 600 FILE`)")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise HttpAuthError(f"{path} is readable by others (mode {stat.S_IMODE(mode):o}): `chmod 600 {path}`")
    token = path.read_text().strip()
    if not token or any(c.isspace() for c in token) or not token.isprintable():
        raise HttpAuthError(f"{path} must hold one token (printable, no spaces): it is empty or holds more")
    return token


def is_loopback_address(address: str) -> bool:
    """True for an IP literal in 127.0.0.0/8 or ::1 (a bound socket's address is always a literal)."""
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def refuse_open_bind(bound: str, token: str | None, what: str) -> None:
    """Refuse an endpoint bound to ``bound`` (the socket's own address, after bind) off loopback with no token."""
    if token is None and not is_loopback_address(bound):
        raise HttpAuthError(
            f"refusing to serve {what} on {bound} without a token: off loopback every HTTP endpoint needs one. "
            f"`areal-py keys DIR` writes DIR/{TOKEN_FILE} (set net.keys_dir=DIR), or set net.http_token_file; "
            "or keep net.bind_host on 127.0.0.1, or turn the endpoint off (run.dashboard_port=0, run.metrics_port=0)")


def authorized(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header value carries ``token``: ``Bearer <token>`` or ``Basic`` with the
    token as the password (any user name). Scheme names are case-insensitive (RFC 9110 11.1); the token is
    compared in constant time. A malformed header is simply not authorized."""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    value, scheme = value.strip(), scheme.lower()
    if scheme == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme != "bearer":
        return False
    return hmac.compare_digest(value.encode("utf-8", "surrogateescape"), token.encode())


def count_refusal(role: str, peer: str, path: str) -> None:
    """Count (and log, at most once a minute per role, as the socket rejections are) a 401."""
    REJECTED_MESSAGES.labels(role=role, reason=UNAUTHORIZED).inc()
    _LOG_EVERY.warn(role, f"{role}: refused an HTTP request for {path[:80]!r} from {peer}: no valid token")


class _RateLimitedLog:
    """A warning per key at most every `every_s`: a scanner hammering the port must not flood the log."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.last: dict[str, float] = {}

    def warn(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self.last.get(key, -self.every_s) >= self.every_s:
            self.last[key] = now
            log.warning(message)


_LOG_EVERY = _RateLimitedLog(60.0)
