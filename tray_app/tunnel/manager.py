"""Going public: one small provider interface, and a manager that proves and keeps the URL.

A provider opens a public endpoint for the gateway's local port and closes it. The manager
opens it, proves the URL works by fetching ``/healthz`` through it, watches it (a periodic check
plus the provider's own "lost" signal), re-opens it with exponential backoff, and publishes every
state change as a frozen :class:`TunnelStatus` for the UI. Given a stream check, it also finds
out, through the public URL, whether streamed answers arrive as they are written
(:mod:`tray_app.tunnel.stream_check`) after each open, and publishes that too.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import aiohttp

from tray_app.clock import Clock, SystemClock
from tray_app.errors import TunnelError
from tray_app.tasks import spawn, wait_for_event
from tray_app.tunnel.stream_check import StreamCheck

log = logging.getLogger("lmgate.tunnel")

SKIP_BROWSER_WARNING = {"ngrok-skip-browser-warning": "1"}
# What LM Gate answers when it is at its connection limit (tray_app.gateway.server.admission).
BUSY_CODE = "too_many_connections"


class TunnelState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    PUBLIC = "public"
    RECONNECTING = "reconnecting"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class TunnelStatus:
    state: TunnelState
    provider: str
    public_url: str | None = None
    message: str = ""
    warning: str | None = None  # e.g. "LAN traffic is not encrypted"
    attempt: int = 0
    since: float = 0.0
    # Whether the public URL streams, once checked after this open (None: not yet, or no
    # check); published as a status of its own, the state and `since` unchanged.
    streaming: StreamCheck | None = None


class TunnelProvider(Protocol):
    name: str
    warning: str | None
    # The header in which the provider's agent, dialling in from loopback, names the client
    # (None: the provider has no agent and clients connect directly).
    forwarded_header: str | None

    async def open(self, local_port: int) -> str:
        """Open a public endpoint to ``local_port``; the public base URL. Raises TunnelError."""
        ...

    async def close(self) -> None:
        """Close the endpoint and whatever runs it. Never raises."""
        ...

    async def alive(self) -> bool:
        """A cheap local check that the endpoint still exists (e.g. the agent process runs)."""
        ...

    def set_lost_callback(self, callback: Callable[[str], None]) -> None:
        """``callback(reason)`` is called, from any thread, when the provider sees it is lost."""
        ...


async def url_works(url: str, *, seconds: float = 5.0) -> bool:
    """Whether ``url``/healthz reaches this LM Gate: its health document, or its own answer
    that it has as many connections as it takes (then the tunnel works and LM Gate is busy;
    re-opening the tunnel would only hand a flood a new URL and the phones a dead one)."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds)) as s,
            s.get(url.rstrip("/") + "/healthz", headers=SKIP_BROWSER_WARNING) as r,
        ):
            answer = await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False
    if r.status == 200:
        return bool(answer == {"status": "ok"})
    error = answer.get("error") if isinstance(answer, dict) else None
    return r.status == 503 and isinstance(error, dict) and error.get("code") == BUSY_CODE


StatusListener = Callable[[TunnelStatus], None]


