"""The run's processes as every launcher sees them: what each one runs (`RoleSpec`, `role_specs`) and the
interface `launcher.monitor` watches (`RoleChild`), satisfied by a local process and by a Ray actor's."""
from __future__ import annotations

import ctypes
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from areal_py.config import Config

STOP_GRACE_S = 5.0


class RoleChild(Protocol):
    """One started role as `monitor` sees it: a local process (`Child`) or one a Ray actor started
    (areal_py.app.ray_launcher). `poll` is None while it runs, else its exit code."""

    name: str
    log_path: Path

    def poll(self) -> int | None: ...

    def tail(self, lines: int = 15) -> str: ...

    def terminate(self) -> None: ...


def log_tail(log_path: Path, lines: int = 15) -> str:
    """The last `lines` lines of a role's log, indented for an error message."""
    try:
        text = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + x for x in text[-lines:])


def die_with_parent() -> None:
    """Linux: the kernel sends SIGTERM to the child if its parent (the launcher, or a Ray actor) dies, so
    nothing is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass(frozen=True)
class RoleSpec:
    """One process of the run: `name` is also its log's stem (<run dir>/logs/<name>.log); it runs
    `python -m areal_py.app.cli serve <role> <run dir>/config.yaml <args>`."""

    name: str
    role: str  # controller | trainer | rollout
    args: tuple[str, ...]
    rank: int = 0  # the trainer rank; 0 for the other roles

    def serve_args(self, cfg_file: str, extra: Sequence[str] = ()) -> list[str]:
        """The arguments after the Python executable (each launcher runs its own node's interpreter)."""
        return ["-m", "areal_py.app.cli", "serve", self.role, cfg_file, *self.args, *extra]


def role_specs(cfg: Config, resume: bool, threads: dict[str, int] | None = None) -> list[RoleSpec]:
    """Every process of the run in start order: controller, trainer ranks, rollout servers. `threads` (role ->
    torch threads, see `launcher.role_thread_counts`) becomes each one's run.torch_threads, so the roles do not each guess
    from a machine the launcher itself just loaded; the trainer's threads are shared by its ranks."""
    ranks = cfg.trainer.world_size

    def extra(role: str) -> tuple[str, ...]:
        if not threads:
            return ()
        return (f"run.torch_threads={max(1, threads[role] // ranks) if role == 'trainer' else threads[role]}",)

    specs = [RoleSpec("controller", "controller", extra("controller"))]
    specs += [RoleSpec("trainer" if r == 0 else f"trainer-{r}", "trainer",
                       (*(("--resume",) if resume else ()), *extra("trainer")), r) for r in range(ranks)]
    specs += [RoleSpec(f"rollout-{i}", "rollout", (f"rollout.server_id=rollout-{i}", *extra("rollout")))
              for i in range(cfg.rollout.num_servers)]
    return specs
