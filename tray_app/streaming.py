"""Relaying a streamed (SSE) answer from LM Studio, chunk by chunk as it arrives.

While LM Studio is still processing the prompt, an optional heartbeat pump sends SSE comments
so that idle-sensitive proxies and phones keep the connection. The relay itself awaits LM
Studio directly (no wrapper task per read), and once the first chunk arrives it is a plain
read-write loop: no parsing, no timers, one deque append per chunk (for usage).
When the client hangs up, LM Studio's request is closed at once so the GPU stops generating.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
from aiohttp import web

from tray_app._tasks import spawn
from tray_app.api_errors import REQUEST_ID_HEADER, ApiError, sse_error_event
from tray_app.config import Config
from tray_app.usage import Usage, has_usage_object, strip_usage_events, usage_from_sse_tail

log = logging.getLogger("lmgate.streaming")

HEARTBEAT = b": keep-alive\n\n"
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # nginx (and ngrok's edge honours it too) must not buffer the stream.
    "X-Accel-Buffering": "no",
}
_TAIL_CHUNKS = 4  # the usage chunk and [DONE] arrive in the last few reads


class _SseResponse(web.StreamResponse):
    """Sends its headers together with the first chunk (or heartbeat) in one write, as
    aiohttp's own web.Response does, instead of alone at prepare(): one packet and one client
    read fewer before the first token."""

    _send_headers_immediately = False


class _ClientGone(Exception):
    """The client closed its connection; nothing more can be sent to it."""


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
        extra_headers: Mapping[str, str] | None = None,
        hide_usage: bool = False,
        observer: Callable[[bytes], None] | None = None,
    ) -> None:
        self._request = request
        self._extra_headers = extra_headers
        self._hide_usage = hide_usage
        self._observer = observer  # sees every chunk (the conversation API keeps the answer)
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

    @property
    def committed(self) -> bool:
        """Whether response headers went out (heartbeats or data): errors must be SSE events."""
        return self._down is not None

    async def run(
        self, open_upstream: Callable[[], Awaitable[aiohttp.ClientResponse]]
    ) -> web.StreamResponse:
        pump = _HeartbeatPump(self, self._interval) if self._interval > 0 else None
        try:
            try:
                upstream = await open_upstream()
            except ApiError as err:
                await _stop(pump)
                if self._down is None:
                    raise
                return await self.fail(err.message, err.type, err.code)
            self._on_upstream(upstream)
            content_type = upstream.headers.get("Content-Type", "")
            if upstream.status != 200 or "text/event-stream" not in content_type:
                await _stop(pump)
                return await self._not_a_stream(upstream)
            return await self._relay(upstream, pump)
        except _ClientGone:
            self.status = 499
            self.error = "client_disconnected"
            # Returning the prepared response is fine: aiohttp notices the closed transport.
            assert self._down is not None
            return self._down
        finally:
            if pump is not None:
                pump.cancel()

    async def _relay(
        self, upstream: aiohttp.ClientResponse, pump: _HeartbeatPump | None
    ) -> web.StreamResponse:
        tail: deque[bytes] = deque(maxlen=_TAIL_CHUNKS)
        try:
            content = upstream.content
            first = await content.readany()  # the pump beats on while the prompt is processed
            await _stop(pump)
            down = await self._start(upstream.status)
            if first and self._hide_usage:
                await self._relay_hiding_usage(first, content, tail)
            elif first and self._observer is not None:
                observe = self._observer
                chunk = first
                while chunk:
                    tail.append(chunk)
                    observe(chunk)
                    await self._write(chunk)
                    chunk = await content.readany()
            elif first:
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
            await _stop(pump)
            if self._is_stopping():
                return await self.fail(
                    "LM Gate is shutting down; the answer was cut short.",
                    "server_error",
                    "shutting_down",
                )
            if isinstance(exc, asyncio.TimeoutError):
                return await self.fail(
                    f"LM Studio sent nothing for {self._idle_timeout:g} s "
                    "(upstream.idle_timeout); the answer was cut short.",
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

    async def _relay_hiding_usage(
        self, first: bytes, content: aiohttp.StreamReader, tail: deque[bytes]
    ) -> None:
        """The relay loop when LM Gate asked for usage the client did not: forward whole SSE
        events only, so the usage event can be recognised and dropped."""
        carry = b""
        chunk = first
        while chunk:
            tail.append(chunk)
            data = carry + chunk if carry else chunk
            cut = data.rfind(b"\n\n")
            if cut < 0:
                carry = data
            else:
                ready, carry = data[: cut + 2], data[cut + 2 :]
                if has_usage_object(ready):
                    ready = strip_usage_events(ready)
                if ready:
                    await self._write(ready)
            chunk = await content.readany()
        if carry:
            await self._write(carry)

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

    async def _start(self, status: int) -> web.StreamResponse:
        if self._down is None:
            down = _SseResponse(status=status, headers=SSE_HEADERS)
            down.headers[REQUEST_ID_HEADER] = self._request_id
            if self._extra_headers:
                down.headers.update(self._extra_headers)
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

    async def heartbeat(self) -> None:
        await self._start(200)
        await self._write(HEARTBEAT)

    async def fail(self, message: str, kind: str, code: str) -> web.StreamResponse:
        """End the stream with an SSE error event that the OpenAI SDKs raise as APIError."""
        self.error = code
        down = await self._start(200)
        await self._write(
            sse_error_event(message, type=kind, code=code, request_id=self._request_id)
        )
        return down


class _HeartbeatPump:
    """Sends SSE comments every interval until stopped: the only other writer before the first
    chunk. Between beats it is only a timer, so a stream whose first chunk comes in time never
    creates a task for it. A beat is never cancelled mid-write, so the response is prepared
    exactly once and no heartbeat is cut in half."""

    def __init__(self, relay: StreamRelay, interval: float) -> None:
        self._relay = relay
        self._interval = interval
        self._stopping = False
        self._beat: asyncio.Task[None] | None = None  # set only while a heartbeat is written
        self._timer = asyncio.get_running_loop().call_later(interval, self._due)

    def _due(self) -> None:
        self._beat = spawn(self._send(), name="sse-heartbeat")
        self._beat.add_done_callback(_log_failure)

    async def _send(self) -> None:
        try:
            if self._stopping:
                return  # stopped after the timer fired but before this task's first step
            await self._relay.heartbeat()
        except _ClientGone:
            return  # aiohttp cancels the handler; there is nobody left to beat for
        finally:
            self._beat = None
        if not self._stopping:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._due)

    def cancel(self) -> None:
        self._stopping = True
        self._timer.cancel()

    async def stop(self) -> None:
        """Stop beating; returns once no heartbeat write is in progress, without a loop turn
        when none is."""
        self.cancel()
        beat = self._beat
        if beat is not None:
            # asyncio.wait, not await: our own cancellation must still propagate to us.
            await asyncio.wait({beat})


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("SSE heartbeat failed: %s", type(exc).__name__, exc_info=exc)


async def _stop(pump: _HeartbeatPump | None) -> None:
    if pump is not None:
        await pump.stop()
