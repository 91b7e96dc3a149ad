"""What an address or a Host header says about where it points, on its own: every way of
naming this machine with every port form, and the near misses that must not count (a Host
header that passes as loopback lets a rebinding page into dev mode)."""

from __future__ import annotations

import ipaddress

import pytest

from tray_app.addresses import is_loopback, is_loopback_host, parse_ip

THIS_MACHINE = ["localhost", "LOCALHOST", "127.0.0.1", "127.255.0.9", "[::1]", "[0:0::1]"]
GOOD_PORTS = ["", ":1", ":80", ":8787", ":65535"]
BAD_PORTS = [":", ":abc", ":80:80", ":123456", ":-1", ": 80", ":80 ", "x", ":80]"]
OTHER_MACHINES = ["attacker.example", "10.0.0.1", "0.0.0.0", "[::2]", "[::]", "127.1", "::1"]


class TestLoopbackHost:
    @pytest.mark.parametrize("port", GOOD_PORTS)
    @pytest.mark.parametrize("name", THIS_MACHINE)
    def test_this_machine_with_any_port(self, name: str, port: str) -> None:
        assert is_loopback_host(name + port)

    @pytest.mark.parametrize("port", BAD_PORTS)
    @pytest.mark.parametrize("name", THIS_MACHINE)
    def test_this_machine_with_a_port_that_is_no_port(self, name: str, port: str) -> None:
        assert not is_loopback_host(name + port)

    @pytest.mark.parametrize("port", GOOD_PORTS)
    @pytest.mark.parametrize("name", OTHER_MACHINES)
    def test_other_machines_with_any_port(self, name: str, port: str) -> None:
        assert not is_loopback_host(name + port)

    @pytest.mark.parametrize("host", [None, "", "[", "[]", "[]:80", "[::1", "[::1:80", "]"])
    def test_no_name_or_an_unclosed_bracket(self, host: str | None) -> None:
        assert not is_loopback_host(host)

    def test_a_scoped_loopback_address_ends_at_the_first_bracket(self) -> None:
        # A scope id may hold any character, "]" too: read to the last bracket, this host
        # would be the loopback address "::1%x]:80"; read to the first, its port is ":80]".
        assert is_loopback_host("[::1%x]")
        assert is_loopback_host("[::1%x]:80")
        assert not is_loopback_host("[::1%x]:80]")
        assert not is_loopback_host("[::1%x]]")


class TestParseIp:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("203.0.113.9", "203.0.113.9"),
            (" 203.0.113.9 ", "203.0.113.9"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("2001:DB8::1", "2001:db8::1"),
            # An IPv4 client seen through a dual-stack socket is that IPv4 client.
            ("::ffff:198.51.100.7", "198.51.100.7"),
            ("[::ffff:127.0.0.1]", "127.0.0.1"),
        ],
    )
    def test_addresses_in_canonical_form(self, text: str, expected: str) -> None:
        assert parse_ip(text) == ipaddress.ip_address(expected)

    @pytest.mark.parametrize(
        "text", [None, "", "unknown", "/run/lmgate.sock", "1.2.3", "1.2.3.4.5"]
    )
    def test_text_that_is_no_address(self, text: str | None) -> None:
        assert parse_ip(text) is None

    @pytest.mark.parametrize("text", ["127.0.0.1", "127.9.9.9", "::1", "[::1]", "::ffff:127.0.0.1"])
    def test_loopback(self, text: str) -> None:
        assert is_loopback(text)

    @pytest.mark.parametrize("text", [None, "", "localhost", "10.0.0.1", "::2", "::ffff:10.0.0.1"])
    def test_not_loopback(self, text: str | None) -> None:
        assert not is_loopback(text)
