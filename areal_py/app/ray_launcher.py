"""`areal-py run run.launcher=ray`: the local launcher's roles, each started by a small Ray actor on the node
Ray placed it on.

Ray does the placing, through placement groups: the trainer ranks share one (PACK or STRICT_PACK: together),
the rollout servers one (SPREAD: across nodes), the controller its own. Each role's actor starts the very
process the local launcher would (`python -m areal_py.app.cli serve ROLE <run dir>/config.yaml ...`) on its
node, with its log in <run dir>/logs/<name>.log; it reports the exit code and stops the process. The launcher
watches the actors with the local launcher's `monitor`, so the run behaves the same: progress bar, a failed
role stops the run and names itself, a lost rollout server is survived, Ctrl-C stops everything. The run
directory and the launcher's working directory (relative paths are taken from it) must therefore be the same
path on a filesystem every node shares.

Addresses: on one node everything stays as configured (127.0.0.1 by default), as locally. On several, the
roles connect to the controller's node IP (net.controller_host), the trainer ranks meet at rank 0's node IP
and a port free there, and so does weights.transfer=dist; the controller must then bind an interface the
other nodes reach, which only the user knows, so a loopback net.bind_host is refused with what to set.

Ray is imported only inside functions: this module is imported only when run.launcher=ray, and the placement
plan and the address choice are pure functions, tested without a cluster.
"""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from areal_py.app.role_procs import STOP_GRACE_S, RoleSpec, die_with_parent, log_tail, role_specs
from areal_py.config import Config, ConfigError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
LOST = -1  # the exit code `monitor` sees for a role whose actor is gone or does not answer


class RayLaunchError(RuntimeError):
    """Ray could not place or start the run's roles; the message names what was waited for."""


@dataclass(frozen=True)
class GroupPlan:
    """One placement group: its bundles (Ray resources, one per role) and Ray's placement strategy."""

    name: str  # controller | trainer | rollout
    strategy: str
    bundles: tuple[dict[str, float], ...]


@dataclass(frozen=True)
class Placement:
    """Where one role's actor goes: bundle `bundle` of group `group`."""

    spec: RoleSpec
    group: str
    bundle: int


@dataclass(frozen=True)
class PlacementPlan:
    groups: tuple[GroupPlan, ...]
    placements: tuple[Placement, ...]

    @property
    def cpus(self) -> float:
        """Logical CPUs the plan reserves: what a Ray started for the run must offer."""
        return sum(b.get("CPU", 0.0) for g in self.groups for b in g.bundles)

    def bundle(self, p: Placement) -> dict[str, float]:
        return next(g for g in self.groups if g.name == p.group).bundles[p.bundle]


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


def placement_plan(cfg: Config, specs: Sequence[RoleSpec]) -> PlacementPlan:
    """The placement groups for `specs` (from `role_specs`): trainer ranks in one group under
    run.ray_trainer_strategy, bundle i = rank i; rollout servers in one SPREAD group, in order; the controller
    alone. Every bundle reserves run.ray_cpus_per_role CPUs, plus the role's GPUs."""
    r = cfg.run
    cpus = r.ray_cpus_per_role
    count = {role: sum(s.role == role for s in specs) for role in ("controller", "trainer", "rollout")}
    if count["controller"] != 1 or count["trainer"] < 1 or count["rollout"] < 1:
        raise ValueError(f"a run needs one controller, a trainer and a rollout server; got {count}")
    groups = (GroupPlan("controller", "STRICT_PACK", (_bundle(cpus, 0.0),)),
              GroupPlan("trainer", r.ray_trainer_strategy, (_bundle(cpus, r.ray_gpus_per_trainer),) * count["trainer"]),
              GroupPlan("rollout", "SPREAD", (_bundle(cpus, r.ray_gpus_per_server),) * count["rollout"]))
    placements, servers = [], 0
    for s in specs:
        if s.role == "rollout":
            placements.append(Placement(s, "rollout", servers))
            servers += 1
        else:
            placements.append(Placement(s, s.role, s.rank if s.role == "trainer" else 0))
    return PlacementPlan(groups, tuple(placements))


@dataclass(frozen=True)
class Addresses:
    """How the placed roles reach each other: overrides for every role's command line, the trainer ranks'
    rendezvous host, and each trainer rank's LOCAL_RANK."""

    overrides: tuple[str, ...]
    master_addr: str
    local_ranks: dict[str, int]
    multi_node: bool


