"""Per-request protections, in the order the gateway applies them: the Host name, CORS, the
client's address, the failed-authentication throttle, the rate limit and the concurrency limit.

Forwarding headers are believed only from a trusted proxy: one configured in
``server.trusted_proxies`` (nginx), or — only while a tunnel runs — its agent, which dials in
from loopback and sets the provider's own header. Loopback alone is never a reason to trust.
"""

from __future__ import annotations

from collections.abc import Mapping

from tray_app.addresses import is_loopback
from tray_app.clock import Clock
from tray_app.config.settings import Config
from tray_app.gateway import api_errors as errors
from tray_app.gateway.cors import CorsPolicy
from tray_app.gateway.hosts import HostPolicy
from tray_app.gateway.limits import (
    LOOPBACK_NETWORKS,
    Bucket,
    Limits,
    LocalLimits,
    address_group,
    client_address,
    is_trusted_peer,
    parse_networks,
)


class Protections:
    """``limits`` is where the counts live: this process's (the default) or shared ones
    (:class:`tray_app.gateway.shared_limits.SharedLimits`, for several replicas)."""

    def __init__(self, config: Config, clock: Clock, limits: Limits | None = None) -> None:
        self.cors = CorsPolicy(config.cors_allowed_origins)
        self.hosts = HostPolicy(config.server_allowed_hosts)
        self._trusted = parse_networks(config.server_trusted_proxies)
        self._tunnel_trusted = self._trusted + LOOPBACK_NETWORKS
        self._tunnel_header: str | None = None
        self._limits: Limits = limits if limits is not None else LocalLimits(config, clock)
        self._concurrent_limit = config.limits_concurrent_requests

    def client(self, peer: str | None, headers: Mapping[str, str]) -> str:
        if self._tunnel_header is not None and is_loopback(peer):
            return client_address(peer, headers, self._tunnel_trusted, self._tunnel_header)
        return client_address(peer, headers, self._trusted)

    def trust_tunnel(self, header: str | None) -> None:
        """While a tunnel runs, its agent (on loopback) says who the client is in ``header``;
        None when no tunnel runs, or its provider has no agent (LAN)."""
        self._tunnel_header = header

    def trusts_peer(self, peer: str | None) -> bool:
        """Whether ``peer`` is a proxy whose connections carry many clients."""
        if self._tunnel_header is not None and is_loopback(peer):
            return True
        return is_trusted_peer(peer, self._trusted)

    def check_origin(self, origin: str | None, host: str | None) -> dict[str, str] | None:
        """CORS headers for the answer, None without Origin; ApiError for a foreign origin."""
        if origin is None:
            return None
        if not self.cors.allows(origin, host):
            raise errors.origin_not_allowed()
        return CorsPolicy.response_headers(origin)

    # ---- throttles for guessing -----------------------------------------------------------

    # A failure is counted and checked in one step (one round trip to a shared store): it is
    # refused when the address had no failure left, so the limit is exact across replicas.

    async def auth_failed(self, client: str) -> None:
        """Count a failed authentication from ``client``; ApiError (429) once its address
        group has used up its failures."""
        wait = await self._limits.take(Bucket.AUTH_FAILURES, address_group(client))
        if wait is not None:
            raise errors.too_many_auth_failures(wait)

    async def pairing_failed(self, client: str) -> None:
        """Count a failed pairing attempt, like :meth:`auth_failed`, in a bucket of its own."""
        wait = await self._limits.take(Bucket.PAIRING_ATTEMPTS, address_group(client))
        if wait is not None:
            raise errors.too_many_pairing_attempts(wait)

    # ---- limits per principal -------------------------------------------------------------

    async def take_request(self, principal: str) -> None:
        wait = await self._limits.take(Bucket.REQUESTS, principal)
        if wait is not None:
            raise errors.rate_limit_exceeded(wait)

    async def enter(self, principal: str) -> str:
        """A place among the principal's concurrent requests: the lease :meth:`leave` takes."""
        lease = await self._limits.acquire(principal)
        if lease is None:
            raise errors.too_many_concurrent_requests(self._concurrent_limit)
        return lease

    def leave(self, principal: str, lease: str) -> None:
        self._limits.release(principal, lease)