class TunnelManager:
    def __init__(
        self,
        provider: TunnelProvider,
        local_port: int,
        *,
        on_change: StatusListener | None = None,
        clock: Clock | None = None,
        health_interval: float = 30.0,
        verify_timeout: float = 20.0,
        backoff_start: float = 1.0,
        backoff_max: float = 60.0,
        stable_after: float = 60.0,
        checker: Callable[[str], Awaitable[bool]] | None = None,
        stream_check: Callable[[str], Awaitable[StreamCheck]] | None = None,
    ) -> None:
        self._provider = provider
        self._port = local_port
        self._listeners: list[StatusListener] = [on_change] if on_change else []
        self._clock = clock or SystemClock()
        self._health_interval = health_interval
        self._verify_timeout = verify_timeout
        self._backoff_start = backoff_start
        self._backoff_max = backoff_max
        # A tunnel lost sooner than this after it opened counts as still failing: the next
        # reconnect goes on waiting longer instead of starting over (an agent that dies after
        # every open would otherwise make a new quick tunnel every few seconds, and each one
        # a new URL, until Cloudflare rate-limits the owner).
        self._stable_after = stable_after
        self._next_delay = backoff_start
        self._public_since = 0.0
        self._check = checker or url_works
        self._stream_check = stream_check
        self._streaming: asyncio.Task[None] | None = None  # the stream check running
        self._status = TunnelStatus(TunnelState.STOPPED, provider.name, since=self._clock.time())
        self._watchdog: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._lost_reason = ""
        self._loop = asyncio.get_running_loop()
        provider.set_lost_callback(self._lost_from_any_thread)

    @property
    def status(self) -> TunnelStatus:
        return self._status

    def add_listener(self, listener: StatusListener) -> None:
        self._listeners.append(listener)

    def _publish(self, state: TunnelState, **fields: Any) -> None:
        self._status = replace(self._status, state=state, since=self._clock.time(), **fields)
        log.info(
            "tunnel %s: %s %s", self._provider.name, state.value, self._status.public_url or ""
        )
        self._tell_listeners()

    def _tell_listeners(self) -> None:
        for listener in self._listeners:
            try:
                listener(self._status)
            except Exception:
                log.exception("a tunnel status listener failed")

    def _lost_from_any_thread(self, reason: str) -> None:
        def mark() -> None:
            self._lost_reason = reason
            self._lost.set()

        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to wake
            self._loop.call_soon_threadsafe(mark)

    async def start(self) -> TunnelStatus:
        """Open and prove the URL; raises TunnelError (state FAILED) if that cannot be done."""
        self._publish(
            TunnelState.STARTING,
            public_url=None,
            message="opening",
            attempt=0,
            warning=self._provider.warning,
            streaming=None,
        )
        try:
            url = await self._open_and_verify()
        except TunnelError as exc:
            self._publish(TunnelState.FAILED, message=str(exc))
            raise
        self._publish(TunnelState.PUBLIC, public_url=url, message="public")
        self._public_since = self._clock.monotonic()
        self._next_delay = self._backoff_start
        self._start_stream_check(url)
        self._watchdog = spawn(self._watch(), name="tunnel-watchdog")
        return self._status

    async def stop(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.cancel()
            await asyncio.wait({watchdog})
        await self._cancel_stream_check()
        await self._provider.close()
        self._publish(
            TunnelState.STOPPED, public_url=None, message="stopped", attempt=0, streaming=None
        )

    async def _open_and_verify(self) -> str:
        url = await self._provider.open(self._port)
        deadline = self._clock.monotonic() + self._verify_timeout
        while True:
            if await self._check(url):
                return url
            if self._clock.monotonic() >= deadline:
                await self._provider.close()
                raise TunnelError(
                    f"The tunnel opened at {url}, but LM Gate could not reach "
                    "itself through it. Check your network or firewall and try "
                    "again."
                )
            await asyncio.sleep(0.5)

    async def _healthy(self) -> bool:
        url = self._status.public_url
        return bool(url) and await self._provider.alive() and await self._check(url or "")

    async def _watch(self) -> None:
        while True:
            await wait_for_event(self._lost, self._health_interval)
            reason = self._lost_reason if self._lost.is_set() else "health check failed"
            self._lost.clear()
            if await self._healthy():
                continue
            await self._reconnect(reason)

    async def _reconnect(self, reason: str) -> None:
        short_lived = self._clock.monotonic() - self._public_since < self._stable_after
        delay = self._next_delay if short_lived else self._backoff_start
        attempt = 0
        while True:
            attempt += 1
            self._publish(TunnelState.RECONNECTING, message=reason, attempt=attempt, streaming=None)
            await self._cancel_stream_check()
            await self._provider.close()
            if short_lived:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff_max)
            try:
                url = await self._open_and_verify()
            except TunnelError as exc:
                reason = str(exc)
                if not short_lived:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._backoff_max)
                continue
            self._lost.clear()
            self._publish(TunnelState.PUBLIC, public_url=url, message="public", attempt=0)
            self._public_since = self._clock.monotonic()
            self._next_delay = delay
            self._start_stream_check(url)
            return

    # ---- whether the public URL streams ---------------------------------------------------

    def _start_stream_check(self, url: str) -> None:
        """Check in the background: it takes the stream's pacing (half a second) plus a few
        round trips, up to the check's own timeout on a slow tunnel, and the URL works
        already (the phones may use it while it runs). start() returning promptly keeps
        `serve`'s banner and the tray's "public" from waiting on a figure that is
        informational: a buffering tunnel still works, only less nicely."""
        if self._stream_check is None:
            return
        if self._streaming is not None:
            self._streaming.cancel()  # one check at a time, about the URL now public
        self._streaming = spawn(self._run_stream_check(url), name="tunnel-stream-check")

    async def _run_stream_check(self, url: str) -> None:
        assert self._stream_check is not None
        try:
            result = await self._stream_check(url)
        except Exception:  # a check that raises says nothing about the tunnel
            log.exception("the tunnel's stream check failed")
            return
        status = self._status
        if status.state is not TunnelState.PUBLIC or status.public_url != url:
            return  # the tunnel moved on meanwhile: the figure is about a URL gone
        if result.checked and not result.incremental:
            log.warning("tunnel %s: %s", self._provider.name, result.describe())
        else:
            log.info("tunnel %s: %s", self._provider.name, result.describe())
        self._status = replace(status, streaming=result)
        self._tell_listeners()

    async def _cancel_stream_check(self) -> None:
        task, self._streaming = self._streaming, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})
