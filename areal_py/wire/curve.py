"""CURVE: authenticated, encrypted sockets between the roles (ZeroMQ's CurveZMQ, through pyzmq).

The controller binds every socket and is the CURVE server on all four; the trainer and the rollout
servers are clients. A key directory (`areal-py keys DIR`, `net.keys_dir`) holds one key pair per role:

    controller.key  controller.key_secret     every client needs controller.key (it pins the server)
    trainer.key     trainer.key_secret        the trainer's machine needs trainer.key_secret
    rollout.key     rollout.key_secret        (or rollout-<i>.key[_secret], one pair per server)

`<name>.key` holds the public key only, `<name>.key_secret` the pair (mode 600; a secret file that
group or others can read is refused, as ssh refuses such keys). The controller accepts a client only
if its public key is listed for that socket: the trainer's sockets (`net.trainer_port`,
`net.batch_port`) accept `trainer.key`, the rollout sockets (`net.rollout_port`, `net.weights_port`)
`rollout.key` and `rollout-*.key`. So a rollout key cannot take batches or speak as the trainer, and a
client without a listed key receives nothing (a SUB too: the weight broadcasts are encrypted).

A refused handshake is counted like a rejected message (`areal_rejected_messages_total{role=
"controller", reason}`): `unknown_key` (CURVE, key not listed), `no_curve` (a client speaking plain
ZMTP), `handshake_failed` (anything else: a wrong server key, garbage). Each retry of a refused client
counts again. Off loopback a socket without keys is refused (`transport.make_socket`).
"""
from __future__ import annotations

import logging
import os
import queue
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.auth.certs import load_certificate
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from areal_py.config import ConfigError
from areal_py.telemetry.http_auth import TOKEN_FILE, write_token
from areal_py.wire.transport import reject, summarize

log = logging.getLogger(__name__)

CONTROLLER, TRAINER, ROLLOUT = "controller", "trainer", "rollout"
DOMAINS = {"rollout": ROLLOUT, "weights": ROLLOUT, "trainer": TRAINER, "batch": TRAINER}  # socket -> client role


class KeyFileError(ConfigError):
    """A key directory or key file that cannot be used; the message names the file and what to do."""


def summarize_id(sender: bytes) -> str:
    """A peer's routing id for a log line, bounded whatever it sent."""
    return summarize(repr(sender), 80)


# --- key files -------------------------------------------------------------------------------------------

_BANNER = "#   CURVE {kind} of '{name}', written by `areal-py keys`{note}\n"


def _write_key(path: Path, name: str, public: bytes, secret: bytes | None) -> None:
    """A ZPL certificate file (what zmq.auth reads); a secret one created with mode 600, never overwritten."""
    kind, note = ("key pair", ": keep it private (mode 600)") if secret else ("public key", "")
    text = _BANNER.format(kind=kind, name=name, note=note) + "metadata\ncurve\n"
    text += f'    public-key = "{public.decode()}"\n'
    if secret is not None:
        text += f'    secret-key = "{secret.decode()}"\n'
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def key_names(servers: int = 0) -> list[str]:
    """The key pairs `areal-py keys` writes: controller, trainer, and one rollout pair shared by every server
    (`servers` = 0) or rollout-0 .. rollout-<servers-1>, one per server (named as `rollout.server_id`)."""
    rollout = [f"rollout-{i}" for i in range(servers)] if servers else [ROLLOUT]
    return [CONTROLLER, TRAINER, *rollout]


def generate_keys(directory: Path, servers: int = 0) -> list[str]:
    """Write a fresh key pair per name of `key_names(servers)` into `directory` (created mode 700), and the
    HTTP endpoints' token `http_token` unless there; returns the names. Refuses when any of those files exists: replacing keys would lock out the roles using them."""
    directory = Path(directory)
    names = key_names(servers)
    existing = [p for n in names for p in (directory / f"{n}.key", directory / f"{n}.key_secret") if p.exists()]
    if existing:
        raise KeyFileError(f"{directory} already holds keys ({', '.join(p.name for p in existing)}); remove them or "
                        "pick another directory")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in names:
        public, secret = zmq.curve_keypair()
        _write_key(directory / f"{name}.key", name, public, None)
        _write_key(directory / f"{name}.key_secret", name, public, secret)
    write_token(directory / TOKEN_FILE)  # the HTTP endpoints' token, kept if there (telemetry/http_auth.py)
    return names


