"""The connection to LM Studio: one pooled session, and upstream failures turned into advice."""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from tray_app.config.settings import Config
from tray_app.gateway.api_errors import ApiError

UPSTREAM_SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)


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


def unreachable(upstream_url: str) -> ApiError:
    return ApiError(
        502,
        f"LM Studio is not reachable at {upstream_url}. Start its server (LM Studio → Developer → "
        "Start Server, or `lms server start`) and check that LM Gate's upstream.url matches.",
        type="upstream_error",
        code="upstream_unreachable",
    )


def timed_out(config: Config) -> ApiError:
    return ApiError(
        504,
        f"LM Studio did not answer within {config.upstream_idle_timeout:g} s "
        "(upstream.idle_timeout). A large prompt may need a longer idle timeout.",
        type="upstream_error",
        code="upstream_timeout",
    )


def rejected_our_credentials(status: int) -> ApiError:
    return ApiError(
        502,
        f"LM Studio refused LM Gate's request ({status}): it requires authentication. Create an "
        "API token in LM Studio's server settings and give it to LM Gate as the LM Studio token.",
        type="upstream_error",
        code="upstream_auth_failed",
    )


def translate_client_error(exc: BaseException, config: Config) -> ApiError:
    """Map an aiohttp client failure (before any response byte was relayed) to an ApiError."""
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return timed_out(config)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return unreachable(config.upstream_url)
    return ApiError(
        502,
        f"The connection to LM Studio failed: {type(exc).__name__}. Check that LM Studio's "
        "server is running and healthy.",
        type="upstream_error",
        code="upstream_failed",
    )


def response_too_large(limit: int) -> ApiError:
    # Built only when raised: the error is rare and its message is not free.
    return ApiError(
        502,
        f"LM Studio's response was larger than {limit} bytes (limits.max_response_bytes).",
        type="upstream_error",
        code="upstream_response_too_large",
    )


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
                raise response_too_large(limit)
            if inflater.eof:
                return decoded
    raise ApiError(
        502,
        f"LM Studio sent an undecodable body (Content-Encoding: {encoding}).",
        type="upstream_error",
        code="upstream_bad_response",
    )


def looks_like_openai_error(body: bytes) -> bool:
    if len(body) > 64 * 1024:
        return False  # no error message is that long; not worth parsing on the event loop
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    return isinstance(payload, dict) and isinstance(payload.get("error"), dict | str)
