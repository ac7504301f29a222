"""Confinement of a tool worker process: what a tool call cannot do, and how that is enforced.

Applied once, in the worker, before it serves calls (:func:`confine`), in this order:

1. ``PR_SET_PDEATHSIG``: the kernel kills the worker when the thread that started it exits, so
   no worker outlives its pool.
2. A network namespace of its own (``unshare(CLONE_NEWUSER | CLONE_NEWNET)``) where the kernel
   allows it without privileges: the worker then has no interface but a loopback that is down,
   so no packet can leave, whatever code runs (ctypes, a C extension). Where it is refused
   (containers, ``kernel.unprivileged_userns_clone=0``), the worker goes on without it and says
   so: :attr:`Confinement.network` is ``"netns+audit"`` or ``"audit"``.
3. Resource limits: ``RLIMIT_AS`` (address space, ``memory_mb``; an allocation past it raises
   MemoryError or kills the worker) and ``RLIMIT_CORE`` 0. ``RLIMIT_CPU`` is set per call by
   :func:`limit_cpu` (the limit counts the process's whole life, so each call gets ``cpu_s``
   more than the CPU time used so far; past it the kernel sends SIGXCPU and the worker dies).
4. An audit hook (:pep:`578`, ``sys.addaudithook``) that raises :class:`SandboxRefusal` for the
   events in :data:`REFUSED_EVENTS`: creating or using sockets, name resolution, starting
   processes (subprocess, os.system, exec, spawn, fork), signalling other processes, loading
   native libraries through ctypes, and changing resource limits. It cannot be removed from
   Python code once installed. It is the only network barrier where the namespace is refused,
   and it is a barrier for Python code only: native code already loaded (a C extension making
   its own syscalls) is not seen by it.

Not confined: the file system (a tool can read what the run's user can read, and write where
it can write), and CPU and memory of the machine beyond the limits above.
"""
from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
from dataclasses import dataclass
from typing import Any

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1

REFUSED_EVENTS = frozenset({
    "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.gethostbyaddr", "socket.getnameinfo", "socket.sendto", "socket.sendmsg",
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
    "ctypes.dlopen", "ctypes.dlsym", "resource.setrlimit", "resource.prlimit",
})
"""Audit events a tool may not raise. ``socket.__new__`` alone already stops every new socket;
the others also cover a socket object obtained another way. ``resource.setrlimit`` keeps a tool
from lifting its own limits. ``ctypes.dlopen``/``dlsym`` keep it from loading libc functions
that would bypass the hook (``connect`` by syscall)."""


class SandboxRefusal(PermissionError):
    """Raised by the audit hook for a refused event; the call's reason becomes ``refused``."""


@dataclass(frozen=True)
class Confinement:
    """What :func:`confine` managed to apply in this worker (reported to the pool)."""
    network: str  # "netns+audit" or "audit"
    netns_error: str | None  # why the namespace was not used, when it was not
    memory_mb: int


_gate_open = False  # True only while the worker itself changes its CPU limit


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event in REFUSED_EVENTS and not (_gate_open and event == "resource.setrlimit"):
        raise SandboxRefusal(f"sandbox: {event} is not allowed in a tool (no network, processes or native "
                             "libraries)")


def die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the thread that started it exits (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def enter_network_namespace() -> str | None:
    """Move this (single-threaded) process into a new user + network namespace.

    Returns None on success, else the reason it was not possible (the process is unchanged).
    The user namespace maps the current uid/gid to themselves, so file access is as before.
    """
    uid, gid = os.getuid(), os.getgid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            return f"unshare(CLONE_NEWUSER|CLONE_NEWNET) failed: {os.strerror(err)}"
    except (OSError, AttributeError) as e:
        return f"unshare unavailable: {e}"
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                       ("/proc/self/gid_map", f"{gid} {gid} 1")):
        try:
            with open(path, "w") as f:
                f.write(text)
        except OSError:
            pass  # unmapped ids show as nobody inside; the network is isolated all the same
    return None


def confine(parent_pid: int, memory_mb: int, use_netns: bool = True) -> Confinement:
    """Apply the confinement of the module docstring to this process (call once, single-threaded,
    after the worker has imported what it needs: imports that start processes or load libraries
    are refused afterwards)."""
    die_with_parent(parent_pid)
    netns_error = enter_network_namespace() if use_netns else "disabled (tools.netns=false)"
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.addaudithook(_hook)
    return Confinement(network="audit" if netns_error else "netns+audit", netns_error=netns_error,
                       memory_mb=memory_mb)


def limit_cpu(cpu_s: int) -> None:
    """Allow the next call ``cpu_s`` seconds of CPU on top of what this process has used."""
    global _gate_open
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(usage.ru_utime + usage.ru_stime) + cpu_s
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    _gate_open = True
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    finally:
        _gate_open = False
