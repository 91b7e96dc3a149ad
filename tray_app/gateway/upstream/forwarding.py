"""Forwarding an allowed, authenticated request to LM Studio and relaying the answer."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from aiohttp import web

from tray_app.config.settings import Config
from tray_app.gateway import api_errors as errors
from tray_app.gateway.api_errors import REQUEST_ID_HEADER
from tray_app.gateway.fair_queue import Notify
from tray_app.gateway.headers import client_response_headers, upstream_request_headers
from tray_app.gateway.routes import Route
from tray_app.gateway.upstream.answers import (
    TooLargeToParse,
    looks_like_json_object,
    parse_bounded,
    usage_in_tail,
)
from tray_app.gateway.upstream.client import (
    NOT_SENT,
    UPSTREAM_SESSION,
    decode_body,
    looks_like_openai_error,
    translate_client_error,
)
from tray_app.gateway.upstream.streaming import StreamRelay
from tray_app.gateway.upstream.usage import Usage, usage_from_payload
from tray_app.identity.principal import Principal

MODEL_LIST = "/v1/models"
# Larger bodies (images) go out in chunks so one request cannot stall the event loop.
_INLINE_BODY_BYTES = 1024 * 1024


class Outcome:
    """What the access log, metrics and accounting learn from one forwarded request."""

    __slots__ = ("bytes_out", "error", "relay", "sent", "status", "upstream", "usage")

    def __init__(self) -> None:
        self.upstream: aiohttp.ClientResponse | None = None
        # The request went to LM Studio and was not refused at the door: from then on it
        # may be generating, answer headers or not (a non-streamed answer has none until
        # it is done), so a budget pays for it even if the client hangs up first.
        self.sent = False
        self.relay: StreamRelay | None = None
        self.status = 0
        self.bytes_out = 0
        self.usage: Usage | None = None
        self.error: str | None = None


class Forwarder:
    def __init__(self, config: Config, is_stopping: Callable[[], bool]) -> None:
        self._config = config
        self.upstream_url = config.upstream_url
        self._is_stopping = is_stopping
        self.lmstudio_token: str | None = None

    def _headers(self, request: web.Request, request_id: str) -> Mapping[str, str]:
        return upstream_request_headers(
            request.headers, request_id=request_id, lmstudio_token=self.lmstudio_token
        )

    async def post(
        self,
        request: web.Request,
        request_id: str,
        route: Route,
        body: bytes,
        *,
        stream: bool,
        outcome: Outcome,
        extra_headers: Mapping[str, str] | None,
        hide_usage: bool,
        observer: Callable[[bytes], None] | None = None,
        wait_turn: Callable[[Notify | None], Awaitable[None]] | None = None,
    ) -> web.StreamResponse:
        """``wait_turn`` (the fair queue) is awaited just before LM Studio is asked: for a
        stream inside the relay's opening, so that an abort cancels the wait too, and told how
        to give the client its place; the ApiError it may raise is then an SSE error event once
        a notice has committed the stream."""
        headers = self._headers(request, request_id)
        url = self.upstream_url + route.path
        session = request.app[UPSTREAM_SESSION]
        data: bytes | io.BytesIO = body if len(body) <= _INLINE_BODY_BYTES else io.BytesIO(body)

        def send() -> Awaitable[aiohttp.ClientResponse]:
            return session.request(
                route.method, url, data=data, headers=headers, allow_redirects=False
            )

        if not stream:
            if wait_turn is not None:
                await wait_turn(None)
            upstream = await self._open(send, outcome)
            outcome.upstream = upstream
            return await self._read_into_response(upstream, request_id, outcome)

        def remember(upstream: aiohttp.ClientResponse) -> None:
            outcome.upstream = upstream

        relay = outcome.relay = StreamRelay(
            request,
            request_id,
            config=self._config,
            on_upstream=remember,
            read_whole=lambda upstream: self._read_into_response(upstream, request_id, outcome),
            is_stopping=self._is_stopping,
            extra_headers=extra_headers,
            hide_usage=hide_usage,
            observer=observer,
        )

        async def open_stream() -> aiohttp.ClientResponse:
            if wait_turn is not None:
                await wait_turn(relay.notify)
            return await self._open(send, outcome)

        try:
            return await relay.run(open_stream)
        finally:
            # Also when the client hung up (aiohttp cancels us): the log counts what was sent.
            outcome.status = relay.status
            outcome.bytes_out = relay.bytes_out
            # A stream LM Studio answered whole (JSON) has its usage from _whole_response.
            outcome.usage = relay.usage or outcome.usage
            outcome.error = relay.error

    async def models(
        self,
        request: web.Request,
        request_id: str,
        route: Route,
        principal: Principal,
        outcome: Outcome,
    ) -> web.StreamResponse:
        headers = self._headers(request, request_id)
        session = request.app[UPSTREAM_SESSION]
        upstream = await self._open(
            lambda: session.request(
                "GET", self.upstream_url + route.path, headers=headers, allow_redirects=False
            )
        )
        outcome.upstream = upstream
        data = await self._read_whole(upstream)
        if upstream.status == 200 and principal.models is not None:
            limit = self._config.limits_max_response_bytes
            data = _filter_models(
                decode_body(data, upstream.headers.get("Content-Encoding"), limit), principal
            )
            response = web.Response(status=200, body=data, content_type="application/json")
            response.headers[REQUEST_ID_HEADER] = request_id
            return response
        return self._whole_response(upstream, data, request_id, outcome)

    async def model(
        self,
        request: web.Request,
        request_id: str,
        model_id: str,
        principal: Principal,
        outcome: Outcome,
    ) -> web.StreamResponse:
        """``GET /v1/models/{model}``: the entry from the caller's own filtered list. A model
        LM Studio has but the caller may not use gets the same 404 as one that does not exist."""
        headers = self._headers(request, request_id)
        session = request.app[UPSTREAM_SESSION]
        upstream = await self._open(
            lambda: session.request(
                "GET", self.upstream_url + MODEL_LIST, headers=headers, allow_redirects=False
            )
        )
        outcome.upstream = upstream
        data = await self._read_whole(upstream)
        if upstream.status != 200:
            return self._whole_response(upstream, data, request_id, outcome)
        limit = self._config.limits_max_response_bytes
        listed = _listed_models(decode_body(data, upstream.headers.get("Content-Encoding"), limit))
        for entry in listed["data"]:
            if entry["id"] == model_id and principal.may_use_model(model_id):
                return web.json_response(entry, headers={REQUEST_ID_HEADER: request_id})
        raise errors.model_not_found(model_id)

    async def _open(
        self,
        send: Callable[[], Awaitable[aiohttp.ClientResponse]],
        outcome: Outcome | None = None,
    ) -> aiohttp.ClientResponse:
        if outcome is not None:
            outcome.sent = True
        try:
            upstream = await send()
        except (TimeoutError, aiohttp.ClientError) as exc:
            if outcome is not None and isinstance(exc, NOT_SENT):
                outcome.sent = False
            raise translate_client_error(exc, self._config) from None
        if upstream.status in {401, 403}:
            upstream.release()
            if outcome is not None:
                outcome.sent = False  # refused at the door: nothing generated
            raise errors.upstream_auth_failed(upstream.status)
        if 300 <= upstream.status < 400:
            # Never followed: a redirect could point LM Gate at LM Studio's native API or at
            # another host, past every route rule. Nor relayed: it is not an answer.
            upstream.close()
            if outcome is not None:
                outcome.sent = False
            raise errors.upstream_redirect(upstream.status)
        return upstream

    async def _read_into_response(
        self, upstream: aiohttp.ClientResponse, request_id: str, outcome: Outcome
    ) -> web.Response:
        data = await self._read_whole(upstream)
        return self._whole_response(upstream, data, request_id, outcome)

    async def _read_whole(self, upstream: aiohttp.ClientResponse) -> bytes:
        limit = self._config.limits_max_response_bytes
        try:
            if upstream.content_length is not None and upstream.content_length > limit:
                raise errors.upstream_response_too_large(limit)
            parts: list[bytes] = []
            size = 0
            async for chunk in upstream.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise errors.upstream_response_too_large(limit)
                parts.append(chunk)
        except BaseException as exc:
            upstream.close()
            if isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError):
                if self._is_stopping():
                    raise errors.shutting_down() from None
                raise translate_client_error(exc, self._config) from None
            raise
        upstream.release()
        return b"".join(parts)

    def _whole_response(
        self, upstream: aiohttp.ClientResponse, data: bytes, request_id: str, outcome: Outcome
    ) -> web.Response:
        headers = client_response_headers(upstream.headers)
        headers[REQUEST_ID_HEADER] = request_id
        status = upstream.status
        if status >= 400 and not looks_like_openai_error(data):
            # Keep LM Studio's status (a 5xx passes through) but give clients the error shape.
            snippet = data[:300].decode("utf-8", errors="replace").strip()
            raise errors.upstream_status(status, snippet)
        if status < 300:
            outcome.usage = _usage_of_json_answer(
                data,
                upstream.headers.get("Content-Encoding"),
                status,
                self._config.limits_max_response_bytes,
            )
        return web.Response(status=status, body=data, headers=headers)


def _usage_of_json_answer(
    data: bytes, encoding: str | None, status: int, limit: int
) -> Usage | None:
    """Every forwarded endpoint answers JSON: anything else from LM Studio is a broken answer
    the caller should hear about as such, not a body their SDK chokes on."""
    text = decode_body(data, encoding, limit)
    try:
        return usage_from_payload(parse_bounded(text))
    except TooLargeToParse:
        if looks_like_json_object(text):
            return usage_from_payload({"usage": usage_in_tail(text)})
    except ValueError:
        pass
    snippet = data[:200].decode("utf-8", errors="replace").strip()
    raise errors.upstream_not_json(status, snippet)


def _filter_models(data: bytes, principal: Principal) -> bytes:
    payload = _listed_models(data)
    payload["data"] = [entry for entry in payload["data"] if principal.may_use_model(entry["id"])]
    return json.dumps(payload).encode()


def _listed_models(data: bytes) -> dict[str, Any]:
    """LM Studio's model list with only well-formed entries (objects with a string ``id``)."""
    try:
        payload: dict[str, Any] = parse_bounded(data)
        entries = payload["data"]
        if not isinstance(entries, list):
            raise TypeError
    except TooLargeToParse:
        raise errors.model_list_too_large(len(data)) from None
    except (ValueError, KeyError, TypeError):
        raise errors.model_list_malformed() from None
    payload["data"] = [
        entry for entry in entries if isinstance(entry, dict) and isinstance(entry.get("id"), str)
    ]
    return payload