@dataclass(frozen=True)
class KeyPair:
    """One CURVE key pair, z85-encoded (40 characters each)."""

    public: bytes
    secret: bytes


@dataclass(frozen=True)
class KeyDir:
    """A directory of keys as `generate_keys` writes it."""

    path: Path

    def pair(self, name: str) -> KeyPair:
        """`<name>.key_secret`; refused when missing, unreadable, readable by group/others, or without a secret."""
        f = self.path / f"{name}.key_secret"
        if not f.is_file():
            raise KeyFileError(f"no key pair {f} (net.keys_dir={self.path}): create keys with `areal-py keys "
                            f"{self.path}` and copy {f.name} to this machine")
        mode = f.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(f"{f} is readable by others (mode {stat.S_IMODE(mode):o}): `chmod 600 {f}`")
        public, secret = self._load(f)
        if secret is None:
            raise KeyFileError(f"{f} holds no secret-key: it must be the .key_secret file `areal-py keys` wrote")
        return KeyPair(public, secret)

    def public(self, name: str) -> bytes:
        f = self.path / f"{name}.key"
        if not f.is_file():
            raise KeyFileError(f"no public key {f} (net.keys_dir={self.path}): copy it from the directory "
                            "`areal-py keys` wrote")
        return self._load(f)[0]

    def role_keys(self, role: str) -> dict[bytes, str]:
        """Public key -> file stem of every key of `role`: `trainer.key`, or `rollout.key` and `rollout-*.key`."""
        files = [self.path / f"{role}.key", *sorted(self.path.glob(f"{role}-*.key"))]
        return {self._load(f)[0]: f.stem for f in files if f.is_file()}

    @staticmethod
    def _load(f: Path) -> tuple[bytes, bytes | None]:
        try:
            public, secret = load_certificate(f)
        except (OSError, ValueError) as e:
            raise KeyFileError(f"{f}: not a key file written by `areal-py keys`: {e}") from None
        if len(public) != 40 or (secret is not None and len(secret) != 40):
            raise KeyFileError(f"{f}: a CURVE key is 40 z85 characters; this one is damaged")
        return public, secret


# --- socket sides ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CurveClient:
    """What a connecting socket needs: its own pair and the controller's public key (so it talks to no other)."""

    pair: KeyPair
    server_public: bytes

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_publickey = self.pair.public
        sock.curve_secretkey = self.pair.secret
        sock.curve_serverkey = self.server_public


def client_curve(keys_dir: str, name: str) -> CurveClient | None:
    """The client side for the role or server `name` (trainer, rollout-3, ...): `<name>.key_secret`, or for a
    rollout server without its own pair the shared `rollout.key_secret`. None when `keys_dir` is empty."""
    if not keys_dir:
        return None
    keys = KeyDir(Path(keys_dir).expanduser())
    own = name if (keys.path / f"{name}.key_secret").exists() or name == TRAINER else ROLLOUT
    return CurveClient(keys.pair(own), keys.public(CONTROLLER))


@dataclass
class CurveServer:
    """What one of the controller's bound sockets needs: the controller's pair and the ZAP domain that
    names its allow-list; `apply` also has the gatekeeper count its refused handshakes."""

    gate: Gatekeeper
    domain: str

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.gate.pair.secret
        sock.curve_publickey = self.gate.pair.public
        sock.curve_server = True
        sock.zap_domain = self.domain.encode()
        self.gate.watch(sock, self.domain)


