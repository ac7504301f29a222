"""CURVE keys as the launchers and the command line see them: `areal-py keys DIR [--servers N]`, a run's
own keys when the controller binds off loopback, and a role's keys checked before it loads a model.

The key files and the sockets are areal_py/wire/curve.py's; this module decides when a run needs keys and
where they come from, and tells the operator which file goes to which machine.
"""
from __future__ import annotations

from pathlib import Path

from areal_py.config import Config
from areal_py.telemetry.http_auth import TOKEN_FILE, HttpAuthError, http_token, token_path, write_token
from areal_py.wire.curve import CONTROLLER, TRAINER, Gatekeeper, KeyDir, client_curve, generate_keys
from areal_py.wire.netaddr import is_local_host, own_bind_address
from areal_py.wire.transport import require_keys


def where_keys_go(directory: Path, names: list[str]) -> str:
    """The operator's instructions for a fresh key directory: which files each machine needs."""
    servers = [n for n in names if n not in (CONTROLLER, TRAINER)]
    per_server = servers != ["rollout"]
    lines = [f"wrote CURVE key pairs for {', '.join(names)} in {directory}",
             "  each machine needs controller.key and the .key_secret of the role(s) it runs:",
             f"    controller: controller.key_secret and every .key ({', '.join(f'{n}.key' for n in names[1:])})",
             "    trainer (rank 0): controller.key, trainer.key_secret"]
    if per_server:
        lines.append(f"    rollout server <id>: controller.key, <id>.key_secret (ids {', '.join(servers)}, "
                     "as rollout.server_id)")
    else:
        lines.append("    rollout servers: controller.key, rollout.key_secret")
    lines += [(f"  {TOKEN_FILE}: the token the dashboard and /metrics require off loopback, on every machine serving "
               "them and for whoever reads them (Prometheus: authorization: {credentials_file: <it>})"),
              "  then set net.keys_dir=<that directory> on every role; keep the .key_secret files mode 600.",
              "  On a filesystem every node shares, point every role at this one directory."]
    return "\n".join(lines)


def keys_command(directory: str, servers: int = 0) -> int:
    """`areal-py keys DIR`: write the key pairs and say where each goes; refuses to replace existing keys."""
    d = Path(directory).expanduser()
    names = generate_keys(d, servers)
    print(where_keys_go(d, names))
    return 0


def ensure_run_keys(cfg: Config) -> Path | None:
    """For a run whose sockets leave loopback (net.bind_host or net.controller_host) with no net.keys_dir: a
    key set of its own in `<run dir>/keys` (written once, reused by --resume), named in `cfg.net.keys_dir` so
    every role reads it from the run's config.yaml. Returns that directory, or None when nothing was needed or keys are given.
    The run directory is on a filesystem every node shares (docs/operations.md), so each role finds its key."""
    net = cfg.net
    if net.keys_dir or (is_local_host(net.bind_host) and is_local_host(net.controller_host)):
        return None
    d = cfg.run_dir() / "keys"
    if not (d / f"{CONTROLLER}.key_secret").exists():
        generate_keys(d)
    write_token(d / TOKEN_FILE)  # no-op when there (generate_keys writes it; keys from before it had none)
    cfg.net.keys_dir = str(d)
    return d


def metrics_host(cfg: Config, role: str) -> str:
    """Where `role` serves /metrics: net.bind_host for the controller; for the others the same when this host
    can bind it, else this host's address toward the controller (net.bind_host is the controller's interface)."""
    n = cfg.net
    return n.bind_host if role == "controller" else own_bind_address(n.bind_host, n.controller_host, n.trainer_port)


def check_http_token(cfg: Config, role: str) -> None:
    """Off loopback, a role serving HTTP (the controller's dashboard, any role's /metrics) has a readable token
    (telemetry/http_auth.py); raises HttpAuthError naming what to do, before any model loads."""
    serving = cfg.run.metrics_port or (role == "controller" and cfg.run.dashboard_port)
    if not serving:
        return
    host = metrics_host(cfg, role)
    if http_token(cfg.net) is None and not is_local_host(host):
        where = token_path(cfg.net)
        raise HttpAuthError(
            f"{role}: the dashboard and /metrics on {host} (off loopback) need a token and "
            f"{where or 'net.keys_dir/' + TOKEN_FILE} {'does not exist' if where else 'is not set'}: "
            f"`areal-py keys DIR` writes DIR/{TOKEN_FILE} (or copy it from where it did), or set "
            "net.http_token_file; or run.dashboard_port=0 run.metrics_port=0")


def check_role_keys(cfg: Config, role: str) -> None:
    """Before a role started by `areal-py serve` loads anything: off loopback it has keys (and a token for its HTTP
    endpoints), and with net.keys_dir the files it will use are there and private (a KeyFileError/InsecureSocket/
    HttpAuthError names them)."""
    check_http_token(cfg, role)
    net = cfg.net
    if not net.keys_dir:
        if role == "controller":
            require_keys(net.addr(net.rollout_port, bind=True), bind=True)
        else:
            require_keys(net.addr(net.rollout_port), bind=False)
        return
    keys = KeyDir(Path(net.keys_dir).expanduser())
    if role == "controller":
        keys.pair(CONTROLLER)
        Gatekeeper.check_lists(keys)
    else:
        client_curve(net.keys_dir, TRAINER if role == "trainer" else cfg.rollout.server_id)
