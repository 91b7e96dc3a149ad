"""What an address or a host name says about where it points: parsing shared by the gateway's
client-address rules and the identity layer's dev mode."""

from __future__ import annotations

import functools
import ipaddress
import re

_PORT = re.compile(r"^:[0-9]{1,5}$")


# Cached: every request parses its peer's address, and ipaddress is slow Python; the few
# distinct peers (loopback, the tunnel agent, LAN phones) stay in a small bounded cache.
@functools.lru_cache(maxsize=1024)
def parse_ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback(text: str | None) -> bool:
    address = parse_ip(text)
    return address is not None and address.is_loopback


def is_loopback_host(host: str | None) -> bool:
    """Whether a Host header names this machine: localhost, 127.x.x.x or [::1], any port."""
    if not host:
        return False
    host = host.lower()
    if host.startswith("["):
        inner, bracket, port = host[1:].partition("]")
        name = inner if bracket else ""
    else:
        name, colon, digits = host.partition(":")
        port = colon + digits
    if port and not _PORT.match(port):
        return False
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