def addresses(cfg: Config, specs: Sequence[RoleSpec], nodes: dict[str, str]) -> Addresses:
    """Addresses for roles placed on `nodes` (role name -> node IP, as Ray reports it).

    One node: nothing changes and the ranks meet on 127.0.0.1, as locally. Several: the roles connect to the
    controller's node and the ranks meet at rank 0's node (net.controller_host and weights.dist_host are set
    only where left at loopback), and a loopback net.bind_host is a ConfigError. LOCAL_RANK counts a rank's
    predecessors on its node, or is 0 when each rank has GPUs of its own (Ray's CUDA_VISIBLE_DEVICES shows it
    only those)."""
    trainers = sorted((s for s in specs if s.role == "trainer"), key=lambda s: s.rank)
    rank0 = nodes[trainers[0].name]
    local: dict[str, int] = {}
    for s in trainers:
        local[s.name] = 0 if cfg.run.ray_gpus_per_trainer else sum(nodes[t.name] == nodes[s.name] for t in trainers
                                                                     if t.rank < s.rank)
    if len(set(nodes.values())) == 1:
        return Addresses((), "127.0.0.1", local, multi_node=False)
    ctrl = nodes["controller"]
    if cfg.net.bind_host in LOOPBACK:
        raise ConfigError(f"net.bind_host={cfg.net.bind_host}: Ray placed the roles on {len(set(nodes.values()))} "
                          f"nodes ({', '.join(sorted(set(nodes.values())))}) and the controller on {ctrl}, where a "
                          f"loopback address is unreachable from the others; set net.bind_host=0.0.0.0 (or {ctrl}), "
                          "and open the net.*_port ports between the nodes")
    overrides = []
    if cfg.net.controller_host in LOOPBACK:
        overrides.append(f"net.controller_host={ctrl}")
    if cfg.weights.transfer == "dist" and cfg.weights.dist_host in LOOPBACK:
        overrides.append(f"weights.dist_host={rank0}")
    return Addresses(tuple(overrides), rank0, local, multi_node=True)


class RoleActor:
    """Runs on the node Ray placed it on (as `ray.remote(RoleActor)`): starts one role's process there,
    answers for it, and stops it. The process gets SIGTERM from the kernel if the actor's worker dies."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.log_path = Path()

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def free_port(self, host: str) -> int:
        with socket.socket() as s:
            s.bind((host, 0))
            return s.getsockname()[1]

    def start(self, args: list[str], env: dict[str, str], cwd: str, log_path: str) -> int:
        if not Path(cwd).is_dir():
            raise FileNotFoundError(f"{cwd} (the launcher's working directory) does not exist on node "
                                    f"{self.node_ip()}: the run must start from a directory every node shares")
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as f:
            self.proc = subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                         env={**os.environ, **env},
                                         preexec_fn=die_with_parent)  # noqa: PLW1509 - prctl only, before exec
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def tail(self, lines: int = 15) -> str:
        return log_tail(self.log_path, lines)

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM, then SIGKILL after `grace_s`; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=grace_s)


@dataclass
class RayChild:
    """A role started by a `RoleActor`, as `monitor` sees it (launcher.RoleChild). An actor that dies or
    does not answer within run.ray_timeout_s reads as exit code LOST, and its tail says why."""

    name: str
    actor: Any
    log_path: Path
    timeout_s: float
    lost: str = ""

    def poll(self) -> int | None:
        if self.lost:
            return LOST
        import ray

        try:
            return ray.get(self.actor.poll.remote(), timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.lost = f"its Ray actor did not answer poll() within {self.timeout_s:g}s (run.ray_timeout_s)"
        except ray.exceptions.RayError as e:
            self.lost = f"its Ray actor is gone: {type(e).__name__}: {str(e).splitlines()[0]}"
        return LOST

    def tail(self, lines: int = 15) -> str:
        text = log_tail(self.log_path, lines)  # the run directory is shared
        return f"    ({self.lost})\n{text}" if self.lost else text

    def terminate(self) -> None:
        self.actor.stop.remote(STOP_GRACE_S)


def _wait(refs: Any, timeout_s: float, what: str) -> Any:
    """ray.get with a timeout whose error names what was waited for."""
    import ray

    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise RayLaunchError(f"timed out after {timeout_s:g}s (run.ray_timeout_s) waiting for {what}") from None
    except ray.exceptions.RayTaskError as e:  # an actor method raised: its own message
        raise RayLaunchError(f"while waiting for {what}: {e.cause if e.cause else e}") from None
    except ray.exceptions.RayError as e:
        raise RayLaunchError(f"while waiting for {what}: {type(e).__name__}: {e}") from None


def _connect(cfg: Config, plan: PlacementPlan) -> bool:
    """ray.init: joins run.ray_address, or starts a Ray for this run alone; True if it started one."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = {"log_to_driver": False, "logging_level": "WARNING"}
    if ray.is_initialized():  # a caller's own Ray session (e.g. a notebook): use it, leave it running
        return False
    try:
        if cfg.run.ray_address:
            ray.init(address=cfg.run.ray_address, **quiet)
            return False
        # address="local": a new instance even when RAY_ADDRESS is set; logical CPUs, not cores
        ray.init(address="local", num_cpus=cfg.run.ray_num_cpus or math.ceil(plan.cpus),
                 include_dashboard=False, object_store_memory=80 * 2**20, **quiet)
        return True
    except ConnectionError as e:
        raise ConfigError(f"run.ray_address={cfg.run.ray_address}: {e}") from None
    finally:
        try:  # ray.init installs a SIGTERM handler that exits with 15; the launcher's exits with 143
            import signal

            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        except ValueError:  # not the main thread
            pass


