"""Rate and concurrency limits, and who the client really is.

Per principal: a token bucket for requests per minute and a cap on concurrent requests.
Per client address: a bucket for failed authentications (and a stricter one for pairing), so
guessing keys or codes is slow. The client address is taken from a forwarding header only when
the direct peer is a trusted proxy: a configured one (nginx), or the running tunnel's agent.

Where the counts live is a part (:class:`Limits`): this process (:class:`LocalLimits`, the
default) or Redis, shared by replicas (``tray_app.gateway.shared_limits``).
"""

from __future__ import annotations

import functools
import ipaddress
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from tray_app.addresses import parse_ip
from tray_app.clock import Clock
from tray_app.config.settings import Config

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


class Bucket(StrEnum):
    """The token buckets, each counted by its own key: a principal, or an address group."""

    REQUESTS = "requests"
    AUTH_FAILURES = "auth"
    PAIRING_ATTEMPTS = "pairing"


def bucket_rates(config: Config) -> dict[Bucket, float]:
    """Each bucket's tokens per minute (and so its capacity: a minute's worth)."""
    return {
        Bucket.REQUESTS: config.limits_requests_per_minute,
        Bucket.AUTH_FAILURES: config.limits_auth_failures_per_minute,
        Bucket.PAIRING_ATTEMPTS: config.limits_pairing_attempts_per_minute,
    }


class Limits(Protocol):
    """Where the counts behind the limits live. Async, because a shared store is a network
    away; this process's own never suspends, so it costs no more than a call."""

    async def take(self, bucket: Bucket, key: str) -> float | None:
        """Spend one of ``key``'s tokens: None if it had one, else seconds until it will."""
        ...

    async def acquire(self, principal: str) -> str | None:
        """A place among ``principal``'s concurrent requests: a lease to hand back to
        :meth:`release`, or None at the cap."""
        ...

    def release(self, principal: str, lease: str) -> None:
        """Give a place back. Synchronous: it runs in ``finally`` clauses, also on a
        cancelled request, where waiting on anything could be cut short."""
        ...


class LocalLimits:
    """The counts in this process: one replica's own, exact for it alone."""

    def __init__(self, config: Config, clock: Clock) -> None:
        self._buckets = {b: TokenBuckets(rate, clock) for b, rate in bucket_rates(config).items()}
        self._concurrency = ConcurrencyLimit(config.limits_concurrent_requests)

    async def take(self, bucket: Bucket, key: str) -> float | None:
        return self._buckets[bucket].take(key)

    async def acquire(self, principal: str) -> str | None:
        # One count per principal is the whole state: the lease names nothing more.
        return "" if self._concurrency.acquire(principal) else None

    def release(self, principal: str, lease: str) -> None:
        self._concurrency.release(principal)


def retry_after_header(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}
