"""Relaying a streamed (SSE) answer from LM Studio, chunk by chunk as it arrives.

While LM Studio is still processing the prompt, an optional heartbeat pump sends SSE comments
so that idle-sensitive proxies and phones keep the connection; while the request waits for its
turn in the fair queue, the same pump sends the client its place (``notify``). The relay
itself awaits LM Studio directly (no wrapper task per read), and once the first chunk arrives it
is a plain read-write loop: no parsing, no timers, one deque append per chunk (for usage). Its
usage is read once the stream ended, from its last reads and from its first event (where
/v1/messages puts input_tokens): the first few reads are kept until that event has ended. A
stream whose usage must be hidden, or whose events an observer reads, is relayed in whole events,
none larger than limits.max_event_bytes.
When the client hangs up, LM Studio's request is closed at once so the GPU stops generating;
``StreamRelay.abort`` does the same from outside (a revoked credential) and tells the client.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from aiohttp import web

from tray_app.config.settings import Config
from tray_app.gateway import api_errors as errors
from tray_app.gateway.api_errors import REQUEST_ID_HEADER, ApiError
from tray_app.gateway.upstream.failures import describe_failure
from tray_app.gateway.upstream.usage import (
    EventCutter,
    Usage,
    first_event_ended,
    merge_usage,
    usage_from_sse_head,
    usage_from_sse_tail,
)
from tray_app.tasks import spawn

log = logging.getLogger("lmgate.streaming")

HEARTBEAT = b": keep-alive\n\n"
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # nginx (and ngrok's edge honours it too) must not buffer the stream.
    "X-Accel-Buffering": "no",
}
_TAIL_CHUNKS = 4  # the usage chunk and [DONE] arrive in the last few reads
_HEAD_CHUNKS = 4  # LM Studio writes its first event in one go: a read or two hold it


class _SseResponse(web.StreamResponse):
    """Sends its headers together with the first chunk (or heartbeat) in one write, as
    aiohttp's own web.Response does, instead of alone at prepare(): one packet and one client
    read fewer before the first token."""

    _send_headers_immediately = False


class _ClientGone(Exception):
    """The client closed its connection; nothing more can be sent to it."""


class _EventTooLarge(Exception):
    """LM Studio sent an SSE event larger than limits.max_event_bytes."""


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
        # Sees the answer as the client gets it, in whole events (the conversation API keeps it).
        self._observer = observer
        self._request_id = request_id
        self._interval = config.streaming_heartbeat_interval
        self._idle_timeout = config.upstream_idle_timeout
        self._max_event_bytes = config.limits_max_event_bytes
        self._on_upstream = on_upstream
        self._read_whole = read_whole
        self._is_stopping = is_stopping
        self._down: web.StreamResponse | None = None
        self._upstream: aiohttp.ClientResponse | None = None
        self._task: asyncio.Task[Any] | None = None
        self._pump: _HeartbeatPump | None = None
        self._aborted: ApiError | None = None
        self._abort_cancelled = False  # abort() cancelled the wait for LM Studio's headers
        self._finished = False
        self._plain_tail: deque[bytes] | None = None  # set once the plain relay sends data
        self._head = b""  # the stream's first bytes: its first event, as far as they hold it
        self.status = 0
        self.bytes_out = 0
        self.usage: Usage | None = None
        self.error: str | None = None
        self._opening = False  # awaiting LM Studio's headers: the one wait abort() may cancel
        self._next_comment = HEARTBEAT  # what the pump writes next: a keep-alive or a notice
        self._told: bytes | None = None  # the last notice sent or due: the same is not resent

    @property
    def committed(self) -> bool:
        """Whether response headers went out (heartbeats or data): errors must be SSE events."""
        return self._down is not None

    def abort(self, error: ApiError) -> None:
        """End the stream from outside (e.g. its credential was revoked): LM Studio's request
        is closed now, and the relay's own task ends the client's stream with this SSE error
        event (``error``) as soon as it runs. Call on the relay's event loop; returns at once. Does
        nothing once the stream has ended or was already aborted."""
        if self._finished or self._aborted is not None:
            return
        self._aborted = error
        if self._upstream is not None:
            self._upstream.close()  # the pending read fails at once
        elif self._opening and self._task is not None:
            # Still waiting for LM Studio's headers, which may take minutes of prompt
            # processing: cancel that wait (aiohttp then closes the connection).
            self._abort_cancelled = True
            self._task.cancel()
        # Otherwise the relay is already writing its own end (opening LM Studio failed): a
        # cancel would cut that error event short and add this one after it.

    def notify(self, text: str) -> None:
        """Tell the waiting client ``text`` (e.g. "waiting, 2 ahead") as an SSE comment, as
        soon as the pump can write it; this commits the response as a 200 stream. Does nothing
        once the relay is past its waiting (relaying, failing or done)."""
        pump = self._pump
        if pump is None or pump.stopped:
            return
        # One line: a line break would end the comment and let the rest read as SSE fields.
        line = " ".join(text.splitlines())
        notice = f": {line}\n\n".encode()
        if notice == self._told:
            return
        self._told = self._next_comment = notice
        pump.beat_now()

    async def run(
        self, open_upstream: Callable[[], Awaitable[aiohttp.ClientResponse]]
    ) -> web.StreamResponse:
        self._task = asyncio.current_task()
        # Also without heartbeats: the pump is the one writer of what comes before the answer,
        # the queue's notices too.
        self._pump = _HeartbeatPump(self, self._interval)
        try:
            return await self._run(open_upstream)
        except _ClientGone:
            self.status = 499
            self.error = "client_disconnected"
            # Returning the prepared response is fine: aiohttp notices the closed transport.
            assert self._down is not None
            return self._down
        finally:
            self._finished = True
            if self._pump is not None:
                self._pump.cancel()

    async def _run(
        self, open_upstream: Callable[[], Awaitable[aiohttp.ClientResponse]]
    ) -> web.StreamResponse:
        try:
            if self._aborted is not None:
                return await self._fail_aborted()
            try:
                upstream = await self._open(open_upstream)
            except ApiError as err:
                # Before asking whether headers went out: a heartbeat may be sending them.
                await self._stop_heartbeats()
                if self._down is None:
                    raise
                return await self.fail(err)
            self._upstream = upstream
            self._on_upstream(upstream)
            content_type = upstream.headers.get("Content-Type", "")
            if upstream.status != 200 or "text/event-stream" not in content_type:
                await self._stop_heartbeats()
                return await self._not_a_stream(upstream)
            return await self._relay(upstream)
        except asyncio.CancelledError:
            if not self._abort_cancelled:
                raise  # the client hung up: aiohttp cancelled the handler
            self._abort_cancelled = False
            task = self._task
            assert task is not None
            if task.uncancel() > 0:
                raise  # the client hung up as well
            return await self._fail_aborted()

    async def _open(
        self, open_upstream: Callable[[], Awaitable[aiohttp.ClientResponse]]
    ) -> aiohttp.ClientResponse:
        self._opening = True
        try:
            return await open_upstream()
        finally:
            self._opening = False

    async def _relay(self, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        tail: deque[bytes] = deque(maxlen=_TAIL_CHUNKS)
        cutter: EventCutter | None = None
        try:
            content = upstream.content
            first = await content.readany()  # the pump beats on while the prompt is processed
            await self._stop_heartbeats()
            down = await self._start(upstream.status)
            if first and (self._hide_usage or self._observer is not None):
                cutter = EventCutter(self._max_event_bytes, hide_usage=self._hide_usage)
                await self._relay_events(first, content, cutter, tail)
            elif first:
                self._plain_tail = tail  # the bytes as sent, for an error event after them
                await self._relay_head(first, content, tail)
                async for chunk in content.iter_any():
                    tail.append(chunk)
                    try:
                        await down.write(chunk)
                    except ConnectionResetError:
                        raise _ClientGone from None
                    self.bytes_out += len(chunk)
        except (TimeoutError, aiohttp.ClientError) as exc:
            upstream.close()
            if self._aborted is not None:
                return await self._fail_aborted()
            if self._is_stopping():
                return await self.fail(errors.stream_cut_by_shutdown())
            if isinstance(exc, asyncio.TimeoutError):
                return await self.fail(errors.stream_idle(self._idle_timeout))
            return await self.fail(errors.stream_broke(describe_failure(exc)))
        except _EventTooLarge:
            upstream.close()  # LM Studio would go on filling it; stop the generation too
            return await self.fail(errors.stream_event_too_large(self._max_event_bytes))
        except BaseException:
            upstream.close()
            raise
        upstream.release()
        if self._aborted is not None:
            return await self._fail_aborted()  # the close looked like a clean end
        found = cutter.usage if cutter is not None else None
        last = found or usage_from_sse_tail(tail, self._max_event_bytes)
        self.usage = merge_usage(usage_from_sse_head(self._head, self._max_event_bytes), last)
        return down

    async def _relay_head(
        self, first: bytes, content: aiohttp.StreamReader, tail: deque[bytes]
    ) -> None:
        """Relay the first reads, kept until the first event has ended (a few at most), before
        the plain loop takes over: the one place a plain stream's bytes are looked at."""
        head = [first]
        chunk = first
        while chunk:  # an empty read: the stream ended
            tail.append(chunk)
            await self._write(chunk)
            if len(head) >= _HEAD_CHUNKS or first_event_ended(b"".join(head)):
                break
            chunk = await content.readany()
            head.append(chunk)
        self._head = b"".join(head)

    async def _relay_events(
        self,
        first: bytes,
        content: aiohttp.StreamReader,
        cutter: EventCutter,
        tail: deque[bytes],
    ) -> None:
        """The relay loop in whole events: for hiding the usage LM Gate asked for, and for an
        observer that reads events. What the observer sees is exactly what is written."""
        observe = self._observer
        chunk = first
        while chunk:
            tail.append(chunk)
            ready = cutter.feed(chunk)
            if ready:
                if not self._head:
                    self._head = ready  # whole events, the first among them
                if observe is not None:
                    observe(ready)
                await self._write(ready)
            if cutter.too_large:
                raise _EventTooLarge
            chunk = await content.readany()
        rest = cutter.rest()
        if rest and self._aborted is None:
            if observe is not None:
                observe(rest)
            await self._write(rest)

    async def _end_partial_event(self) -> None:
        """The plain relay passes bytes on as they come, so a stream that stops mid-event
        leaves the client inside that event: end it with a blank line, or the error event
        written next would be glued onto it and no SSE parser could read the error."""
        tail = self._plain_tail
        if tail is None:
            return  # nothing relayed as it came: heartbeats and whole events end themselves
        # Two line ends in a row (LF, CRLF or CR) end an event; four bytes hold the longest.
        last = b"".join(tail)[-4:].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not last.endswith(b"\n\n"):
            await self._write(b"\n\n")

    async def _not_a_stream(self, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        """LM Studio answered with an error (or plain JSON) although a stream was asked for."""
        try:
            whole = await self._read_whole(upstream)
        except ApiError as err:
            if self._aborted is not None:
                return await self._fail_aborted()
            if self._down is None:
                raise
            return await self.fail(err)
        if self._down is None:
            self.status = whole.status
            return whole
        body = whole.body if isinstance(whole.body, bytes) else b""
        if whole.status >= 400:
            return await self.fail(
                errors.stream_upstream_error(body.decode("utf-8", errors="replace"))
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
        # Taken first: a newer notice that comes while the headers go out waits for the next.
        comment, self._next_comment = self._next_comment, HEARTBEAT
        await self._start(200)
        await self._write(comment)

    async def _stop_heartbeats(self) -> None:
        if self._pump is not None:
            await self._pump.stop()

    async def fail(self, error: ApiError) -> web.StreamResponse:
        """End the stream with an SSE error event that the OpenAI SDKs raise as APIError.
        The event is the stream's last bytes: no heartbeat is due or being written once it
        starts, even when a slow client keeps the write waiting for longer than a beat."""
        self.error = error.code
        await self._stop_heartbeats()
        down = await self._start(200)
        await self._end_partial_event()
        await self._write(error.sse_event(self._request_id))
        return down

    async def _fail_aborted(self) -> web.StreamResponse:
        assert self._aborted is not None
        return await self.fail(self._aborted)


class _HeartbeatPump:
    """Sends SSE comments every interval until stopped: the only other writer before the first
    chunk. Between beats it is only a timer, so a stream whose first chunk comes in time never
    creates a task for it. A beat is never cancelled mid-write, so the response is prepared
    exactly once and no heartbeat is cut in half. ``beat_now`` sends the relay's notice at once
    (or right after the beat being written); an interval of 0 sends nothing else."""

    def __init__(self, relay: StreamRelay, interval: float) -> None:
        self._relay = relay
        self._interval = interval
        self._stopping = False
        self._again = False  # a notice came while a beat was being written: beat once more
        self._beat: asyncio.Task[None] | None = None  # set only while a heartbeat is written
        self._timer: asyncio.TimerHandle | None = None
        self._arm(interval)

    @property
    def stopped(self) -> bool:
        return self._stopping

    def _arm(self, delay: float) -> None:
        if delay > 0:
            self._timer = asyncio.get_running_loop().call_later(delay, self._due)

    def _due(self) -> None:
        self._beat = spawn(self._send(), name="sse-heartbeat")
        self._beat.add_done_callback(_log_failure)

    def beat_now(self) -> None:
        if self._stopping:
            return
        if self._beat is not None:
            self._again = True
            return
        self._disarm()
        self._due()

    async def _send(self) -> None:
        try:
            if self._stopping:
                return  # stopped after the timer fired but before this task's first step
            await self._relay.heartbeat()
        except _ClientGone:
            return  # aiohttp cancels the handler; there is nobody left to beat for
        finally:
            self._beat = None
        if self._stopping:
            return
        if self._again:
            self._again = False
            self._due()
        else:
            self._arm(self._interval)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def cancel(self) -> None:
        self._stopping = True
        self._disarm()

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
