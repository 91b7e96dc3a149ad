"""LAN mode: no account, no tunnel; the gateway also listens on this machine's LAN address.

Traffic on the local network is not encrypted, and the user is told so.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Protocol

from tray_app.errors import ConfigError, TunnelError

LAN_WARNING = (
    "LAN mode: traffic between your devices and this computer is not encrypted, so anyone on "
    "the same network could read it. Use it only on a network you trust; use ngrok otherwise."
)


class Listeners(Protocol):
    """What LAN mode needs from the running server (the gateway's ``GatewayServer``): a tunnel
    provider is handed it and never imports the gateway."""

    async def add_listener(self, host: str, port: int) -> int: ...

    async def remove_listener(self, host: str) -> None: ...

    def has_listener(self, host: str) -> bool: ...


def detect_lan_address() -> str | None:
    """The address this machine uses toward the network, or None.

    Connecting a UDP socket only picks a route; no packet is sent. The target is TEST-NET-1,
    which no network routes anywhere.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            address = str(probe.getsockname()[0])
        except OSError:
            return None
    if ipaddress.ip_address(address).is_loopback or address == "0.0.0.0":
        return None
    return address


class LanProvider:
    name = "lan"
    warning: str | None = LAN_WARNING
    # No agent: devices connect directly, so no forwarding header is ever believed.
    forwarded_header: str | None = None

    def __init__(
        self,
        server: Listeners,
        *,
        address: str = "",
        port: int = 0,
        detect: Callable[[], str | None] = detect_lan_address,
    ) -> None:
        self._server = server
        self._address = address
        self._port = port
        self._detect = detect
        self._bound: str | None = None

    def set_lost_callback(self, callback: Callable[[str], None]) -> None:
        """A listener on our own machine is not lost the way a remote session is."""

    async def open(self, local_port: int) -> str:
        address = self._address or self._detect()
        if not address:
            raise TunnelError(
                "No LAN address was found: is this computer connected to a "
                "network? Set tunnel.lan_address if it has several."
            )
        try:
            bound = await self._server.add_listener(address, self._port or local_port)
        except ConfigError as exc:
            raise TunnelError(f"LAN mode could not start: {exc.problem}.") from None
        self._bound = address
        host = f"[{address}]" if ":" in address else address
        return f"http://{host}:{bound}"

    async def close(self) -> None:
        if self._bound is not None:
            await self._server.remove_listener(self._bound)
            self._bound = None

    async def alive(self) -> bool:
        return self._bound is not None and self._server.has_listener(self._bound)
