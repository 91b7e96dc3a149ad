"""Running the gateway: aiohttp's AppRunner + TCPSite, so it can live inside any event loop
(the CLI's, or the tray app's background thread) and bind port 0 in tests.

The runner is :class:`tray_app.gateway.server.connections.GuardedAppRunner`: connections
are bounded (in
total, from what the descriptor limit allows, and per client address) and must deliver their
request head in time. While it runs, the loop's exception handler turns asyncio's accept()
failures into rate-limited lines (:mod:`tray_app.gateway.server.exhaustion_log`)."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

from aiohttp import web

from tray_app.errors import ConfigError
from tray_app.gateway.app import Gateway
from tray_app.gateway.server.admission import ConnectionGuard
from tray_app.gateway.server.connections import ConnectionPolicy, GuardedAppRunner
from tray_app.gateway.server.descriptors import Budget, budget_for, raise_descriptor_limit
from tray_app.gateway.server.exhaustion_log import AcceptErrorFilter, RateLimitedLog

log = logging.getLogger("lmgate.connections")

# aiohttp's own grace after our on_shutdown hook has already waited and closed streams.
_EXTRA_SHUTDOWN_SECONDS = 5.0
# After an answer sent before the request body was read (413, a body timeout), aiohttp keeps
# reading and dropping the rest of the body this long, so the client sees the answer and not a
# reset. Its default of 10 s would let a stalled sender hold the connection that much longer.
_LINGERING_SECONDS = 2.0
# The kernel's queue of connections not yet accepted. asyncio accepts as many per wake-up as
# the backlog it was given, and those cost descriptors before they can be refused, so that
# number stays small (the budget's accept_backlog); the queue itself costs the process nothing,
# and a deep one means a flood's connections wait there instead of being dropped, which would
# make every client, valid ones too, wait a second for its SYN to be retransmitted.
_LISTEN_QUEUE = 1024


class GatewayServer:
    def __init__(
        self, gateway: Gateway, *, host: str | None = None, port: int | None = None
    ) -> None:
        self.gateway = gateway
        self.host = host if host is not None else gateway.config.server_host
        self._requested_port = port if port is not None else gateway.config.server_port
        self._runner: web.AppRunner | None = None
        self._extra_sites: dict[str, web.TCPSite] = {}
        self._budget: Budget | None = None
        self._exhaustion: RateLimitedLog | None = None
        self._accept_filter: AcceptErrorFilter | None = None
        self.guard: ConnectionGuard | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server is not running")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _connection_limits(self, exhaustion: RateLimitedLog) -> tuple[Budget, ConnectionGuard]:
        config = self.gateway.config
        budget = budget_for(raise_descriptor_limit())
        max_total = budget.max_connections
        if config.server_max_connections and config.server_max_connections > max_total:
            log.warning(
                "server.max_connections = %d does not fit in %d file descriptors; using %d",
                config.server_max_connections,
                budget.descriptors,
                max_total,
            )
        elif config.server_max_connections:
            max_total = config.server_max_connections
        # The gateway decides which peers are its proxies (the running tunnel's agent and
        # configured ones): they carry many clients, and only the total holds them.
        per_client = config.server_max_connections_per_client
        if not config.server_max_connections:
            # Under a small descriptor limit the derived total is small too: one address may
            # hold a quarter of it, so it can never leave everyone else a handful of slots.
            per_client = min(per_client, max(1, max_total // 4))
        guard = ConnectionGuard(
            max_total=max_total,
            max_per_client=per_client,
            trusts_peer=self.gateway.trusts_peer,
            exhaustion=exhaustion,
        )
        log.info(
            "client connections: at most %d open, %d per address (file-descriptor limit %d)",
            max_total,
            per_client,
            budget.descriptors,
        )
        return budget, guard

    async def start(self) -> None:
        config = self.gateway.config
        loop = asyncio.get_running_loop()
        exhaustion = RateLimitedLog(loop)
        budget, guard = self._connection_limits(exhaustion)
        accept_filter = AcceptErrorFilter(exhaustion)
        accept_filter.install(loop)
        runner = GuardedAppRunner(
            self.gateway.build_app(),
            policy=ConnectionPolicy(
                guard=guard,
                header_timeout=config.server_header_timeout,
                write_timeout=config.server_write_timeout,
                exhaustion=exhaustion,
                max_lingering=budget.max_lingering,
                stray_handler=self.gateway.dispatch,
            ),
            keepalive_timeout=config.server_keepalive_timeout,
            lingering_time=_LINGERING_SECONDS,
            # aiohttp's access log prints raw request lines, query strings included: ours is
            # structured and safe, so theirs stays off.
            access_log=None,
            # Cancel the handler when the client disconnects, so LM Studio's request is closed
            # even while we are only waiting for it (prompt processing).
            handler_cancellation=True,
            shutdown_timeout=config.server_shutdown_grace + _EXTRA_SHUTDOWN_SECONDS,
        )
        try:
            await runner.setup()
        except BaseException:
            accept_filter.uninstall()
            exhaustion.close()
            raise
        site = web.TCPSite(
            runner,
            self.host,
            self._requested_port,
            reuse_address=True,
            backlog=budget.accept_backlog,
        )
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            accept_filter.uninstall()
            exhaustion.close()
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
        _deepen_listen_queue(site)
        self._runner = runner
        self._budget, self.guard = budget, guard
        self._exhaustion, self._accept_filter = exhaustion, accept_filter
        for address in runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                self.port = int(address[1])
                break

    async def add_listener(self, host: str, port: int) -> int:
        """Also listen on ``host`` (e.g. the LAN address); returns the bound port."""
        if self._runner is None:
            raise RuntimeError("the server is not running")
        backlog = self._budget.accept_backlog if self._budget is not None else 128
        site = web.TCPSite(self._runner, host, port, reuse_address=True, backlog=backlog)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                "tunnel.lan_address", f"cannot listen on {host}:{port}: {exc.strerror}"
            ) from None
        _deepen_listen_queue(site)
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
        accept_filter, self._accept_filter = self._accept_filter, None
        if accept_filter is not None:
            accept_filter.uninstall()
        exhaustion, self._exhaustion = self._exhaustion, None
        if exhaustion is not None:
            exhaustion.close()
        self.port = None


def _deepen_listen_queue(site: web.TCPSite) -> None:
    server = getattr(site, "_server", None)
    for listening in getattr(server, "sockets", None) or []:
        # listen() again on a duplicate of the listening socket: same socket, deeper queue.
        with listening.dup() as sock:
            sock.listen(_LISTEN_QUEUE)


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True
