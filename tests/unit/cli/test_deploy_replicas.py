"""`lmgate deploy nginx --replica`: what lands in the site file is checked first, since nginx
reads every character of it as configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from tray_app.cli.deploy import Deployment, instructions, nginx_site, systemd_unit, write
from tray_app.cli.input_errors import InputError

DOMAIN = "llm.example.test"


def _replicas(*replicas: str) -> Deployment:
    return Deployment(domain=DOMAIN, replicas=replicas).validate()


def test_one_replica_keeps_the_single_site_and_unit() -> None:
    for d in (Deployment(domain=DOMAIN), _replicas("127.0.0.1:8787")):
        site = nginx_site(d)
        assert "upstream" not in site and "proxy_pass http://127.0.0.1:8787;" in site
        assert "proxy_next_upstream" not in site
        unit = systemd_unit(d)
        assert "--port 8787" in unit and "LMGATE_STATE_BACKEND" not in unit


def test_several_replicas_get_an_upstream_block_that_never_repeats_a_sent_chat() -> None:
    d = _replicas("127.0.0.1:8787", "127.0.0.1:8788", "10.0.0.5:8787")
    site = nginx_site(d)
    assert "upstream lmgate_replicas {" in site and "least_conn;" in site
    for server in ("127.0.0.1:8787", "127.0.0.1:8788", "10.0.0.5:8787"):
        assert f"server {server} max_fails=2 fail_timeout=10s;" in site
    assert "proxy_pass http://lmgate_replicas;" in site
    # "non_idempotent" would let nginx send a POST it already sent to a second replica.
    assert "proxy_next_upstream error timeout;" in site and "non_idempotent" not in site
    unit = systemd_unit(d)
    assert "--port %i" in unit and "Environment=LMGATE_STATE_BACKEND=postgres" in unit
    assert d.local_ports == (8787, 8788)


def test_replica_instructions_name_the_shared_secrets_and_each_local_instance(
    tmp_path: Path,
) -> None:
    d = _replicas("127.0.0.1:8787", "127.0.0.1:8788", "10.0.0.5:8787")
    site, unit = write(d, tmp_path)
    assert unit.name == "lmgate@.service"
    text = instructions(d, site, unit)
    for secret in ("state-database-url", "state-redis-url", "jwt-signing-key"):
        assert f"secret set {secret}" in text
    assert "enable --now lmgate@8787 lmgate@8788" in text
    assert "10.0.0.5:8787" in text and "LMGATE_SERVER_TRUSTED_PROXIES" in text


@pytest.mark.parametrize(
    "bad",
    [
        "127.0.0.1",  # no port
        "127.0.0.1:",
        ":8787",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:87a7",
        "127.0.0.1:-1",
        "host name:8787",
        "a;b:8787",
        "evil}:8787",
        "x{:8787",
        "a\nserver b:8787",
        "-leading:8787",
        "[::1:8787",
        "",
    ],
)
def test_a_replica_that_is_not_host_port_is_refused(bad: str) -> None:
    with pytest.raises(InputError) as refused:
        _replicas("127.0.0.1:8787", bad)
    assert refused.value.what == "--replica"


def test_the_same_replica_twice_is_refused() -> None:
    with pytest.raises(InputError) as refused:
        _replicas("127.0.0.1:8787", "127.0.0.1:08787")
    assert "twice" in str(refused.value)


@pytest.mark.parametrize("good", ["127.0.0.1:1", "127.0.0.1:65535", "[::1]:8787", "gate-2:8787"])
def test_host_port_at_the_edges_is_accepted(good: str) -> None:
    assert good.lower() in nginx_site(_replicas("127.0.0.1:9000", good))
