"""Forwarding an allowed, authenticated request to LM Studio and relaying the answer."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from tray_app.clock import SystemClock
from tray_app.config.settings import Config
from tray_app.gateway import api_errors as errors
from tray_app.gateway.api_errors import REQUEST_ID_HEADER, ApiError
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
from tray_app.gateway.upstream.failures import describe_failure
from tray_app.gateway.upstream.pool import Upstream, UpstreamPool, specs_of
from tray_app.gateway.upstream.routing import Router
from tray_app.gateway.upstream.streaming import StreamRelay
from tray_app.gateway.upstream.usage import Usage, usage_from_payload
from tray_app.identity.principal import Principal

log = logging.getLogger("lmgate.upstreams")
MODEL_LIST = "/v1/models"
# Larger bodies (images) go out in chunks so one request cannot stall the event loop.
_INLINE_BODY_BYTES = 1024 * 1024


class Outcome:
    """What the access log, metrics and accounting learn from one forwarded request."""

    __slots__ = (
        "bytes_out",
        "error",
        "relay",
        "routed",
        "sent",
        "served_by",
        "status",
        "upstream",
        "usage",
    )

    def __init__(self) -> None:
        self.upstream: aiohttp.ClientResponse | None = None
        # The upstream the router chose, counted busy until the forwarder is done with it.
        self.routed: Upstream | None = None
        self.served_by: str | None = None  # its name, for the access log
        # The request went to LM Studio and was not refused at the door: from then on it
        # may be generating, answer headers or not (a non-streamed answer has none until
        # it is done), so a budget pays for it even if the client hangs up first.
        self.sent = False
        self.relay: StreamRelay | None = None
        self.status = 0
        self.bytes_out = 0
        self.usage: Usage | None = None
        self.error: str | None = None


class WaitTurn(Protocol):
    """The fair queue's (and model guard's) wait, awaited just before ``upstream`` is asked;
    awaited again with the other upstream when a retry goes elsewhere."""

    def __call__(self, notify: Notify | None, upstream: str) -> Awaitable[None]: ...


class Forwarder:
    """Sends a request to the upstream the router picks, with that upstream's own token, and
    relays its answer. ``tokens``: each upstream's API token by name (read once: a keyring
    lookup per request would cost milliseconds)."""

    def __init__(
        self,
        config: Config,
        is_stopping: Callable[[], bool],
        router: Router | None = None,
        tokens: Mapping[str, str | None] | None = None,
    ) -> None:
        self._config = config
        self._is_stopping = is_stopping
        self.router = router or Router(UpstreamPool(specs_of(config), SystemClock()))
        self._tokens = dict(tokens or {})
        # What the one-upstream paths (the phone's default model, /readyz) ask.
        self._first = next(iter(self.router.pool))
        self.lmstudio_token = self._tokens.get(self._first.name)

    @property
    def upstream_url(self) -> str:
        """The one upstream's URL, for what asks it directly (the phone's default model);
        ApiError (503) when the owner switched it off: it is sent nothing."""
        return self._only_enabled().spec.url

    def token_of(self, upstream: str) -> str | None:
        return self._tokens.get(upstream)

    def set_token(self, upstream: str, token: str | None) -> None:
        """Use ``token`` for ``upstream`` from the next request on (one changed in the
        secret store while the gateway runs)."""
        self._tokens[upstream] = token
        if upstream == self._first.name:
            self.lmstudio_token = token

    @property
    def several(self) -> bool:
        return self.router.pool.several

    def models_known(self) -> list[str]:
        """The models the usable upstreams' probes found, those loaded somewhere first
        (what the phone's chat picks a default from when there are several upstreams)."""
        loaded: dict[str, None] = {}
        rest: dict[str, None] = {}
        for upstream in self.router.pool:
            if not upstream.usable:
                continue
            for model in sorted(upstream.models or ()):
                if upstream.loaded is not None and model in upstream.loaded:
                    loaded[model] = None
                else:
                    rest[model] = None
        return [*loaded, *(m for m in rest if m not in loaded)]

    def _headers(self, request: web.Request, request_id: str, upstream: str) -> Mapping[str, str]:
        return upstream_request_headers(
            request.headers, request_id=request_id, lmstudio_token=self._tokens.get(upstream)
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
        wait_turn: WaitTurn | None = None,
        caller: str = "",
        model: str | None = None,
    ) -> web.StreamResponse:
        """``wait_turn`` (the fair queue) is awaited just before an upstream is asked: for a
        stream inside the relay's opening, so that an abort cancels the wait too, and told how
        to give the client its place; the ApiError it may raise is then an SSE error event once
        a notice has committed the stream. ``caller`` and ``model`` keep a conversation on the
        upstream that served it."""
        session = request.app[UPSTREAM_SESSION]
        inline = len(body) <= _INLINE_BODY_BYTES
        path, method = route.path, route.method
        sent_headers: dict[str, Mapping[str, str]] = {}

        def attempt(
            notify: Notify | None,
        ) -> Callable[[Upstream], Awaitable[aiohttp.ClientResponse]]:
            async def send(upstream: Upstream) -> aiohttp.ClientResponse:
                name = upstream.name
                if wait_turn is not None:
                    await wait_turn(notify, name)
                headers = sent_headers.get(name)
                if headers is None:
                    headers = sent_headers[name] = self._headers(request, request_id, name)
                # A fresh reader per try: a retry sends the whole body again.
                data: bytes | io.BytesIO = body if inline else io.BytesIO(body)
                outcome.sent = True
                return await session.request(
                    method,
                    upstream.spec.url + path,
                    data=data,
                    headers=headers,
                    allow_redirects=False,
                )

            return send

        try:
            if not stream:
                upstream = await self._open(attempt(None), outcome, caller, model)
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

            def open_stream() -> Awaitable[aiohttp.ClientResponse]:
                return self._open(attempt(relay.notify), outcome, caller, model)

            try:
                return await relay.run(open_stream)
            finally:
                # Also when the client hung up (aiohttp cancels us): the log counts what was sent.
                outcome.status = relay.status
                outcome.bytes_out = relay.bytes_out
                # A stream LM Studio answered whole (JSON) has its usage from _whole_response.
                outcome.usage = relay.usage or outcome.usage
                outcome.error = relay.error
        finally:
            chosen = outcome.routed
            if chosen is not None:
                outcome.routed = None
                self.router.done(chosen)

    async def models(
        self,
        request: web.Request,
        request_id: str,
        route: Route,
        principal: Principal,
        outcome: Outcome,
    ) -> web.StreamResponse:
        """``GET /v1/models``: with one upstream its own answer (filtered for the caller);
        with several, the union of what their probes found."""
        if self.several:
            listed = self._union_of_lists()
            return web.json_response(
                _filtered(listed, principal), headers={REQUEST_ID_HEADER: request_id}
            )
        upstream = await self._get_list(request, request_id, self._only_enabled())
        outcome.upstream = upstream
        data = await self._read_whole(upstream)
        if upstream.status == 200 and principal.models is not None:
            limit = self._config.limits_max_response_bytes
            data = json.dumps(
                _filtered(
                    _listed_models(
                        decode_body(data, upstream.headers.get("Content-Encoding"), limit)
                    ),
                    principal,
                )
            ).encode()
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
        if self.several:
            listed = self._union_of_lists()
        else:
            upstream = await self._get_list(request, request_id, self._only_enabled())
            outcome.upstream = upstream
            data = await self._read_whole(upstream)
            if upstream.status != 200:
                return self._whole_response(upstream, data, request_id, outcome)
            limit = self._config.limits_max_response_bytes
            listed = _listed_models(
                decode_body(data, upstream.headers.get("Content-Encoding"), limit)
            )
        for entry in listed["data"]:
            if entry["id"] == model_id and principal.may_use_model(model_id):
                return web.json_response(entry, headers={REQUEST_ID_HEADER: request_id})
        raise errors.model_not_found(model_id)

    async def _get_list(
        self, request: web.Request, request_id: str, upstream: Upstream
    ) -> aiohttp.ClientResponse:
        session = request.app[UPSTREAM_SESSION]
        try:
            answer = await session.request(
                "GET",
                upstream.spec.url + MODEL_LIST,
                headers=self._headers(request, request_id, upstream.name),
                allow_redirects=False,
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            _log_unreached(upstream, exc)
            raise translate_client_error(exc, self._config) from None
        return self._checked(answer)

    def _only_enabled(self) -> Upstream:
        """The one upstream, unless the owner switched it off: then it is sent nothing."""
        if not self._first.spec.enabled:
            raise errors.no_upstream_enabled()
        return self._first

    def _union_of_lists(self) -> dict[str, Any]:
        """Every usable upstream's models, as its last probe listed them, each once: no
        request asks every machine (a caller cannot turn /v1/models into load on all of
        them, nor a hostile machine's huge list into work per call). Entries name no
        machine: which ones there are is the owner's business."""
        pool = self.router.pool
        if not pool.any_enabled:
            raise errors.no_upstream_enabled()
        if not any(upstream.usable and upstream.models is not None for upstream in pool):
            raise errors.no_upstream(None)
        return {
            "object": "list",
            "data": [
                {"id": model, "object": "model", "owned_by": "organization_owner"}
                for model in sorted(pool.models())
            ],
        }

    async def _open(
        self,
        send: Callable[[Upstream], Awaitable[aiohttp.ClientResponse]],
        outcome: Outcome,
        caller: str,
        model: str | None,
    ) -> aiohttp.ClientResponse:
        tried: list[Upstream] = []

        def sending(upstream: Upstream) -> Awaitable[aiohttp.ClientResponse]:
            tried.append(upstream)
            return send(upstream)

        try:
            chosen, upstream = await self.router.send(caller, model, sending)
        except (TimeoutError, aiohttp.ClientError) as exc:
            if isinstance(exc, NOT_SENT):
                outcome.sent = False
            if tried:
                _log_unreached(tried[-1], exc)
            if self.several and isinstance(exc, aiohttp.ClientConnectorError):
                raise errors.no_upstream(model) from None
            raise translate_client_error(exc, self._config) from None
        except ApiError as exc:
            if exc.code != "upstream_unreachable":
                raise
            # The one place every forwarded request's errors pass: whatever raised it (the
            # model guard's reads name the server they asked), the caller learns no address.
            if self.several:
                raise errors.no_upstream(model) from None
            raise errors.upstream_unreachable() from None
        outcome.routed = chosen
        outcome.served_by = chosen.name
        try:
            return self._checked(upstream)
        except ApiError:
            outcome.sent = False  # refused at the door: nothing generated
            raise

    @staticmethod
    def _checked(upstream: aiohttp.ClientResponse) -> aiohttp.ClientResponse:
        if upstream.status in {401, 403}:
            upstream.release()
            raise errors.upstream_auth_failed(upstream.status)
        if 300 <= upstream.status < 400:
            # Never followed: a redirect could point LM Gate at LM Studio's native API or at
            # another host, past every route rule. Nor relayed: it is not an answer.
            upstream.close()
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
            content = upstream.content
            if content.is_eof() and content.exception() is None:
                # The whole answer came with its headers (a short one usually does).
                data = content.read_nowait(-1)
                if len(data) > limit:
                    raise errors.upstream_response_too_large(limit)
                upstream.release()
                return data
            parts: list[bytes] = []
            size = 0
            async for chunk in content.iter_any():
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


def _filtered(payload: dict[str, Any], principal: Principal) -> dict[str, Any]:
    if principal.models is None:
        return payload
    allowed = [entry for entry in payload["data"] if principal.may_use_model(entry["id"])]
    return {**payload, "data": allowed}


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


def _log_unreached(upstream: Upstream, exc: BaseException) -> None:
    # The owner's record of where: the caller's answer names no address.
    log.warning(
        "a request to upstream %s at %s failed: %s",
        upstream.name,
        upstream.spec.url,
        describe_failure(exc),
    )
