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
    ConcurrencyLimit,
    TokenBuckets,
    address_group,
    client_address,
    is_trusted_peer,
    parse_networks,
)


class Protections:
    def __init__(self, config: Config, clock: Clock) -> None:
        self.cors = CorsPolicy(config.cors_allowed_origins)
        self.hosts = HostPolicy(config.server_allowed_hosts)
        self._trusted = parse_networks(config.server_trusted_proxies)
        self._tunnel_trusted = self._trusted + LOOPBACK_NETWORKS
        self._tunnel_header: str | None = None
        self._auth_failures = TokenBuckets(config.limits_auth_failures_per_minute, clock)
        self._pairing_failures = TokenBuckets(config.limits_pairing_attempts_per_minute, clock)
        self._requests = TokenBuckets(config.limits_requests_per_minute, clock)
        self._concurrency = ConcurrencyLimit(config.limits_concurrent_requests)
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

    def check_auth_allowed(self, client: str) -> None:
        wait = self._auth_failures.empty(address_group(client))
        if wait is not None:
            raise errors.too_many_auth_failures(wait)

    def auth_failed(self, client: str) -> None:
        self._auth_failures.take(address_group(client))

    def check_pairing_allowed(self, client: str) -> None:
        wait = self._pairing_failures.empty(address_group(client))
        if wait is not None:
            raise errors.too_many_pairing_attempts(wait)

    def pairing_failed(self, client: str) -> None:
        self._pairing_failures.take(address_group(client))

    # ---- limits per principal -------------------------------------------------------------

    def take_request(self, principal: str) -> None:
        wait = self._requests.take(principal)
        if wait is not None:
            raise errors.rate_limit_exceeded(wait)

    def enter(self, principal: str) -> None:
        if not self._concurrency.acquire(principal):
            raise errors.too_many_concurrent_requests(self._concurrent_limit)

    def leave(self, principal: str) -> None:
        self._concurrency.release(principal)
