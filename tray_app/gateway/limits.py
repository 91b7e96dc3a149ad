"""Rate and concurrency limits, and who the client really is.

Per principal: a token bucket for requests per minute and a cap on concurrent requests.
Per client address: a bucket for failed authentications (and a stricter one for pairing), so
guessing keys or codes is slow. The client address is taken from a forwarding header only when
the direct peer is a trusted proxy: a configured one (nginx), or the running tunnel's agent.
"""

from __future__ import annotations

import functools
import ipaddress
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tray_app.addresses import parse_ip
from tray_app.clock import Clock

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_PRUNE_AT = 10_000


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values if v.strip())


@functools.lru_cache(maxsize=1024)
def address_group(address: str) -> str:
    """What limits per client address count by: an IPv4 address, or an IPv6 /64 (the block
    one subscriber usually holds, so rotating within it gains nothing)."""
    parsed = parse_ip(address.split("%", 1)[0])
    if parsed is None:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


LOOPBACK_NETWORKS: tuple[IPNetwork, ...] = parse_networks(("127.0.0.0/8", "::1/128"))


def client_address(
    peer: str | None,
    headers: Mapping[str, str],
    trusted: tuple[IPNetwork, ...],
    header: str = "X-Forwarded-For",
) -> str:
    """The address a request came from, trusting ``header`` only from trusted peers.

    Walks the header's comma-separated hops from the right and returns the first that is not
    itself a trusted proxy: a client can prepend anything, but not what our proxies appended.
    (A single-address header such as CF-Connecting-IP is the one-hop case.)
    """
    direct, direct_trusted = _peer(peer, trusted)
    if direct is None:
        return peer or "unknown"
    if not direct_trusted:
        return direct
    forwarded = headers.get(header)
    if not forwarded:
        return direct
    for hop in reversed(forwarded.split(",")):
        address, hop_trusted = _peer(hop, trusted)
        if address is None:
            return direct  # garbage in the chain: do not guess
        if not hop_trusted:
            return address
    return direct


def is_trusted_peer(peer: str | None, trusted: tuple[IPNetwork, ...]) -> bool:
    return _peer(peer, trusted)[1]


@functools.lru_cache(maxsize=1024)
def _peer(text: str | None, trusted: tuple[IPNetwork, ...]) -> tuple[str | None, bool]:
    """An address in canonical form (None if it is not one) and whether it is a trusted
    proxy. Cached like :func:`_ip`: the same few peers ask on every request."""
    address = parse_ip(text)
    if address is None:
        return None, False
    return str(address), any(address in net for net in trusted)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """One token bucket per key: ``capacity`` tokens, refilled at ``per_minute`` per minute."""

    def __init__(self, per_minute: float, clock: Clock, capacity: float | None = None) -> None:
        self._rate = per_minute / 60.0
        self._capacity = capacity if capacity is not None else per_minute
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def _bucket(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= _PRUNE_AT:
                self._prune(now)
            bucket = self._buckets[key] = _Bucket(self._capacity, now)
        else:
            bucket.tokens = min(self._capacity, bucket.tokens + (now - bucket.updated) * self._rate)
            bucket.updated = now
        return bucket

    def take(self, key: str) -> float | None:
        """Spend one token: None if allowed, else seconds until one is available."""
        now = self._clock.monotonic()
        bucket = self._bucket(key, now)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return (1.0 - bucket.tokens) / self._rate if self._rate > 0 else math.inf

    def empty(self, key: str) -> float | None:
        """Like :meth:`take` but without spending: is the key currently blocked?"""
        now = self._clock.monotonic()
        bucket = self._bucket(key, now)
        if bucket.tokens >= 1.0:
            return None
        return (1.0 - bucket.tokens) / self._rate if self._rate > 0 else math.inf

    def _prune(self, now: float) -> None:
        # A full bucket is the same as no bucket: drop those.
        self._buckets = {
            k: b
            for k, b in self._buckets.items()
            if b.tokens + (now - b.updated) * self._rate < self._capacity
        }


class ConcurrencyLimit:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._running: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        running = self._running.get(key, 0)
        if running >= self._limit:
            return False
        self._running[key] = running + 1
        return True

    def release(self, key: str) -> None:
        running = self._running.get(key, 0) - 1
        if running <= 0:
            self._running.pop(key, None)
        else:
            self._running[key] = running


def retry_after_header(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}
