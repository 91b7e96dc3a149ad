"""``POST /stream-check``: a short SSE stream paced by the gateway itself, so that a client can
tell, through a tunnel, whether streamed answers arrive as they are written or in one piece
(Cloudflare's quick tunnels buffer some event streams). LM Studio is never asked.

The pacing (:mod:`tray_app.stream_pacing`) is shared with the tunnel's check, which judges
what arrived against it. Callers are the gateway's own per-process probe token (made here,
accepted on this route only) or any valid credential, through the gateway's authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
from collections.abc import Callable, Mapping

from aiohttp import web

from tray_app.clock import Clock
from tray_app.gateway.api_errors import REQUEST_ID_HEADER, ApiError
from tray_app.gateway.body_rules import parse_json_object
from tray_app.stream_pacing import EVENTS, INTERVAL_SECONDS

# Its body is empty or a small JSON object: nothing in it is read.
MAX_BODY_BYTES = 4096
# Whom the probe token's requests are counted as: no credential's name has a space.
PROBE_CALLER = "LM Gate stream check"
HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # nginx (and ngrok's edge) must not buffer it: finding out whether something does is the
    # point, and the gateway's own hop must not be that something.
    "X-Accel-Buffering": "no",
}
DONE = b"data: [DONE]\n\n"


def new_probe_token() -> str:
    """A fresh token for one gateway process; it never leaves the process but to its own
    tunnel check."""
    return secrets.token_urlsafe(32)


def carries_probe_token(headers: Mapping[str, str], token: str) -> bool:
    """Whether the request's bearer is ``token``, compared in constant time."""
    scheme, _, value = headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


def check_body(raw: bytes) -> None:
    """Empty, or a JSON object (else the catalogue's invalid_body errors)."""
    if raw.strip():
        parse_json_object(raw)


def event(number: int) -> bytes:
    return f"data: {json.dumps({'n': number, 'of': EVENTS})}\n\n".encode()


async def answer(
    request: web.Request,
    request_id: str,
    clock: Clock,
    *,
    extra_headers: Mapping[str, str] | None = None,
    aborted: Callable[[], ApiError | None] = lambda: None,
) -> tuple[web.StreamResponse, int]:
    """Send the paced events and ``[DONE]``; the response and the bytes sent.

    Each event is due at a fixed offset from the first (no drift from slow writes). A client
    that leaves cancels the handler (the server runs with handler cancellation) or fails a
    write: either way nothing is left running. A cancel by LM Gate itself (a stop that will
    not wait) ends the stream with the error as its last event, as a relayed stream ends.
    """
    response = web.StreamResponse(status=200, headers=HEADERS)
    response.headers[REQUEST_ID_HEADER] = request_id
    if extra_headers:
        response.headers.update(extra_headers)
    sent = 0
    try:
        await response.prepare(request)
        start = clock.monotonic()
        for number in range(1, EVENTS + 1):
            wait = start + (number - 1) * INTERVAL_SECONDS - clock.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            data = event(number)
            await response.write(data)
            sent += len(data)
        await response.write(DONE)
        sent += len(DONE)
    except ConnectionResetError:
        pass  # the client left mid-stream: nothing more to send, nothing left running
    except asyncio.CancelledError:
        error = aborted()
        task = asyncio.current_task()
        if error is None or task is None or not response.prepared:
            raise  # the client left (or nothing was sent yet: the gateway answers the error)
        task.uncancel()
        with contextlib.suppress(ConnectionResetError):
            await response.write(error.sse_event(request_id))
    return response, sent
