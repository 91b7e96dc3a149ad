"""The Host policy (DNS-rebinding defence) on its own: the machine's names, requests without a
Host, and decisions that stay right while the cache of them turns over."""

from __future__ import annotations

import pytest

from tray_app.gateway.hosts import HostPolicy


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