def start_on_ray(cfg: Config, resume: bool, threads: dict[str, int] | None) -> tuple[list[RayChild], Any]:
    """Place and start every role on Ray; returns the children for `monitor` and the function that stops
    them all (actors killed, placement groups removed, Ray shut down if this run started it). Anything that
    fails on the way undoes what was done and raises (RayLaunchError, ConfigError)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    t0 = time.monotonic()
    plan = placement_plan(cfg, role_specs(cfg, resume))
    started = _connect(cfg, plan)
    timeout = cfg.run.ray_timeout_s
    pgs: dict[str, Any] = {}
    actors: dict[str, Any] = {}
    try:
        for g in plan.groups:
            pgs[g.name] = placement_group(list(g.bundles), strategy=g.strategy)
        for g in plan.groups:
            _wait(pgs[g.name].ready(), timeout, f"placement group '{g.name}' ({len(g.bundles)} x {g.bundles[0]}, "
                  f"{g.strategy}) to be scheduled; the cluster has {ray.available_resources()} free")
        actor_cls = ray.remote(RoleActor)
        for p in plan.placements:
            b = plan.bundle(p)
            actors[p.spec.name] = actor_cls.options(
                num_cpus=b["CPU"], num_gpus=b.get("GPU", 0), scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pgs[p.group], placement_group_bundle_index=p.bundle)).remote()
        names = list(actors)
        ips = _wait([actors[n].node_ip.remote() for n in names], timeout,
                    f"the Ray actors of {', '.join(names)} to start and report their nodes")
        nodes = dict(zip(names, ips))
        specs = [p.spec for p in plan.placements]
        addr = addresses(cfg, specs, nodes)
        if addr.multi_node:  # the launcher measured this machine's free cores, not the other nodes'
            threads = None
        specs = role_specs(cfg, resume, threads)
        env = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        ranks = cfg.trainer.world_size
        master_port = _wait(actors["trainer"].free_port.remote(addr.master_addr), timeout,
                            f"a free MASTER_PORT on {addr.master_addr} from trainer rank 0's actor") if ranks > 1 else 0
        run_dir = cfg.run_dir().resolve()
        cfg_file = str(run_dir / "config.yaml")
        refs = []
        for s in specs:
            rank_env = {"RANK": str(s.rank), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(addr.local_ranks[s.name]),
                        "MASTER_ADDR": addr.master_addr, "MASTER_PORT": str(master_port)} \
                if s.role == "trainer" and ranks > 1 else {}
            refs.append(actors[s.name].start.remote(s.serve_args(cfg_file, addr.overrides), {**env, **rank_env},
                                                    os.getcwd(), str(run_dir / "logs" / f"{s.name}.log")))
        _wait(refs, timeout, f"the processes of {', '.join(names)} to start")
    except BaseException:
        _shutdown(actors, pgs, started, timeout)
        raise
    print(f"areal-py: Ray {'started for this run' if started else 'cluster ' + cfg.run.ray_address}; placed "
          + ", ".join(f"{n}@{ip}" for n, ip in nodes.items()) + f" ({time.monotonic() - t0:.1f}s)", flush=True)
    children = [RayChild(s.name, actors[s.name], run_dir / "logs" / f"{s.name}.log", timeout) for s in specs]

    def stop(_remaining: list) -> None:  # every actor, also those of servers `monitor` let go
        _shutdown(actors, pgs, started, timeout)

    return children, stop


def _shutdown(actors: dict[str, Any], pgs: dict[str, Any], started: bool, timeout_s: float) -> None:
    """Stop every role's process (SIGTERM, SIGKILL after STOP_GRACE_S), kill the actors, remove the placement
    groups, and shut Ray down if this run started it. Never raises: it runs on the way out of every failure."""
    import ray
    from ray.util.placement_group import remove_placement_group

    try:
        refs = {a.stop.remote(STOP_GRACE_S): n for n, a in actors.items()}
        pending = ray.wait(list(refs), num_returns=len(refs), timeout=2 * STOP_GRACE_S + timeout_s)[1] if refs else []
        if pending:
            print(f"areal-py: the Ray actors of {', '.join(refs[r] for r in pending)} did not stop their processes "
                  f"within {2 * STOP_GRACE_S + timeout_s:g}s; killing the actors (the kernel then SIGTERMs the "
                  "processes)", file=sys.stderr)
        for a in actors.values():
            ray.kill(a, no_restart=True)
        for pg in pgs.values():
            remove_placement_group(pg)
    except Exception as e:  # noqa: BLE001 - best effort on the way out; Ray's shutdown below still runs
        print(f"areal-py: while stopping the Ray actors: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        if started:
            ray.shutdown()
