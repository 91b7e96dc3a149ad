"""Running the gateway: aiohttp's AppRunner + TCPSite, so it can live inside any event loop
(the CLI's, or the tray app's background thread) and bind port 0 in tests."""

from __future__ import annotations

import errno
import socket

from aiohttp import web

from tray_app.errors import ConfigError
from tray_app.gateway import Gateway

# aiohttp's own grace after our on_shutdown hook has already waited and closed streams.
_EXTRA_SHUTDOWN_SECONDS = 5.0


class GatewayServer:
    def __init__(
        self, gateway: Gateway, *, host: str | None = None, port: int | None = None
    ) -> None:
        self.gateway = gateway
        self.host = host if host is not None else gateway.config.server_host
        self._requested_port = port if port is not None else gateway.config.server_port
        self._runner: web.AppRunner | None = None
        self._extra_sites: dict[str, web.TCPSite] = {}
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server is not running")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        runner = web.AppRunner(
            self.gateway.build_app(),
            # aiohttp's access log prints raw request lines, query strings included: ours is
            # structured and safe, so theirs stays off.
            access_log=None,
            # Cancel the handler when the client disconnects, so LM Studio's request is closed
            # even while we are only waiting for it (prompt processing).
            handler_cancellation=True,
            shutdown_timeout=self.gateway.config.shutdown_grace + _EXTRA_SHUTDOWN_SECONDS,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._requested_port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    "server.port",
                    f"{self.host}:{self._requested_port} is already "
                    "in use; choose another port with --port",
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(
                    "server.host", f"{self.host} is not an address of this machine"
                ) from None
            raise ConfigError(
                "server.host",
                f"cannot listen on {self.host}:{self._requested_port}: {exc.strerror}",
            ) from None
        self._runner = runner
        for address in runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                self.port = int(address[1])
                break

    async def add_listener(self, host: str, port: int) -> int:
        """Also listen on ``host`` (e.g. the LAN address); returns the bound port."""
        if self._runner is None:
            raise RuntimeError("the server is not running")
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                "tunnel.lan_address", f"cannot listen on {host}:{port}: {exc.strerror}"
            ) from None
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        bound = int(sockets[0].getsockname()[1]) if sockets else port
        self._extra_sites[host] = site
        return bound

    async def remove_listener(self, host: str) -> None:
        site = self._extra_sites.pop(host, None)
        if site is not None:
            await site.stop()

    def has_listener(self, host: str) -> bool:
        return host in self._extra_sites

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        self._extra_sites.clear()
        if runner is not None:
            await runner.cleanup()
        self.port = None


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True
