"""Whether a new client connection may open: a bound in total and one per client address.

The total keeps the process below its descriptor limit (see
:mod:`tray_app.gateway.server.descriptors`); the
per-address bound keeps one client from taking all of it. The address is the direct peer's:
forwarding headers are not read yet when a connection opens, and a peer the gateway trusts as
its proxy (the running tunnel's agent, configured proxies) carries everyone's connections, so
only the total applies to it. IPv6 peers count per /64, the block one subscriber usually holds.

A refused connection is answered with a short 503 in the API's error shape and closed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tray_app.gateway import api_errors as errors
from tray_app.gateway.limits import address_group
from tray_app.gateway.server.exhaustion_log import RateLimitedLog
from tray_app.gateway.server.raw_errors import raw_error_response

RETRY_AFTER_SECONDS = 5
TOTAL_SETTING = "server.max_connections"
PER_CLIENT_SETTING = "server.max_connections_per_client"


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted connection; ``key`` is None when no per-address bound counts it."""

    key: str | None


def refusal_response(*, from_one_address: bool) -> bytes:
    return raw_error_response(errors.too_many_connections(from_one_address, RETRY_AFTER_SECONDS))


class ConnectionGuard:
    def __init__(
        self,
        *,
        max_total: int,
        max_per_client: int,
        trusts_peer: Callable[[str], bool],
        exhaustion: RateLimitedLog,
    ) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self._trusts_peer = trusts_peer
        self._exhaustion = exhaustion
        self.open_total = 0
        self._per_client: dict[str, int] = {}

    def admit(self, peer_ip: str | None) -> Ticket | bytes:
        """A ticket to hold while the connection is open, or the bytes that refuse it."""
        if self.open_total >= self.max_total:
            self._exhaustion.note(
                "refused",
                "refused a connection: %d client connections are open (%s)",
                self.open_total,
                TOTAL_SETTING,
            )
            return refusal_response(from_one_address=False)
        key = None
        if peer_ip is not None and not self._trusts_peer(peer_ip):
            key = address_group(peer_ip)
            count = self._per_client.get(key, 0)
            if count >= self.max_per_client:
                self._exhaustion.note(
                    "refused",
                    "refused a connection from %s: %d connections from there are open (%s)",
                    key,
                    count,
                    PER_CLIENT_SETTING,
                )
                return refusal_response(from_one_address=True)
            self._per_client[key] = count + 1
        self.open_total += 1
        return Ticket(key)

    def release(self, ticket: Ticket) -> None:
        self.open_total -= 1
        if ticket.key is not None:
            left = self._per_client[ticket.key] - 1
            if left:
                self._per_client[ticket.key] = left
            else:
                del self._per_client[ticket.key]
