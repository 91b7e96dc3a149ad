"""The gateway: an aiohttp application that authenticates, filters and relays to LM Studio.

One catch-all handler does the routing itself, on the normalised raw path, so that aiohttp's
router can never send an oddly encoded path somewhere the route table did not decide.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from tray_app.access_log import ACCESS_LOGGER, new_request_id
from tray_app.api_errors import REQUEST_ID_HEADER, ApiError
from tray_app.auth import Authenticator, Principal
from tray_app.body import prepare_body
from tray_app.clock import Clock, SystemClock
from tray_app.config import Config
from tray_app.errors import AuthError
from tray_app.headers import (
    client_response_headers,
    is_upgrade_request,
    sane_request_id,
    upstream_request_headers,
)
from tray_app.routes import Refusal, Route, RouteTable, normalise_path
from tray_app.secrets import LMSTUDIO_API_TOKEN, SecretStore
from tray_app.streaming import StreamRelay
from tray_app.upstream import (
    UPSTREAM_SESSION,
    decode_body,
    looks_like_openai_error,
    rejected_our_credentials,
    session_context,
    translate_client_error,
)
from tray_app.usage import Usage, usage_from_body

log = logging.getLogger("lmgate.gateway")
access_log = logging.getLogger(ACCESS_LOGGER)

READY_TIMEOUT = 5.0
_INLINE_BODY_BYTES = 1024 * 1024


@dataclass(slots=True, eq=False)  # identity hash: exchanges live in a set
class Exchange:
    """What the access log records about one request; filled in as the request proceeds."""

    request_id: str
    method: str
    started: float
    client: str | None
    path: str = "-"
    principal: str | None = None
    model: str | None = None
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    usage: Usage | None = None
    error: str | None = None
    stream: bool = False
    upstream: aiohttp.ClientResponse | None = field(default=None, repr=False)
    relay: StreamRelay | None = field(default=None, repr=False)
    task: asyncio.Task[object] | None = field(default=None, repr=False)
    aborted_by_stop: bool = False


def _not_found(refusal: Refusal) -> ApiError:
    headers = {"Allow": refusal.allow} if refusal.allow else None
    kind = "invalid_request_error"
    return ApiError(refusal.status, refusal.message, type=kind, code=refusal.code, headers=headers)


class Gateway:
    """Holds the parts (config, authenticator, secrets, clock) and serves requests with them."""

    def __init__(
        self,
        config: Config,
        authenticator: Authenticator,
        *,
        secrets: SecretStore,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self._auth = authenticator
        self._secrets = secrets
        self._clock: Clock = clock or SystemClock()
        enabled = frozenset(
            name
            for name, on in (
                ("routes.enable_responses", config.enable_responses),
                ("routes.enable_messages", config.enable_messages),
            )
            if on
        )
        self._routes = RouteTable(enabled)
        self._upstream_url = config.upstream_url
        # Read once: a keyring lookup per request would cost milliseconds.
        self._lmstudio_token = secrets.get(LMSTUDIO_API_TOKEN)
        self._inflight: set[Exchange] = set()
        self._stopping = False
        self._drained: asyncio.Event | None = None  # set when the last request ends after a stop
        self._own: dict[str, Callable[[web.Request, Exchange], Awaitable[web.StreamResponse]]] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
        }

    # ---- application wiring ---------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.cleanup_ctx.append(session_context(self.config))
        app.on_shutdown.append(self._on_shutdown)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    def reload_secrets(self) -> None:
        """Pick up a changed LM Studio token from the secret store."""
        self._lmstudio_token = self._secrets.get(LMSTUDIO_API_TOKEN)

    @property
    def inflight_count(self) -> int:
        return len(self._inflight)

    # ---- request handling -----------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        exchange = Exchange(
            request_id=sane_request_id(request.headers.get(REQUEST_ID_HEADER)) or new_request_id(),
            method=request.method,
            started=self._clock.monotonic(),
            client=request.remote,
        )
        exchange.task = asyncio.current_task()
        self._inflight.add(exchange)
        try:
            response = await self._handle(request, exchange)
        except ApiError as err:
            exchange.error = err.code
            response = err.to_response(exchange.request_id)
        except Exception:
            # A bug, not a request problem: keep serving, answer in the API's shape, and log
            # the traceback under the request ID the client was given.
            log.exception("internal error handling request %s", exchange.request_id)
            exchange.error = "internal_error"
            response = ApiError(
                500,
                f"LM Gate hit an internal error (request {exchange.request_id}); "
                "details are in its log.",
                type="server_error",
                code="internal_error",
            ).to_response(exchange.request_id)
        except asyncio.CancelledError:
            if exchange.aborted_by_stop and exchange.task is not None:
                # Our own shutdown cancelled a request still waiting for LM Studio; the
                # client is still there and gets a proper answer.
                exchange.task.uncancel()
                response = await self._answer_aborted(exchange)
                exchange.status = response.status
                self._log(exchange)
                return response
            # The client hung up; the finally clauses below us already closed LM Studio's side.
            exchange.status = exchange.status or 499
            exchange.error = exchange.error or "client_disconnected"
            self._log(exchange)
            raise
        finally:
            self._inflight.discard(exchange)
            if self._drained is not None and not self._inflight:
                self._drained.set()
        if not exchange.status:
            exchange.status = response.status
        if isinstance(response, web.Response) and response.body is not None:
            exchange.bytes_out = len(response.body)  # type: ignore[arg-type]
        self._log(exchange)
        return response

    async def _handle(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        path = normalise_path(request.raw_path)
        exchange.path = path if path is not None else "(refused)"
        if is_upgrade_request(request.headers):
            raise ApiError(
                404,
                "WebSocket and other protocol upgrades are not available through LM Gate.",
                type="invalid_request_error",
                code="upgrade_not_allowed",
            )
        if path is not None and path in self._own and request.method == "GET":
            return await self._own[path](request, exchange)
        resolved = self._routes.resolve(request.method, path)
        if isinstance(resolved, Refusal):
            raise _not_found(resolved)
        principal = self._authenticate(request)
        exchange.principal = principal.name
        if not principal.has_scope(resolved.scope):
            raise ApiError(
                403,
                f"This key may not use {resolved.path} (it lacks the '{resolved.scope}' scope).",
                type="permission_error",
                code="insufficient_scope",
            )
        if resolved.method == "GET":
            return await self._forward_models(request, exchange, resolved, principal)
        return await self._forward_post(request, exchange, resolved, principal)

    def _authenticate(self, request: web.Request) -> Principal:
        try:
            return self._auth.authenticate(request.headers, request.remote)
        except AuthError as exc:
            kind = "authentication_error" if exc.status == 401 else "permission_error"
            headers = {"WWW-Authenticate": 'Bearer realm="lmgate"'} if exc.status == 401 else None
            raise ApiError(
                exc.status, str(exc), type=kind, code=exc.code, headers=headers
            ) from None

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.config.max_body_bytes
        too_large = ApiError(
            413,
            f"The request body is larger than {limit} bytes (limits.max_body_bytes).",
            type="invalid_request_error",
            code="body_too_large",
        )
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large from None

    async def _forward_post(
        self, request: web.Request, exchange: Exchange, route: Route, principal: Principal
    ) -> web.StreamResponse:
        raw = await self._read_body(request)
        exchange.bytes_in = len(raw)
        body = prepare_body(route, raw)
        exchange.model = body.model
        exchange.stream = body.stream
        if body.model is not None and not principal.may_use_model(body.model):
            raise ApiError(
                403,
                f"This key may not use the model {body.model!r}.",
                type="permission_error",
                code="model_not_allowed",
                param="model",
            )
        headers = upstream_request_headers(
            request.headers, request_id=exchange.request_id, lmstudio_token=self._lmstudio_token
        )
        url = self._upstream_url + route.path
        session = request.app[UPSTREAM_SESSION]

        # Large bodies (images) go out in chunks so one request cannot stall the event loop.
        data = body.raw if len(body.raw) <= _INLINE_BODY_BYTES else io.BytesIO(body.raw)

        def send() -> Awaitable[aiohttp.ClientResponse]:
            return session.request(route.method, url, data=data, headers=headers)

        if body.stream:
            relay = exchange.relay = StreamRelay(
                request,
                exchange.request_id,
                config=self.config,
                on_upstream=self._track(exchange),
                read_whole=lambda upstream: self._read_into_response(upstream, exchange),
                is_stopping=lambda: self._stopping,
            )
            response = await relay.run(lambda: self._open(send))
            exchange.status = relay.status
            exchange.bytes_out = relay.bytes_out
            exchange.usage = relay.usage
            exchange.error = relay.error
            return response
        upstream = await self._open(send)
        exchange.upstream = upstream
        return await self._read_into_response(upstream, exchange)

    async def _read_into_response(
        self, upstream: aiohttp.ClientResponse, exchange: Exchange
    ) -> web.Response:
        data = await self._read_whole(upstream)
        return self._whole_response(upstream, data, exchange)

    async def _forward_models(
        self, request: web.Request, exchange: Exchange, route: Route, principal: Principal
    ) -> web.StreamResponse:
        headers = upstream_request_headers(
            request.headers, request_id=exchange.request_id, lmstudio_token=self._lmstudio_token
        )
        session = request.app[UPSTREAM_SESSION]
        upstream = await self._open(
            lambda: session.request("GET", self._upstream_url + route.path, headers=headers)
        )
        exchange.upstream = upstream
        data = await self._read_whole(upstream)
        if upstream.status == 200 and principal.models is not None:
            data = self._filter_models(
                decode_body(data, upstream.headers.get("Content-Encoding")), principal
            )
            response = web.Response(status=200, body=data, content_type="application/json")
            response.headers[REQUEST_ID_HEADER] = exchange.request_id
            return response
        return self._whole_response(upstream, data, exchange)

    @staticmethod
    def _filter_models(data: bytes, principal: Principal) -> bytes:
        try:
            payload = json.loads(data)
            entries = payload["data"]
            if not isinstance(entries, list):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise ApiError(
                502,
                "LM Studio's model list was not in the expected format.",
                type="upstream_error",
                code="upstream_bad_response",
            ) from None
        payload["data"] = [
            entry
            for entry in entries
            if isinstance(entry, dict)
            and isinstance(entry.get("id"), str)
            and principal.may_use_model(entry["id"])
        ]
        return json.dumps(payload).encode()

    def _track(self, exchange: Exchange) -> Callable[[aiohttp.ClientResponse], None]:
        def remember(upstream: aiohttp.ClientResponse) -> None:
            exchange.upstream = upstream

        return remember

    async def _open(
        self, send: Callable[[], Awaitable[aiohttp.ClientResponse]]
    ) -> aiohttp.ClientResponse:
        try:
            upstream = await send()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise translate_client_error(exc, self.config) from None
        if upstream.status in {401, 403}:
            upstream.release()
            raise rejected_our_credentials(upstream.status)
        return upstream

    async def _read_whole(self, upstream: aiohttp.ClientResponse) -> bytes:
        limit = self.config.max_response_bytes
        too_large = ApiError(
            502,
            f"LM Studio's response was larger than {limit} bytes (limits.max_response_bytes).",
            type="upstream_error",
            code="upstream_response_too_large",
        )
        try:
            if upstream.content_length is not None and upstream.content_length > limit:
                raise too_large
            parts: list[bytes] = []
            size = 0
            async for chunk in upstream.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise too_large
                parts.append(chunk)
        except BaseException as exc:
            upstream.close()
            if isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError):
                if self._stopping:
                    raise self._shutting_down() from None
                raise translate_client_error(exc, self.config) from None
            raise
        upstream.release()
        return b"".join(parts)

    def _whole_response(
        self, upstream: aiohttp.ClientResponse, data: bytes, exchange: Exchange
    ) -> web.Response:
        headers = client_response_headers(upstream.headers)
        headers[REQUEST_ID_HEADER] = exchange.request_id
        status = upstream.status
        if status >= 400 and not looks_like_openai_error(data):
            # Keep LM Studio's status (a 5xx passes through) but give clients the error shape.
            snippet = data[:300].decode("utf-8", errors="replace").strip()
            raise ApiError(
                status,
                f"LM Studio answered {status}: {snippet or '(no body)'}",
                type="upstream_error",
                code="upstream_error",
            )
        if status < 300 and "json" in upstream.headers.get("Content-Type", ""):
            exchange.usage = usage_from_body(data)
        return web.Response(status=status, body=data, headers=headers)

    # ---- the gateway's own endpoints ------------------------------------------------------

    async def _healthz(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        return web.json_response({"status": "ok"}, headers={REQUEST_ID_HEADER: exchange.request_id})

    async def _readyz(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        ready = await self.lmstudio_reachable(request.app[UPSTREAM_SESSION])
        return web.json_response(
            {"status": "ready" if ready else "unavailable"},
            status=200 if ready else 503,
            headers={REQUEST_ID_HEADER: exchange.request_id},
        )

    async def lmstudio_reachable(self, session: aiohttp.ClientSession) -> bool:
        token = self._lmstudio_token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            async with session.get(
                self._upstream_url + "/v1/models",
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=READY_TIMEOUT),
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    # ---- shutdown and logging -------------------------------------------------------------

    def _shutting_down(self) -> ApiError:
        return ApiError(
            503,
            "LM Gate is shutting down; try again in a moment.",
            type="server_error",
            code="shutting_down",
        )

    async def _on_shutdown(self, app: web.Application) -> None:
        """Let in-flight requests finish for ``shutdown_grace`` seconds, then close them."""
        self._stopping = True
        if self._inflight:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), self.config.shutdown_grace)
        for exchange in list(self._inflight):
            if exchange.upstream is not None:
                # The relay or reader sees the closed connection and ends the answer itself.
                exchange.upstream.close()
            elif exchange.task is not None and not exchange.task.done():
                exchange.aborted_by_stop = True
                exchange.task.cancel()

    async def _answer_aborted(self, exchange: Exchange) -> web.StreamResponse:
        error = self._shutting_down()
        exchange.error = error.code
        if exchange.relay is not None and exchange.relay.committed:
            return await exchange.relay.fail(error.message, error.type, error.code)
        return error.to_response(exchange.request_id)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def _log(self, exchange: Exchange) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        fields: dict[str, object] = {
            "request_id": exchange.request_id,
            "client": exchange.client,
            "principal": exchange.principal,
            "method": exchange.method,
            "path": exchange.path,
            "status": exchange.status,
            "model": exchange.model,
            "stream": exchange.stream,
            "latency_ms": round((self._clock.monotonic() - exchange.started) * 1000, 2),
            "bytes_in": exchange.bytes_in,
            "bytes_out": exchange.bytes_out,
        }
        if exchange.usage is not None:
            fields["prompt_tokens"] = exchange.usage.prompt_tokens
            fields["completion_tokens"] = exchange.usage.completion_tokens
        if exchange.error:
            fields["error"] = exchange.error
        access_log.info("request", extra={"access": fields})
