"""Who holds the gateway's port when the tray cannot bind it: another LM Gate (of another user
or session, whose /healthz answers as ours does) or some other program. The tray then says
which, and runs on a free loopback port instead of stopping at an error."""

from __future__ import annotations

import asyncio
import http.client
import json

from tray_app.gateway.api_errors import REQUEST_ID_HEADER

HEALTH_TIMEOUT = 2.0


async def lmgate_answers(host: str, port: int) -> bool:
    """True when an LM Gate answers at ``host:port``: its /healthz says ``{"status": "ok"}``
    and carries a request id, as every answer of the gateway does. (A plain blocking request
    in a worker thread: only the gateway holds an HTTP client library.)"""
    return await asyncio.to_thread(_answers, host, port)


def _answers(host: str, port: int) -> bool:
    connection = http.client.HTTPConnection(host, port, timeout=HEALTH_TIMEOUT)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        body = json.loads(response.read(4096) or b"null")
        return (
            response.status == 200
            and body == {"status": "ok"}
            and response.getheader(REQUEST_ID_HEADER) is not None
        )
    except (OSError, http.client.HTTPException, ValueError):
        return False
    finally:
        connection.close()


def moved_port_note(host: str, taken: int, used: int, *, by_lmgate: bool) -> str:
    """What the tray says (message, log, Settings) after moving to another port."""
    if by_lmgate:
        return (
            f"Another LM Gate already runs at {host}:{taken} (another user or session); "
            f"this one uses port {used} instead."
        )
    return f"Port {taken} is taken by another program; LM Gate uses port {used} instead."
