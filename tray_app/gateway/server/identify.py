"""Whether a taken port is held by an LM Gate: then "the port is in use" is not a problem to
fix but a gateway already running, and the person should hear that instead."""

from __future__ import annotations

import secrets

import aiohttp

IDENTIFY_SECONDS = 2.0


def _url_host(host: str) -> str:
    if host in {"", "0.0.0.0", "::"}:  # listening everywhere: reachable on loopback
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


async def lmgate_listens(host: str, port: int, *, within: float = IDENTIFY_SECONDS) -> bool:
    """Whether what listens at ``host:port`` is LM Gate: its /healthz answers ``{"status":
    "ok"}`` and echoes the request ID it was sent, as LM Gate does on every answer."""
    marker = "lmgate-identify-" + secrets.token_hex(8)
    url = f"http://{_url_host(host)}:{port}/healthz"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=within)) as session,
            session.get(url, headers={"X-Request-ID": marker}, allow_redirects=False) as answer,
        ):
            body = await answer.content.read(256)
            echoed = answer.headers.get("X-Request-ID") == marker
            status = answer.status
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False
    return status == 200 and echoed and body.replace(b" ", b"") == b'{"status":"ok"}'
