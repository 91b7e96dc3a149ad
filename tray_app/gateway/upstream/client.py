"""The connection to LM Studio: one pooled session, and upstream failures turned into advice."""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from tray_app.config.settings import Config
from tray_app.gateway import api_errors as errors
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.upstream.failures import describe_failure

UPSTREAM_SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)
# Failures that mean no request byte reached the server: nothing can have been generated, so
# the request costs nothing and may be sent elsewhere.
NOT_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


def upstream_timeout(config: Config) -> aiohttp.ClientTimeout:
    # No total timeout: a long generation is not a dead one. sock_read is the idle timeout.
    return aiohttp.ClientTimeout(
        total=None,
        sock_connect=config.upstream_connect_timeout,
        sock_read=config.upstream_idle_timeout,
    )


def session_context(config: Config) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` entry owning the app's single upstream ``ClientSession``."""

    async def upstream_session(app: web.Application) -> AsyncIterator[None]:
        # limit=0: streams hold connections for minutes; concurrency is capped per principal.
        connector = aiohttp.TCPConnector(limit=0, enable_cleanup_closed=False)
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=upstream_timeout(config),
            auto_decompress=False,
            trust_env=False,
        )
        app[UPSTREAM_SESSION] = session
        try:
            yield
        finally:
            await session.close()

    return upstream_session


def translate_client_error(exc: BaseException, config: Config) -> ApiError:
    """Map an aiohttp client failure (before any response byte was relayed) to the caller's
    ApiError, which names no address: the caller is not told where the owner's machines are
    (the forwarder logs it for the owner)."""
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return errors.upstream_timeout(config.upstream_idle_timeout)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return errors.upstream_unreachable()
    return errors.upstream_failed(describe_failure(exc))


def decode_body(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """Undo a Content-Encoding LM Studio used despite ``Accept-Encoding: identity``, to at
    most ``limit`` bytes: a few hundred compressed KB can expand to gigabytes."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in {"", "identity"}:
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is not None:
        inflater = zlib.decompressobj(wbits)
        try:
            decoded = inflater.decompress(body, limit + 1)
        except zlib.error:
            pass
        else:
            if len(decoded) > limit:
                raise errors.upstream_response_too_large(limit)
            if inflater.eof:
                return decoded
    raise errors.upstream_undecodable(encoding)


def looks_like_openai_error(body: bytes) -> bool:
    if len(body) > 64 * 1024:
        return False  # no error message is that long; not worth parsing on the event loop
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    return isinstance(payload, dict) and isinstance(payload.get("error"), dict | str)
