"""aiohttp's connection layer, hardened: what happens before a request reaches the gateway.

* A connection is admitted or refused as it opens (:mod:`tray_app.gateway.server.admission`).
* Its first request head must arrive within ``header_timeout`` of the connection opening; a
  reused connection that sits idle, or holds half a head, is closed by aiohttp's own
  keep-alive timer (``keepalive_timeout``, given to the runner). Neither timer runs while a
  request is being handled, so an answer may stream for as long as it needs.
* A request aiohttp cannot parse gets our JSON error instead of aiohttp's text page, which
  quotes the offending bytes (an oversized header may be a credential), and one access line.
* ``CONNECT`` and absolute-form targets reach the gateway's dispatch (see
  ``_routing_strays``), which gives them its JSON 404 and an access line like any other
  request; nothing else here treats them specially.

Built as aiohttp builds its own: an AppRunner whose server makes our RequestHandler.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import RawRequestMessage
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from tray_app.gateway import api_errors as errors
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.server.admission import ConnectionGuard, Ticket
from tray_app.gateway.server.exhaustion_log import RateLimitedLog
from tray_app.gateway.server.raw_errors import raw_error_response
from tray_app.logs import ACCESS_LOGGER, new_request_id

access_log = logging.getLogger(ACCESS_LOGGER)

# How long a refused connection stays half-open after its 503, so the client reads the answer
# instead of a reset (closing with its request unread would send an RST).
LINGER_SECONDS = 1.0

Handler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]
RequestFactory = Callable[
    [RawRequestMessage, StreamReader, RequestHandler, AbstractStreamWriter, "asyncio.Task[None]"],
    BaseRequest,
]


def _parse_error(status: int, exc: BaseException | None) -> ApiError:
    if isinstance(exc, LineTooLong) or (
        isinstance(exc, BadHttpMessage) and exc.message.startswith("Too many headers")
    ):
        return errors.headers_too_large()
    if isinstance(exc, HttpProcessingError) or status == 400:
        return errors.bad_http()
    return errors.unparsed_internal_error()


def _access_line(request: BaseRequest, request_id: str, response: web.Response, code: str) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    body = response.body
    fields: dict[str, object] = {
        "request_id": request_id,
        "client": request.remote,
        "principal": None,
        # The method and target are the client's own bytes, possibly the very ones refused.
        "method": "-",
        "path": "-",
        "status": response.status,
        "model": None,
        "stream": False,
        "latency_ms": 0.0,
        "bytes_in": 0,
        "bytes_out": len(body) if isinstance(body, bytes) else 0,
        "error": code,
    }
    access_log.info("request", extra={"access": fields})


def _answer(request: BaseRequest, error: ApiError) -> web.Response:
    request_id = new_request_id()
    response = error.to_response(request_id)
    response.force_close()
    _access_line(request, request_id, response, error.code)
    return response


class GuardedRequestHandler(RequestHandler):
    __slots__ = (
        "_bytes_before_head",
        "_guarded",
        "_head_timer",
        "_linger",
        "_peer",
        "_stopped_reading",
        "_ticket",
        "_write_timer",
    )

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        # Kept apart from aiohttp's _manager, which it clears when the connection is lost.
        self._guarded = manager
        self._peer: str | None = None
        self._ticket: Ticket | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._bytes_before_head = False
        self._linger: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._stopped_reading = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple | list) and peer else None
        verdict = self._guarded.guard.admit(self._peer)
        if isinstance(verdict, bytes):
            self._refuse(transport, verdict)
            return
        self._ticket = verdict
        super().connection_made(transport)
        self._head_timer = self._loop.call_later(self._guarded.header_timeout, self._head_overdue)

    def _refuse(self, transport: asyncio.BaseTransport, answer: bytes) -> None:
        assert isinstance(transport, asyncio.Transport)
        # Not a connection aiohttp knows about: its connection_lost returns at once.
        self._manager = None
        self._force_close = True
        transport.write(answer)
        if not transport.can_write_eof():
            transport.close()
            return
        # Half-close and wait for the client's request (usually already on its way): closing
        # with it unread would send a reset, and the client would see that instead of the
        # 503. Its first bytes, its EOF (eof_received returns None) or the timer close us.
        transport.write_eof()
        self.transport = transport
        self._linger = self._loop.call_later(LINGER_SECONDS, transport.close)
        self._guarded.linger(transport)

    def head_received(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def stop_reading(self) -> None:
        """Read nothing more of this connection and close it once the answer is sent: for a
        request refused before its body (a compressed one, one too slow). aiohttp would
        otherwise drain, and inflate, what is left of the body for seconds."""
        self._stopped_reading = True
        self._force_close = True  # data_received ignores what comes; no lingering drain

    async def start(self) -> None:
        try:
            await super().start()
        finally:
            # aiohttp leaves the transport to whoever set _force_close: that is us here.
            if self._stopped_reading and self.transport is not None:
                self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._linger is not None:
            # A refused connection: its request is read (and dropped), so closing is clean.
            if self.transport is not None:
                self.transport.close()
            return
        if self._head_timer is not None and data:
            self._bytes_before_head = True
        super().data_received(data)

    def _head_overdue(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or self._force_close:
            return
        if self._bytes_before_head:
            # A client that sent nothing (a browser's speculative connection) is closed
            # quietly; one that started a request is told why.
            transport.write(raw_error_response(errors.header_timeout()))
            self._guarded.exhaustion.note(
                "header_timeout",
                "closed a connection from %s: no complete request head within %g s (%s)",
                self._peer,
                self._guarded.header_timeout,
                "server.header_timeout",
            )
        self.force_close()

    # A client that stops reading (pipelined requests it never reads the answers to, or a
    # stream it no longer drains) fills the socket's buffer and the transport pauses us. A
    # pause that lasts write_timeout ends the connection: nothing else would, since the
    # other timers only run while a request is read.
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self._loop.call_later(
                self._guarded.write_timeout, self._write_stalled
            )

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_stalled(self) -> None:
        self._write_timer = None
        transport = self.transport
        if transport is None:
            return
        self._guarded.exhaustion.note(
            "write_timeout",
            "closed a connection from %s: it read nothing of its answer for %g s (%s)",
            self._peer,
            self._guarded.write_timeout,
            "server.write_timeout",
        )
        transport.abort()  # unsent data is dropped: the client was not taking it

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._ticket is not None:
            self._guarded.guard.release(self._ticket)
            self._ticket = None
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
            if self.transport is not None:
                self._guarded.lingering.pop(self.transport, None)
                self.transport = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had started; the connection is closed instead")
        error = _parse_error(status, exc)
        if error.status == 500:
            # Not a client's mistake but ours: keep aiohttp's traceback line.
            self.log_exception("Error handling request", exc_info=exc)
        return _answer(request, error)


@dataclass(frozen=True, slots=True)
class ConnectionPolicy:
    """How the server treats connections, handed from the runner to its server as one."""

    guard: ConnectionGuard
    header_timeout: float
    write_timeout: float
    exhaustion: RateLimitedLog
    max_lingering: int
    stray_handler: Handler | None = None  # targets that do not start with "/"


class GuardedServer(Server):
    """aiohttp's Server, making GuardedRequestHandlers."""

    def __init__(self, plain: Server, policy: ConnectionPolicy) -> None:
        super().__init__(
            _routing_strays(plain.request_handler, policy.stray_handler),
            request_factory=_marking_heads(plain.request_factory),
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **plain._kwargs,
        )
        self.guard = policy.guard
        self.header_timeout = policy.header_timeout
        self.write_timeout = policy.write_timeout
        self.exhaustion = policy.exhaustion
        self.max_lingering = policy.max_lingering
        # Refused connections waiting to close, oldest first (a dict keeps insertion order).
        self.lingering: dict[asyncio.Transport, None] = {}

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)

    def linger(self, transport: asyncio.Transport) -> None:
        """Hold a refused connection briefly; past the budget the oldest goes first, since an
        idle flood would otherwise keep every slot and leave real clients a reset."""
        while self.lingering and len(self.lingering) >= self.max_lingering:
            oldest = next(iter(self.lingering))
            del self.lingering[oldest]
            oldest.close()
        self.lingering[transport] = None

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        for transport in list(self.lingering):
            transport.close()
        self.lingering.clear()


def _routing_strays(inner: Handler, stray: Handler | None) -> Handler:
    """A request whose target does not start with "/" (CONNECT host:port, absolute-form
    targets) matches no route, and aiohttp would answer it with a plain-text page and no
    log line: such requests go to ``stray`` instead. Everything else goes to the app, through
    its router and without middlewares (a middleware costs every request a wrapper)."""
    if stray is None:
        return inner

    async def handle(request: BaseRequest) -> web.StreamResponse:
        if request.raw_path.startswith("/"):
            return await inner(request)
        return await stray(request)

    return handle


def _marking_heads(inner: RequestFactory) -> RequestFactory:
    # aiohttp calls the request factory for every parsed head (and for a head it could not
    # parse): the moment the header timer has done its job.
    def make(
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> BaseRequest:
        if isinstance(protocol, GuardedRequestHandler):
            protocol.head_received()
        return inner(message, payload, protocol, writer, task)

    return make


class GuardedAppRunner(web.AppRunner):
    __slots__ = ("_policy",)

    def __init__(self, app: web.Application, *, policy: ConnectionPolicy, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._policy = policy

    async def _make_server(self) -> Server:
        return GuardedServer(await super()._make_server(), self._policy)
