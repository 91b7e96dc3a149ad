"""Which names a request may be addressed to (the ``Host`` header): the defence against DNS
rebinding.

A page on ``attacker.example`` that re-points its name at 127.0.0.1 gets the owner's browser to
talk to LM Gate as if it were that site, so the browser sends ``Host: attacker.example``. LM
Gate answers only requests addressed to a name it is really reachable by: an IP address (a
literal address cannot be re-pointed), ``localhost``, this machine's own host name, the running
tunnel's public host, and the names configured in ``server.allowed_hosts`` (the domain nginx
serves). The port is not compared: tunnels and Docker port mappings change it on the way.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

_CACHE_LIMIT = 1024


def host_name(host: str) -> str:
    """The name part of a Host header, lower-cased: ``[::1]:8787`` → ``::1``."""
    text = host.strip().lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    if text.count(":") == 1:
        text = text.partition(":")[0]
    return text.rstrip(".")


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _machine_names() -> frozenset[str]:
    name = socket.gethostname().lower().rstrip(".")
    if not name:
        return frozenset()
    short = name.partition(".")[0]
    return frozenset({name, short, f"{short}.local"})


class HostPolicy:
    def __init__(self, configured: Iterable[str] = ()) -> None:
        self._fixed = frozenset(
            {"localhost", *_machine_names(), *(host_name(h) for h in configured)}
        )
        self._public: str | None = None
        self._decided: dict[str, bool] = {}

    def set_public_host(self, name: str | None) -> None:
        """The running tunnel's public host name (None when no tunnel runs)."""
        self._public = host_name(name) if name else None
        self._decided.clear()

    def allows(self, host: str | None) -> bool:
        if not host:
            return True  # HTTP/1.0 without Host: no browser sends that
        decided = self._decided.get(host)
        if decided is None:
            name = host_name(host)
            decided = name in self._fixed or name == self._public or is_ip_literal(name)
            if len(self._decided) >= _CACHE_LIMIT:
                self._decided.clear()
            self._decided[host] = decided
        return decided
