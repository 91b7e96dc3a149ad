"""The Host policy (DNS-rebinding defence) on its own: the machine's names, requests without a
Host, and decisions that stay right while the cache of them turns over."""

from __future__ import annotations

import pytest

from tray_app.gateway import hosts as hosts_module
from tray_app.gateway.hosts import HostPolicy, host_name


def test_the_machines_own_names_are_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "MyBox.lan.")
    policy = HostPolicy()
    assert all(policy.allows(h) for h in ("mybox.lan", "MYBOX:8787", "mybox.local", "localhost"))
    assert not policy.allows("attacker.example")


def test_a_machine_without_a_name_allows_no_made_up_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # With an empty host name, ".local" would otherwise pass as "<short>.local".
    monkeypatch.setattr("socket.gethostname", lambda: "")
    policy = HostPolicy()
    assert policy.allows("localhost") and policy.allows("127.0.0.1")
    assert not policy.allows(".local")
    assert not policy.allows("attacker.example")


@pytest.mark.parametrize("host", [None, ""])
def test_a_request_without_a_host_is_allowed(host: str | None) -> None:
    # HTTP/1.0 without Host: a browser always sends one, so a rebinding page cannot do this.
    assert HostPolicy().allows(host)


def test_decisions_stay_right_after_the_cache_is_emptied() -> None:
    policy = HostPolicy(["gate.example.org"])
    for i in range(3_000):  # more distinct hosts than the cache holds
        assert not policy.allows(f"rebind-{i}.attacker.example")
        assert policy.allows(f"10.0.{i // 256}.{i % 256}")
    assert policy.allows("gate.example.org")
    assert not policy.allows("rebind-0.attacker.example")
    policy.set_public_host("calm-otter.ngrok-free.app")
    assert policy.allows("calm-otter.ngrok-free.app:443")
    policy.set_public_host(None)
    assert not policy.allows("calm-otter.ngrok-free.app:443")


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("[::1]", "::1"),
        ("[::1]:8787", "::1"),
        ("[2001:DB8::7]:443", "2001:db8::7"),
        ("[::1]]:8787", "::1"),  # the name ends at the first closing bracket
        ("Gate.Example.org", "gate.example.org"),
        ("gate.example.org:8443", "gate.example.org"),
        ("gate.example.org.", "gate.example.org"),  # the fully qualified form, root dot
        ("gate.example.org.:8443", "gate.example.org"),
        (" gate.example.org ", "gate.example.org"),
        ("::1", "::1"),  # a bare IPv6 address: its colons are not a port
        ("127.0.0.1:8787", "127.0.0.1"),
    ],
)
def test_the_name_of_a_host_header(header: str, name: str) -> None:
    assert host_name(header) == name


@pytest.mark.parametrize("header", ["[::1]", "[::1]:8787", "[::ffff:127.0.0.1]:80", "[fe80::1]"])
def test_a_bracketed_ipv6_address_is_allowed(header: str) -> None:
    assert HostPolicy().allows(header)


@pytest.mark.parametrize("configured", ["gate.example.org", "Gate.Example.org."])
@pytest.mark.parametrize(
    "header",
    ["gate.example.org", "GATE.example.org:443", "gate.example.org.", "gate.example.org.:8443"],
)
def test_every_form_of_a_configured_name_is_allowed(configured: str, header: str) -> None:
    assert HostPolicy([configured]).allows(header)


@pytest.mark.parametrize(
    "header",
    [".gate.example.org", "gate.example.org.attacker.example", "gate", "gate.example"],
)
def test_names_that_only_resemble_a_configured_one_are_refused(
    monkeypatch: pytest.MonkeyPatch, header: str
) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "mybox")  # not whatever this machine is
    assert not HostPolicy(["gate.example.org"]).allows(header)


@pytest.mark.parametrize("header", [":8787", ".", " ", "[]", "[]:80", "..:80"])
def test_a_host_header_without_a_name_is_refused(
    monkeypatch: pytest.MonkeyPatch, header: str
) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "mybox")
    # Before any tunnel runs there is no public host, and an empty name must not pass for it.
    assert not HostPolicy(["gate.example.org"]).allows(header)


@pytest.mark.parametrize(
    ("machine", "allowed"),
    [
        ("mybox", ["mybox", "mybox.local"]),
        ("mybox.office.example.org", ["mybox.office.example.org", "mybox", "mybox.local"]),
    ],
)
def test_the_machines_short_name_is_its_first_label(
    monkeypatch: pytest.MonkeyPatch, machine: str, allowed: list[str]
) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: machine)
    policy = HostPolicy()
    assert all(policy.allows(h) for h in allowed)
    for other in ("mybox.office", "mybox.office.local", ".local", "local"):
        assert not policy.allows(other)


def test_a_host_is_decided_once_until_the_public_host_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The decision is cached by the raw header: parsing it again on every request is the
    # work the cache exists to save.
    policy = HostPolicy(["gate.example.org"])
    parsed: list[str] = []

    def counting_host_name(host: str) -> str:
        parsed.append(host)
        return host_name(host)

    monkeypatch.setattr(hosts_module, "host_name", counting_host_name)
    for _ in range(3):
        assert policy.allows("gate.example.org:443")
        assert not policy.allows("attacker.example")
    assert parsed == ["gate.example.org:443", "attacker.example"]
    policy.set_public_host("calm-otter.ngrok-free.app")
    parsed.clear()
    assert policy.allows("gate.example.org:443")
    assert parsed == ["gate.example.org:443"]  # the cache was dropped with the old public host


def test_the_decision_cache_holds_at_most_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hosts_module, "_CACHE_LIMIT", 8)
    policy = HostPolicy()
    for i in range(40):
        assert not policy.allows(f"rebind-{i}.attacker.example")
        assert len(policy._decided) <= 8
    assert policy.allows("127.0.0.1")
