"""Whether a public URL streams: ``POST /stream-check`` through it, and when each event came.

The gateway paces that stream itself (:mod:`tray_app.stream_pacing`: a few events a fixed
interval apart), so what arrives says what the path in between does with a stream: events
that arrive spread out as they were sent are streamed; events that arrive together were held
until the answer was complete (Cloudflare's quick tunnels do that with some event streams),
and then people see each answer only when it is finished.

The verdict compares the spread of the arrivals with the server's own pacing, not latency:
a slow or distant tunnel delays every event alike and still spreads them out, while a
buffering one delivers them within a read or two of each other, however fast it is.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass

import aiohttp

from tray_app.stream_pacing import EVENTS, PATH, SPAN_SECONDS

HEADERS = {"ngrok-skip-browser-warning": "1"}
# Streamed: the arrivals span at least this share of the server's pacing span. Half leaves
# room for a tunnel that coalesces a few events, and is far from the few milliseconds over
# which a buffered answer's events arrive.
SPREAD_SHARE = 0.5
MESSAGE_CHARS = 100
# What to do about a tunnel that buffers: the others pass POST streams as they are written.
BUFFERED_FIX = (
    "For answers that appear as they are written, use ngrok, Tailscale or a named tunnel."
)


@dataclass(frozen=True, slots=True)
class StreamCheck:
    """What the check found; ``problem`` set (and the figures empty or partial) when it
    could not tell."""

    incremental: bool = False
    first_chunk_ms: float | None = None
    largest_gap_ms: float | None = None
    chunks: int = 0
    problem: str = ""

    @property
    def checked(self) -> bool:
        return not self.problem

    def describe(self) -> str:
        """One sentence for people."""
        if self.problem:
            return f"Could not check whether this tunnel streams: {self.problem}."
        first = f"first chunk after {self.first_chunk_ms or 0:.0f} ms"
        if self.incremental:
            return f"Streams: {first}, largest gap {self.largest_gap_ms or 0:.0f} ms."
        return (
            "This tunnel delivers streamed answers in one piece: people see each answer only "
            f"when it is finished ({first}, {self.chunks} chunks at once). {BUFFERED_FIX}"
        )


def judge(arrivals: list[float], started: float) -> StreamCheck:
    """The verdict on the monotonic arrival times of the stream's events (all of them)."""
    first = (arrivals[0] - started) * 1000
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    spread = arrivals[-1] - arrivals[0]
    return StreamCheck(
        incremental=spread >= SPAN_SECONDS * SPREAD_SHARE,
        first_chunk_ms=first,
        largest_gap_ms=max(gaps) * 1000 if gaps else None,
        chunks=len(arrivals),
    )


async def check_stream(url: str, token: str, *, seconds: float = 15.0) -> StreamCheck:
    """Ask ``url`` for the paced stream with ``token`` and judge it. Never raises for the
    network or the answer: a :class:`StreamCheck` with ``problem`` says what went wrong."""
    headers = {**HEADERS, "Authorization": f"Bearer {token}"}
    arrivals: list[float] = []
    done = False
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds)) as session:
            started = time.monotonic()
            async with session.post(url.rstrip("/") + PATH, headers=headers, json={}) as r:
                if r.status != 200:
                    return StreamCheck(problem=await _refusal(r))
                if not r.headers.get("Content-Type", "").startswith("text/event-stream"):
                    return StreamCheck(problem="the answer was not an event stream")
                async for line in r.content:
                    if not line.startswith(b"data:"):
                        continue
                    if line.strip() == b"data: [DONE]":
                        done = True
                        break
                    arrivals.append(time.monotonic())
                    if len(arrivals) > EVENTS:
                        break  # not the paced answer: nothing more is worth reading
    except TimeoutError:
        return StreamCheck(chunks=len(arrivals), problem=f"no complete answer within {seconds:g} s")
    except aiohttp.ClientError as exc:
        return StreamCheck(chunks=len(arrivals), problem=_why(exc))
    if not done or len(arrivals) != EVENTS:
        return StreamCheck(
            chunks=len(arrivals),
            problem=f"the stream ended after {len(arrivals)} of {EVENTS} events",
        )
    return judge(arrivals, started)


async def _refusal(response: aiohttp.ClientResponse) -> str:
    """An error answer as its status, code and message (OpenAI's shape)."""
    try:
        body = await response.json(content_type=None)
    except (aiohttp.ClientError, ValueError):
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("code"):
        message = " ".join(str(error.get("message") or "").split())
        if len(message) > MESSAGE_CHARS:
            message = message[:MESSAGE_CHARS].rsplit(" ", 1)[0] + " …"
        return f"answered {response.status} {error['code']}: {message}".rstrip(": ")
    return f"answered {response.status}"


def _why(exc: aiohttp.ClientError) -> str:
    """A network failure in words, without class names."""
    # Exactly the class: its TLS subclasses carry no os_error.
    number = exc.os_error.errno if type(exc) is aiohttp.ClientConnectorError else None
    if number is not None and number > 0:
        return f"not reachable: {os.strerror(number).lower()}"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "not reachable: the host name does not resolve"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "not reachable: the TLS connection failed"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the connection closed before the answer was complete"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the answer was cut off"
    if isinstance(exc, aiohttp.InvalidURL):
        return "the URL is not valid"
    return "the request failed"
