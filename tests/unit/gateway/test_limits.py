"""Limits per client address and per principal, on their own: addresses that are not addresses,
forwarding chains made only of our own proxies, and buckets pruned without forgiving anyone."""

from __future__ import annotations

from tests.fakes import FakeClock
from tray_app.gateway.limits import (
    LOOPBACK_NETWORKS,
    TokenBuckets,
    address_group,
    client_address,
    parse_networks,
)

PROXIES = parse_networks(["10.0.0.0/8", "127.0.0.1/32"])


def test_an_address_group_of_something_that_is_no_address_is_itself() -> None:
    # A peer that is not an IP (a Unix socket, "unknown") is counted as itself, not merged.
    assert address_group("unknown") == "unknown"
    assert address_group("/run/lmgate.sock") == "/run/lmgate.sock"
    assert address_group("203.0.113.9") == "203.0.113.9"
    assert address_group("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"


def test_a_peer_that_is_no_address_is_never_replaced_by_a_header() -> None:
    header = {"X-Forwarded-For": "198.51.100.7"}
    assert client_address(None, header, PROXIES) == "unknown"
    assert client_address("", header, PROXIES) == "unknown"
    assert client_address("not-an-ip", header, PROXIES) == "not-an-ip"


def test_a_chain_of_only_our_own_proxies_is_the_direct_peer() -> None:
    # Every hop is a trusted proxy: there is no client address in the chain to believe.
    chain = {"X-Forwarded-For": "10.1.1.1, 10.2.2.2"}
    assert client_address("10.9.9.9", chain, PROXIES) == "10.9.9.9"
    # One untrusted hop, and it is the client; garbage in the chain is not guessed at.
    assert client_address("10.9.9.9", {"X-Forwarded-For": "1.2.3.4, 10.2.2.2"}, PROXIES) == (
        "1.2.3.4"
    )
    assert client_address("10.9.9.9", {"X-Forwarded-For": "bogus, 10.2.2.2"}, PROXIES) == (
        "10.9.9.9"
    )
    assert client_address("127.0.0.1", {"X-Forwarded-For": "1.2.3.4"}, LOOPBACK_NETWORKS) == (
        "1.2.3.4"
    )


def test_pruning_many_buckets_forgives_no_one() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(per_minute=1, clock=clock)
    assert buckets.take("guesser") is None
    assert buckets.take("guesser") is not None  # empty now
    # Enough other clients, each only looked at (a full bucket), to make the buckets be
    # pruned: the full ones go, the empty one stays.
    for i in range(10_500):
        assert buckets.empty(f"client-{i}") is None
    assert buckets.take("guesser") is not None, "pruning refilled a bucket"
    clock.advance(60)
    assert buckets.take("guesser") is None
