"""Limits per client address and per principal, on their own: addresses that are not addresses,
forwarding chains made only of our own proxies, and buckets pruned without forgiving anyone."""

from __future__ import annotations

import ipaddress
import math

import pytest
from multidict import CIMultiDict

from tests.fakes import FakeClock
from tray_app.gateway.limits import (
    LOOPBACK_NETWORKS,
    ConcurrencyLimit,
    TokenBuckets,
    address_group,
    client_address,
    is_trusted_peer,
    parse_networks,
    retry_after_header,
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


class TestParseNetworks:
    def test_blank_entries_are_skipped_and_host_bits_allowed(self) -> None:
        # A configured proxy written as its own address with a prefix ("10.1.2.3/8") is the
        # network it lies in, not an error; blank and padded entries come from a list setting.
        assert parse_networks([" 10.1.2.3/8 ", "", "   ", "2001:db8::1/64", "192.0.2.7"]) == (
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("2001:db8::/64"),
            ipaddress.ip_network("192.0.2.7/32"),
        )

    def test_nothing_configured_is_no_network(self) -> None:
        assert parse_networks([]) == ()
        assert parse_networks(["", " "]) == ()

    def test_loopback_is_all_of_127_and_only_one_ipv6_address(self) -> None:
        assert is_trusted_peer("127.0.0.1", LOOPBACK_NETWORKS)
        assert is_trusted_peer("127.200.3.4", LOOPBACK_NETWORKS)
        assert is_trusted_peer("::1", LOOPBACK_NETWORKS)
        assert not is_trusted_peer("128.0.0.1", LOOPBACK_NETWORKS)
        assert not is_trusted_peer("::2", LOOPBACK_NETWORKS)


class TestAddressGroup:
    @pytest.mark.parametrize(
        ("address", "group"),
        [
            ("198.51.100.7", "198.51.100.7"),
            ("::ffff:198.51.100.7", "198.51.100.7"),
            ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
            ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
            ("fe80::1%eth0", "fe80::/64"),
            ("fe80::1%eth0%x", "fe80::/64"),
        ],
    )
    def test_an_ipv4_address_alone_and_an_ipv6_address_by_its_64(
        self, address: str, group: str
    ) -> None:
        assert address_group(address) == group

    def test_the_next_64_is_another_group(self) -> None:
        assert address_group("2001:db8:1:2::1") != address_group("2001:db8:1:3::1")


class TestClientAddress:
    @pytest.mark.parametrize("header", ["X-Forwarded-For", "x-forwarded-for"])
    def test_the_default_header_is_x_forwarded_for(self, header: str) -> None:
        headers = CIMultiDict({header: "203.0.113.5"})
        assert client_address("10.0.0.1", headers, PROXIES) == "203.0.113.5"

    def test_another_header_is_read_only_when_named(self) -> None:
        headers = CIMultiDict({"CF-Connecting-IP": "203.0.113.5"})
        assert client_address("10.0.0.1", headers, PROXIES) == "10.0.0.1"
        assert client_address("10.0.0.1", headers, PROXIES, "CF-Connecting-IP") == "203.0.113.5"

    @pytest.mark.parametrize("peer", ["192.0.2.1", "::ffff:192.0.2.1", " 192.0.2.1 "])
    def test_an_untrusted_peer_is_the_client_whatever_it_claims(self, peer: str) -> None:
        headers = {"X-Forwarded-For": "203.0.113.5"}
        assert client_address(peer, headers, PROXIES) == "192.0.2.1"

    @pytest.mark.parametrize("forwarded", [None, ""])
    def test_a_trusted_peer_without_the_header_is_the_client(self, forwarded: str | None) -> None:
        headers = {} if forwarded is None else {"X-Forwarded-For": forwarded}
        assert client_address("10.0.0.1", headers, PROXIES) == "10.0.0.1"

    @pytest.mark.parametrize(
        ("chain", "client"),
        [
            # What the client wrote comes first; our proxies append to the right.
            ("6.6.6.6, 203.0.113.5", "203.0.113.5"),
            ("6.6.6.6,203.0.113.5,10.2.2.2", "203.0.113.5"),
            ("bogus, 203.0.113.5, 10.2.2.2", "203.0.113.5"),
            ("::ffff:203.0.113.5", "203.0.113.5"),
            ("[2001:db8::5], 10.2.2.2", "2001:db8::5"),
        ],
    )
    def test_the_rightmost_hop_that_is_not_our_proxy(self, chain: str, client: str) -> None:
        assert client_address("10.0.0.1", {"X-Forwarded-For": chain}, PROXIES) == client

    def test_a_trusted_peer_is_canonical(self) -> None:
        assert client_address("::ffff:10.0.0.1", {}, PROXIES) == "10.0.0.1"


class TestTokenBuckets:
    def test_a_full_bucket_then_one_token_per_sixtieth_of_a_minute_rate(self) -> None:
        clock = FakeClock()
        buckets = TokenBuckets(per_minute=6, clock=clock)
        for _ in range(6):
            assert buckets.take("k") is None
        # Empty: the next token is 10 s away, and looking does not spend it.
        assert buckets.take("k") == pytest.approx(10.0)
        assert buckets.empty("k") == pytest.approx(10.0)
        clock.advance(4)
        assert buckets.take("k") == pytest.approx(6.0)
        assert buckets.empty("k") == pytest.approx(6.0)
        clock.advance(6)
        assert buckets.empty("k") is None
        assert buckets.take("k") is None
        assert buckets.take("k") == pytest.approx(10.0)

    def test_keys_have_their_own_buckets(self) -> None:
        buckets = TokenBuckets(per_minute=1, clock=FakeClock())
        assert buckets.take("a") is None
        assert buckets.take("a") is not None
        assert buckets.take("b") is None

    def test_a_bucket_refills_to_its_capacity_and_no_further(self) -> None:
        clock = FakeClock()
        buckets = TokenBuckets(per_minute=60, clock=clock, capacity=2)
        assert buckets.take("k") is None
        assert buckets.take("k") is None
        assert buckets.take("k") == pytest.approx(1.0)
        clock.advance(3600)
        assert buckets.take("k") is None
        assert buckets.take("k") is None
        assert buckets.take("k") == pytest.approx(1.0)

    def test_looking_at_a_bucket_spends_nothing(self) -> None:
        buckets = TokenBuckets(per_minute=2, clock=FakeClock())
        for _ in range(5):
            assert buckets.empty("k") is None
        assert buckets.take("k") is None
        assert buckets.take("k") is None
        assert buckets.take("k") is not None

    def test_a_part_token_is_not_a_token(self) -> None:
        clock = FakeClock()
        buckets = TokenBuckets(per_minute=60, clock=clock, capacity=1)
        assert buckets.take("k") is None
        clock.advance(0.5)
        assert buckets.empty("k") == pytest.approx(0.5)
        assert buckets.take("k") == pytest.approx(0.5)
        clock.advance(0.5)
        assert buckets.take("k") is None

    def test_a_rate_of_zero_never_refills(self) -> None:
        clock = FakeClock()
        buckets = TokenBuckets(per_minute=0, clock=clock, capacity=1)
        assert buckets.take("k") is None
        clock.advance(3600)
        assert buckets.take("k") == math.inf
        assert buckets.empty("k") == math.inf
        assert TokenBuckets(per_minute=0, clock=clock).take("k") == math.inf

    def test_pruning_drops_exactly_the_full_buckets(self) -> None:
        # Memory per client address must stay bounded under a flood of new addresses.
        clock = FakeClock()
        buckets = TokenBuckets(per_minute=30, clock=clock, capacity=2)
        assert buckets.take("half") is None
        assert buckets.take("empty") is None
        assert buckets.take("empty") is None
        for i in range(5_000):
            assert buckets.empty(f"old-{i}") is None
        clock.advance(1)
        # Full as well: looked at only now, so they have had no time to refill.
        for i in range(4_997):
            assert buckets.empty(f"new-{i}") is None
        assert len(buckets._buckets) == 9_999
        assert buckets.empty("one-more") is None  # 9 999 buckets: no pruning yet
        assert len(buckets._buckets) == 10_000
        assert buckets.empty("the-last-straw") is None
        # The two still refilling stay, owing what they owed; the new one is added.
        assert sorted(buckets._buckets) == ["empty", "half", "the-last-straw"]
        assert buckets.take("empty") == pytest.approx(1.0)
        assert buckets.take("half") is None
        assert buckets.take("half") == pytest.approx(1.0)


class TestConcurrencyLimit:
    def test_up_to_the_limit_per_key(self) -> None:
        limit = ConcurrencyLimit(2)
        assert limit.acquire("a")
        assert limit.acquire("a")
        assert not limit.acquire("a")
        assert limit.acquire("b")
        limit.release("a")
        assert limit.acquire("a")
        assert not limit.acquire("a")

    def test_releasing_all_frees_the_key_entirely(self) -> None:
        limit = ConcurrencyLimit(1)
        for _ in range(3):
            assert limit.acquire("a")
            assert not limit.acquire("a")
            limit.release("a")
            # Nothing is kept for a key with nothing running...
            assert limit._running == {}
        # ...nor for one released too often, or never acquired.
        limit.release("a")
        limit.release("never-acquired")
        assert limit._running == {}
        assert limit.acquire("a")
        assert not limit.acquire("a")

    def test_a_limit_of_zero_admits_no_one(self) -> None:
        assert not ConcurrencyLimit(0).acquire("a")


@pytest.mark.parametrize(
    ("seconds", "header"),
    [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.01, "2"), (59.5, "60"), (math.inf, None)],
)
def test_retry_after_is_whole_seconds_at_least_one(seconds: float, header: str | None) -> None:
    if header is None:
        with pytest.raises(OverflowError):
            retry_after_header(seconds)
        return
    assert retry_after_header(seconds) == {"Retry-After": header}
