"""Two reference proxies that show what any proxy costs on this machine, for the benchmark.

    python benchmarks/floors.py bare-aiohttp|tcp-relay UPSTREAM_URL

``bare-aiohttp`` is the least an aiohttp reverse proxy can do, the shape LM Gate is built on:
an aiohttp server that reads the request, sends it upstream with an aiohttp client and relays
the answer, with no authentication, limits, metrics, logging or body rules.
``tcp-relay`` copies bytes between sockets with asyncio protocols and parses no HTTP at all:
the floor for any Python proxy. Each prints ``Listening on <url>`` once ready. Loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)


async def _relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    upstream_url: str = request.app["upstream"]
    async with request.app[SESSION].request(
        request.method,
        upstream_url + request.path,
        data=body,
        headers={"Content-Type": "application/json"},
    ) as upstream:
        if "text/event-stream" not in upstream.headers.get("Content-Type", ""):
            return web.Response(
                status=upstream.status,
                body=await upstream.read(),
                content_type="application/json",
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        return response


async def _session(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        app[SESSION] = session
        yield


async def bare_aiohttp(upstream_url: str) -> None:
    app = web.Application()
    app["upstream"] = upstream_url
    app.cleanup_ctx.append(_session)
    app.router.add_route("*", "/{tail:.*}", _relay)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(f"Listening on http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


class _Pipe(asyncio.Protocol):
    """One side of a relayed connection; bytes received are written to the other side."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Pipe | None = None
        self.waiting: list[bytes] = []  # received before the other side connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is not None and other.transport is not None:
            other.transport.write(data)
        else:
            self.waiting.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()


async def tcp_relay(upstream_url: str) -> None:
    host, port = upstream_url.removeprefix("http://").rsplit(":", 1)
    loop = asyncio.get_running_loop()
    connecting: set[asyncio.Task[None]] = set()

    async def connect(front: _Pipe) -> None:
        back = _Pipe()
        await loop.create_connection(lambda: back, host, int(port))
        front.other, back.other = back, front
        assert back.transport is not None
        for data in front.waiting:
            back.transport.write(data)
        front.waiting.clear()

    def accept() -> _Pipe:
        front = _Pipe()
        task = loop.create_task(connect(front))
        connecting.add(task)
        task.add_done_callback(connecting.discard)
        return front

    server = await loop.create_server(accept, "127.0.0.1", 0)
    print(f"Listening on http://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    kind, upstream_url = sys.argv[1], sys.argv[2]
    runners = {"bare-aiohttp": bare_aiohttp, "tcp-relay": tcp_relay}
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(runners[kind](upstream_url))


if __name__ == "__main__":
    main()
