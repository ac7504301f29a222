"""Which of this host's addresses, and which interface, reach a given peer: what a process binds or
advertises when the roles run on different hosts.

A process that tells its peers where to reach it must name an address they can reach. The host name
is no guide (Debian's /etc/hosts maps it to 127.0.1.1, many containers to 127.0.0.1), and a peer's
address is no address of this host. The kernel's routing table is: a UDP socket "connected" to the
peer (no packet is sent) is given the source address the kernel would use to reach it.

Linux only (the interface lookup is the SIOCGIFADDR ioctl), IPv4 for the interface name.
"""
from __future__ import annotations

import fcntl
import socket
import struct

_SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's (primary) IPv4 address


def local_address_toward(host: str, port: int) -> str:
    """This host's address on its route to ``host:port``: 127.0.0.1 for a loopback peer, the address of the
    interface the kernel would send from otherwise. Raises OSError naming the peer when there is no route
    or the name does not resolve."""
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.connect(where)  # UDP: picks the route and source address, sends nothing
            return s.getsockname()[0]
    except OSError as e:
        raise OSError(f"no route from this host to {host}:{port}: {e}") from None


def interface_with_address(address: str) -> str | None:
    """The name of the interface whose primary IPv4 address is ``address``, or None (no such interface, an
    IPv6 address, or a secondary address, which SIOCGIFADDR does not report)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # the interface has no IPv4 address
                continue
            if socket.inet_ntoa(raw[20:24]) == address:  # struct ifreq: 16-byte name, sockaddr_in at 16
                return name
    return None


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8 and ::1."""
    return address == "::1" or address.startswith("127.")


def interface_toward(host: str, port: int) -> str | None:
    """The interface this host reaches ``host:port`` through, or None when that route is loopback (the peer
    is this host) or the address has no name `interface_with_address` can find."""
    local = local_address_toward(host, port)
    return None if is_loopback(local) else interface_with_address(local)


def can_bind(address: str) -> bool:
    """True when this host can bind ``address`` (a wildcard, or one of its own addresses)."""
    try:
        family = socket.getaddrinfo(address, 0, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


def own_bind_address(preferred: str, peer: str, port: int) -> str:
    """``preferred`` when this host can bind it, else this host's address toward ``peer:port``.

    For a role that serves something (its /metrics) beside the controller: `net.bind_host` is the
    controller's interface, which on another host is no address of this one."""
    return preferred if can_bind(preferred) else local_address_toward(peer, port)


WILDCARDS = ("", "*", "0.0.0.0", "::")


def is_local_host(host: str) -> bool:
    """True when every address ``host`` resolves to is loopback (`is_loopback`).

    A wildcard (0.0.0.0, ::, *) is every interface, so not local; a name that does not resolve counts as not
    local (the caller refusing is the safe side)."""
    host = host.strip("[]")
    if host in WILDCARDS:
        return False
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addrs) and all(is_loopback(a) for a in addrs)


def tcp_host(endpoint: str) -> str | None:
    """The host of a ZeroMQ ``tcp://host:port`` endpoint; None for another transport (ipc, inproc)."""
    if not endpoint.startswith("tcp://"):
        return None
    return endpoint[len("tcp://"):].rsplit(":", 1)[0]
