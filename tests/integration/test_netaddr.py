"""areal_py.wire.netaddr on this host's own interfaces (the five-host case is tests/e2e/test_multi_host.py)."""
from __future__ import annotations

import os

import pytest

from areal_py.wire import netaddr
from trainer import distributed

TEST_NET = "198.51.100.77"  # RFC 5737 documentation range (TEST-NET-2): no address of this host


def test_loopback_peer_is_reached_from_loopback_through_lo():
    assert netaddr.local_address_toward("127.0.0.1", 9) == "127.0.0.1"
    assert netaddr.interface_with_address("127.0.0.1") == "lo"
    assert netaddr.interface_toward("127.0.0.1", 9) is None  # loopback: leave gloo's own choice


def test_an_address_of_no_interface_has_no_name():
    assert netaddr.interface_with_address(TEST_NET) is None


def test_an_unresolvable_peer_is_an_error_naming_it():
    with pytest.raises(OSError, match=r"no route from this host to no-such-host\.invalid:9"):
        netaddr.local_address_toward("no-such-host.invalid", 9)


def test_own_bind_address_keeps_a_bindable_address_and_replaces_a_foreign_one():
    assert netaddr.can_bind("127.0.0.1") and netaddr.can_bind("0.0.0.0")
    assert not netaddr.can_bind(TEST_NET)
    assert netaddr.own_bind_address("0.0.0.0", TEST_NET, 9) == "0.0.0.0"
    # the controller's address is not ours: serve on the loopback route to a loopback controller
    assert netaddr.own_bind_address(TEST_NET, "127.0.0.1", 9) == "127.0.0.1"


def test_is_loopback():
    assert netaddr.is_loopback("127.0.1.1") and netaddr.is_loopback("::1")
    assert not netaddr.is_loopback("10.0.0.1") and not netaddr.is_loopback("0.0.0.0")


def test_gloo_interface_is_left_alone_for_a_loopback_master_and_a_user_choice(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    distributed._choose_gloo_interface()
    assert "GLOO_SOCKET_IFNAME" not in os.environ
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")
    distributed._choose_gloo_interface()
    assert os.environ["GLOO_SOCKET_IFNAME"] == "eth7"


def test_gloo_interface_error_names_master_addr(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "no-such-host.invalid")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(distributed.DistError, match=r"MASTER_ADDR=no-such-host\.invalid: no route"):
        distributed._choose_gloo_interface()