_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def handshake_reason(event: int, value: int) -> str:
    """The rejection reason of a failed-handshake monitor event: unknown_key (ZAP said no), no_curve (the
    client speaks another mechanism, i.e. has no keys), handshake_failed (the rest)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "unknown_key"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return "no_curve"
    return "handshake_failed"


@dataclass
class Gatekeeper:
    """The controller's side of CURVE: its key pair, a ZAP handler that admits only the listed client keys of
    each socket, and a thread that counts every refused handshake (see the module docstring).

    One per ZeroMQ context (ZAP is per context); `stop` when the sockets are closed."""

    keys: KeyDir
    ctx: zmq.Context
    role: str = CONTROLLER
    pair: KeyPair = field(init=False)
    allowed: dict[str, dict[bytes, str]] = field(init=False)
    last_denied: dict[str, bytes] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.pair = self.keys.pair(CONTROLLER)
        self.allowed = self.check_lists(self.keys)
        self._auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("areal_py.wire.zap"))
        self._auth.start()
        for domain in DOMAINS:
            self._auth.configure_curve_callback(domain, self)
        self._new: queue.Queue[tuple[zmq.Socket, str]] = queue.Queue()
        self._stop = threading.Event()
        self._n = 0
        self._thread = threading.Thread(target=self._watch_loop, name="curve-monitor", daemon=True)
        self._thread.start()

    @staticmethod
    def check_lists(keys: KeyDir) -> dict[str, dict[bytes, str]]:
        """The allow-list of each client role (public key -> file stem); an empty one is refused: the
        controller would turn every client of that role away."""
        allowed = {role: keys.role_keys(role) for role in (TRAINER, ROLLOUT)}
        for role, listed in allowed.items():
            if not listed:
                raise KeyFileError(f"{keys.path} lists no {role} key ({role}.key or {role}-*.key): the controller "
                                   f"would refuse every {role}; create keys with `areal-py keys`")
        return allowed

    @classmethod
    def from_config(cls, keys_dir: str, ctx: zmq.Context) -> Gatekeeper | None:
        return cls(KeyDir(Path(keys_dir).expanduser()), ctx) if keys_dir else None

    def server(self, socket_name: str) -> CurveServer:
        """The server side of the controller's socket `socket_name` (a key of DOMAINS)."""
        if socket_name not in DOMAINS:
            raise ValueError(f"unknown socket {socket_name!r}; one of {sorted(DOMAINS)}")
        return CurveServer(self, socket_name)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: is `key` (z85) listed for the client role of socket `domain`? Runs on the authenticator's thread."""
        ok = domain in DOMAINS and key in self.allowed[DOMAINS[domain]]
        if not ok:
            self.last_denied[domain] = key
        return ok

    def sender_fits(self, sender: bytes, frames: list[zmq.Frame]) -> bool:
        """Whether a message on the rollout ROUTER came under the routing id its CURVE key allows: a server with
        a pair of its own (`rollout-3.key`) may speak only as `rollout-3`; the shared `rollout.key` as any
        server. A mismatch is counted (`wrong_key`): one server's key cannot speak for another server."""
        user = frames[0].get("User-Id") if frames else None  # the z85 client key, from the ZAP reply
        stem = self.allowed[ROLLOUT].get(user.encode()) if user else None
        if stem == ROLLOUT or (stem is not None and stem.encode() == sender):
            return True
        who = summarize_id(sender)
        reject(self.role, "wrong_key", f"a message under server id {who} signed with "
               f"{f'the key of {stem}' if stem else 'no listed rollout key'}: dropped")
        return False

    def watch(self, sock: zmq.Socket, domain: str) -> None:
        """Count `sock`'s refused handshakes: a monitor PAIR handed to the monitor thread (created here, then
        used only there; the queue is the memory barrier a socket moving between threads needs)."""
        self._n += 1
        addr = f"inproc://areal-curve-monitor-{id(self)}-{self._n}"
        sock.monitor(addr, _HANDSHAKE_EVENTS)
        pair = self.ctx.socket(zmq.PAIR)
        pair.linger = 0
        pair.connect(addr)
        self._new.put((pair, domain))

    def _watch_loop(self) -> None:
        poller, domains = zmq.Poller(), {}
        try:
            while not self._stop.is_set():
                while not self._new.empty():
                    pair, domain = self._new.get()
                    poller.register(pair, zmq.POLLIN)
                    domains[pair] = domain
                for pair, _ in poller.poll(100):
                    ev = recv_monitor_message(pair)
                    domain = domains[pair]
                    reason = handshake_reason(int(ev["event"]), int(ev["value"]))
                    who = f" (key {self.last_denied.get(domain, b'?').decode(errors='replace')})" \
                        if reason == "unknown_key" else ""
                    reject(self.role, reason, f"refused a client{who} on the {domain} socket "
                           f"{ev['endpoint'].decode(errors='replace')}: {reason.replace('_', ' ')}")
        finally:
            for pair in domains:
                pair.close(linger=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._auth.stop()
