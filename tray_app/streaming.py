"""Relaying a streamed (SSE) answer from LM Studio, chunk by chunk as it arrives.

While LM Studio is still processing the prompt, optional SSE comments keep idle-sensitive
proxies and phones from dropping the connection. Once the first byte arrives the relay is a
plain read-write loop: no parsing, no timers, one small deque append per chunk (for usage).
When the client hangs up, LM Studio's request is closed at once so the GPU stops generating.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp
from aiohttp import web

from tray_app._tasks import spawn
from tray_app.api_errors import REQUEST_ID_HEADER, ApiError, sse_error_event
from tray_app.config import Config
from tray_app.usage import Usage, usage_from_sse_tail

T = TypeVar("T")

HEARTBEAT = b": keep-alive\n\n"
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # nginx (and ngrok's edge honours it too) must not buffer the stream.
    "X-Accel-Buffering": "no",
}
_TAIL_CHUNKS = 4  # the usage chunk and [DONE] arrive in the last few reads


class _ClientGone(Exception):
    """The client closed its connection; nothing more can be sent to it."""


def _close_unused(task: asyncio.Task[object]) -> None:
    """Done-callback for an abandoned task: retrieve its outcome, close a response it made."""
    if task.cancelled():
        return
    if task.exception() is None:
        result = task.result()
        if isinstance(result, aiohttp.ClientResponse):
            result.close()


class StreamRelay:
    """Relays one streamed request; afterwards ``status``, ``bytes_out``, ``usage``, ``error``
    describe what happened, for the access log."""

    def __init__(
        self,
        request: web.Request,
        request_id: str,
        *,
        config: Config,
        on_upstream: Callable[[aiohttp.ClientResponse], None],
        read_whole: Callable[[aiohttp.ClientResponse], Awaitable[web.Response]],
        is_stopping: Callable[[], bool],
    ) -> None:
        self._request = request
        self._request_id = request_id
        self._interval = config.heartbeat_interval
        self._idle_timeout = config.upstream_idle_timeout
        self._on_upstream = on_upstream
        self._read_whole = read_whole
        self._is_stopping = is_stopping
        self._down: web.StreamResponse | None = None
        self.status = 0
        self.bytes_out = 0
        self.usage: Usage | None = None
        self.error: str | None = None

    async def run(
        self, open_upstream: Callable[[], Awaitable[aiohttp.ClientResponse]]
    ) -> web.StreamResponse:
        try:
            try:
                upstream = await self._beating(open_upstream())
            except ApiError as err:
                if self._down is None:
                    raise
                return await self.fail(err.message, err.type, err.code)
            self._on_upstream(upstream)
            content_type = upstream.headers.get("Content-Type", "")
            if upstream.status != 200 or "text/event-stream" not in content_type:
                return await self._not_a_stream(upstream)
            return await self._relay(upstream)
        except _ClientGone:
            self.status = 499
            self.error = "client_disconnected"
            # Returning the prepared response is fine: aiohttp notices the closed transport.
            assert self._down is not None
            return self._down

    async def _relay(self, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        tail: deque[bytes] = deque(maxlen=_TAIL_CHUNKS)
        try:
            down = await self._start(upstream.status)
            content = upstream.content
            first = await self._beating(content.readany())
            if first:
                tail.append(first)
                await self._write(first)
                async for chunk in content.iter_any():
                    tail.append(chunk)
                    try:
                        await down.write(chunk)
                    except ConnectionResetError:
                        raise _ClientGone from None
                    self.bytes_out += len(chunk)
        except (TimeoutError, aiohttp.ClientError) as exc:
            upstream.close()
            if self._is_stopping():
                return await self.fail(
                    "LM Gate is shutting down; the answer was cut short.",
                    "server_error",
                    "shutting_down",
                )
            if isinstance(exc, asyncio.TimeoutError):
                return await self.fail(
                    f"LM Studio sent nothing for {self._idle_timeout:g} s (upstream.idle_timeout); "
                    "the answer was cut short.",
                    "upstream_error",
                    "upstream_timeout",
                )
            return await self.fail(
                f"LM Studio's stream broke off ({type(exc).__name__}); the answer is incomplete.",
                "upstream_error",
                "upstream_stream_failed",
            )
        except BaseException:
            upstream.close()
            raise
        upstream.release()
        self.usage = usage_from_sse_tail(tail)
        return down

    async def _not_a_stream(self, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        """LM Studio answered with an error (or plain JSON) although a stream was asked for."""
        try:
            whole = await self._read_whole(upstream)
        except ApiError as err:
            if self._down is None:
                raise
            return await self.fail(err.message, err.type, err.code)
        if self._down is None:
            self.status = whole.status
            return whole
        body = whole.body if isinstance(whole.body, bytes) else b""
        if whole.status >= 400:
            return await self.fail(
                body.decode("utf-8", errors="replace")[:500], "upstream_error", "upstream_error"
            )
        await self._write(b"data: " + body.replace(b"\n", b"") + b"\n\ndata: [DONE]\n\n")
        return self._down

    @property
    def committed(self) -> bool:
        """Whether response headers went out (heartbeats or data): errors must be SSE events."""
        return self._down is not None

    async def _beating(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable``, sending SSE heartbeats every interval while it is pending."""
        if self._interval <= 0:
            return await awaitable
        task: asyncio.Task[T] = spawn(_as_coroutine(awaitable))
        done = False
        try:
            while True:
                finished, _ = await asyncio.wait({task}, timeout=self._interval)
                if finished:
                    done = True
                    return task.result()
                await self._start(200)
                await self._write(HEARTBEAT)
        finally:
            if not done:
                task.cancel()
                task.add_done_callback(_close_unused)

    async def _start(self, status: int) -> web.StreamResponse:
        if self._down is None:
            down = web.StreamResponse(status=status, headers=SSE_HEADERS)
            down.headers[REQUEST_ID_HEADER] = self._request_id
            self.status = status
            try:
                await down.prepare(self._request)
            except ConnectionResetError:
                raise _ClientGone from None
            self._down = down
        return self._down

    async def _write(self, data: bytes) -> None:
        assert self._down is not None
        try:
            await self._down.write(data)
        except ConnectionResetError:
            raise _ClientGone from None
        self.bytes_out += len(data)

    async def fail(self, message: str, kind: str, code: str) -> web.StreamResponse:
        """End the stream with an SSE error event that the OpenAI SDKs raise as APIError."""
        self.error = code
        down = await self._start(200)
        await self._write(
            sse_error_event(message, type=kind, code=code, request_id=self._request_id)
        )
        return down


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable
