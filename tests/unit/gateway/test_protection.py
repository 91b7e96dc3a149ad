"""The per-request protections on their own: whose forwarding header is believed (a configured
proxy always, the tunnel's agent on loopback only while a tunnel runs), which throttle counts
what, and the exact 429/403 each one answers with.

Every throttle is crossed with every way to fill it, and every peer kind with every tunnel
state, so a protection that counts the wrong key, shares a bucket with another, or trusts a
peer it should not, fails here and not only in the slow end-to-end tests.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from tests.fakes import FakeClock
from tray_app.config.settings import Config
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.protection import Protections

PROXY = "10.0.0.0/8"
TUNNEL_HEADER = "CF-Connecting-IP"
CLIENT = "203.0.113.9"


def make(**settings: object) -> tuple[Protections, FakeClock]:
    clock = FakeClock()
    values: dict[str, object] = {
        "server_trusted_proxies": (PROXY,),
        "limits_auth_failures_per_minute": 3,
        "limits_pairing_attempts_per_minute": 2,
        "limits_requests_per_minute": 4,
        "limits_concurrent_requests": 2,
    }
    values.update(settings)
    return Protections(Config(**values), clock), clock  # type: ignore[arg-type]


def assert_too_many(err: ApiError, code: str, retry_after: str) -> None:
    assert err.status == 429
    assert err.code == code
    assert err.param is None
    assert err.type == "rate_limit_error"
    assert err.headers == {"Retry-After": retry_after}


# ---- who the client is --------------------------------------------------------------------


# (peer, headers, without a tunnel, while the tunnel trusts TUNNEL_HEADER)
CLIENT_CASES = [
    # Loopback alone is no reason to trust: without a tunnel its headers are ignored.
    ("127.0.0.1", {"X-Forwarded-For": CLIENT}, "127.0.0.1", "127.0.0.1"),
    ("127.0.0.1", {TUNNEL_HEADER: CLIENT}, "127.0.0.1", CLIENT),
    ("::1", {TUNNEL_HEADER: CLIENT}, "::1", CLIENT),
    ("::ffff:127.0.0.1", {TUNNEL_HEADER: CLIENT}, "127.0.0.1", CLIENT),
    # The tunnel's agent writes its own header; the X-Forwarded-For a client sent is not it.
    (
        "127.0.0.1",
        {"X-Forwarded-For": CLIENT, TUNNEL_HEADER: "198.51.100.1"},
        "127.0.0.1",
        "198.51.100.1",
    ),
    # A chain the agent relays through a configured proxy: the proxy hop is skipped.
    ("127.0.0.1", {TUNNEL_HEADER: f"{CLIENT}, 10.0.0.5"}, "127.0.0.1", CLIENT),
    ("127.0.0.1", {TUNNEL_HEADER: f"{CLIENT}, 127.0.0.9"}, "127.0.0.1", CLIENT),
    # A configured proxy is believed with or without a tunnel, and only in X-Forwarded-For.
    ("10.1.2.3", {"X-Forwarded-For": CLIENT}, CLIENT, CLIENT),
    ("10.1.2.3", {TUNNEL_HEADER: CLIENT}, "10.1.2.3", "10.1.2.3"),
    # Anyone else is who they are, whatever they claim.
    (
        "198.51.100.7",
        {"X-Forwarded-For": CLIENT, TUNNEL_HEADER: CLIENT},
        "198.51.100.7",
        "198.51.100.7",
    ),
    (None, {TUNNEL_HEADER: CLIENT, "X-Forwarded-For": CLIENT}, "unknown", "unknown"),
]


@pytest.mark.parametrize(("peer", "headers", "plain", "tunnelled"), CLIENT_CASES)
def test_the_client_address_believes_only_trusted_peers(
    peer: str | None, headers: dict[str, str], plain: str, tunnelled: str
) -> None:
    protections, _ = make()
    assert protections.client(peer, headers) == plain
    protections.trust_tunnel(TUNNEL_HEADER)
    assert protections.client(peer, headers) == tunnelled
    protections.trust_tunnel(None)  # the tunnel stopped: its agent is nobody special again
    assert protections.client(peer, headers) == plain


# (peer, without a tunnel, while a tunnel runs)
TRUST_CASES = [
    ("127.0.0.1", False, True),
    ("::1", False, True),
    ("127.8.9.10", False, True),
    ("10.1.2.3", True, True),
    ("198.51.100.7", False, False),
    ("11.0.0.1", False, False),
    (None, False, False),
    ("not-an-ip", False, False),
]


@pytest.mark.parametrize(("peer", "plain", "tunnelled"), TRUST_CASES)
def test_a_peer_carries_many_clients_only_when_it_is_a_trusted_proxy(
    peer: str | None, plain: bool, tunnelled: bool
) -> None:
    protections, _ = make()
    assert protections.trusts_peer(peer) is plain
    protections.trust_tunnel(TUNNEL_HEADER)
    assert protections.trusts_peer(peer) is tunnelled
    protections.trust_tunnel(None)
    assert protections.trusts_peer(peer) is plain


def test_without_configured_proxies_no_forwarding_header_is_believed() -> None:
    protections, _ = make(server_trusted_proxies=())
    assert protections.client("10.1.2.3", {"X-Forwarded-For": CLIENT}) == "10.1.2.3"
    assert not protections.trusts_peer("10.1.2.3")


# ---- origins and hosts --------------------------------------------------------------------


def test_no_origin_needs_no_cors_headers() -> None:
    protections, _ = make()
    assert protections.check_origin(None, "lmgate.box") is None


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("https://app.example.com", "lmgate.box"),
        ("https://app.example.com", None),
        ("https://lmgate.box", "lmgate.box"),  # the gateway's own page
    ],
)
def test_an_allowed_origin_gets_cors_headers_naming_it(origin: str, host: str | None) -> None:
    protections, _ = make(cors_allowed_origins=("https://app.example.com",))
    headers = protections.check_origin(origin, host)
    assert headers is not None
    assert headers["Access-Control-Allow-Origin"] == origin
    assert headers["Vary"] == "Origin"


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("https://evil.example", "lmgate.box"),
        ("https://evil.example", None),
        ("https://lmgate.box", "other.box"),
    ],
)
def test_a_foreign_origin_is_refused(origin: str, host: str | None) -> None:
    protections, _ = make(cors_allowed_origins=("https://app.example.com",))
    with pytest.raises(ApiError) as caught:
        protections.check_origin(origin, host)
    assert caught.value.status == 403
    assert caught.value.code == "origin_not_allowed"
    assert caught.value.param is None


def test_the_host_policy_holds_the_configured_hosts() -> None:
    protections, _ = make(server_allowed_hosts=("gate.example.com",))
    assert protections.hosts.allows("gate.example.com")
    assert protections.hosts.allows("gate.example.com:8443")
    assert not protections.hosts.allows("evil.example")


# ---- throttles for guessing ---------------------------------------------------------------


# name: (record a failure, its limit, its error code, its Retry-After once full)
Throttle = tuple[Callable[[Protections, str], Awaitable[None]], int, str, str]
THROTTLES: dict[str, Throttle] = {
    "auth": (
        Protections.auth_failed,
        3,
        "too_many_auth_failures",
        "20",  # 1 token at 3/min
    ),
    "pairing": (
        Protections.pairing_failed,
        2,
        "too_many_pairing_attempts",
        "30",  # 1 token at 2/min
    ),
}
OTHER = {"auth": "pairing", "pairing": "auth"}


@pytest.mark.parametrize("name", THROTTLES)
async def test_failures_up_to_the_limit_are_allowed_then_refused_with_retry_after(
    name: str,
) -> None:
    failed, limit, code, retry_after = THROTTLES[name]
    protections, clock = make()
    for _ in range(limit):
        await failed(protections, CLIENT)
    with pytest.raises(ApiError) as caught:
        await failed(protections, CLIENT)
    assert_too_many(caught.value, code, retry_after)
    # A refused failure spent nothing: one token back after Retry-After, and only one.
    clock.advance(int(retry_after))
    await failed(protections, CLIENT)
    with pytest.raises(ApiError):
        await failed(protections, CLIENT)


@pytest.mark.parametrize("name", THROTTLES)
async def test_a_throttle_counts_per_address_group_and_apart_from_the_other(name: str) -> None:
    failed, limit, _, _ = THROTTLES[name]
    other_failed = THROTTLES[OTHER[name]][0]
    protections, _ = make()
    for _ in range(limit):
        await failed(protections, "2001:db8:1:2::1")
    # Rotating inside the IPv6 /64 gains nothing ...
    with pytest.raises(ApiError):
        await failed(protections, "2001:db8:1:2:ffff::9")
    # ... but another /64, another address, and the other throttle are untouched.
    await failed(protections, "2001:db8:1:3::1")
    await failed(protections, CLIENT)
    await other_failed(protections, "2001:db8:1:2::1")
    # Nor do requests per principal share these buckets.
    await protections.take_request("2001:db8:1:2::1")


# ---- limits per principal -----------------------------------------------------------------


async def test_requests_per_minute_are_counted_per_principal() -> None:
    protections, clock = make()
    for _ in range(4):
        await protections.take_request("key:alice")
    with pytest.raises(ApiError) as caught:
        await protections.take_request("key:alice")
    assert_too_many(caught.value, "rate_limit_exceeded", "15")  # 1 token at 4/min
    await protections.take_request("key:bob")
    # Requests do not fill the guessing throttles of an address named like the principal.
    await protections.auth_failed("key:alice")
    await protections.pairing_failed("key:alice")
    clock.advance(15)
    await protections.take_request("key:alice")


async def test_concurrent_requests_are_capped_per_principal_and_released() -> None:
    protections, _ = make()
    first = await protections.enter("key:alice")
    await protections.enter("key:alice")
    with pytest.raises(ApiError) as caught:
        await protections.enter("key:alice")
    assert_too_many(caught.value, "too_many_concurrent_requests", "1")
    assert "at most 2 " in caught.value.message
    await protections.enter("key:bob")
    protections.leave("key:alice", first)
    await protections.enter("key:alice")
    with pytest.raises(ApiError):
        await protections.enter("key:alice")


@pytest.mark.parametrize("limit", [1, 3])
async def test_the_concurrency_cap_is_the_configured_one(limit: int) -> None:
    protections, _ = make(limits_concurrent_requests=limit)
    for _ in range(limit):
        await protections.enter("key:alice")
    with pytest.raises(ApiError) as caught:
        await protections.enter("key:alice")
    assert f"at most {limit} " in caught.value.message
