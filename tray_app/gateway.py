"""The gateway: an aiohttp application that authenticates, filters and relays to LM Studio.

One catch-all handler does the routing itself, on the normalised raw path, so that aiohttp's
router can never send an oddly encoded path somewhere the route table did not decide. For each
request, in order: request ID, path, upgrade refusal, CORS, the gateway's own endpoints, route
table, the auth-failure throttle, authentication, scope, rate and concurrency limits, body rules,
then forwarding; at the end one access log line, metrics and usage accounting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from tray_app._tasks import spawn
from tray_app.access_log import ACCESS_LOGGER, new_request_id
from tray_app.accounting import UsageRecorder
from tray_app.api_errors import REQUEST_ID_HEADER, ApiError
from tray_app.auth import Authenticator, Principal
from tray_app.body import apply_principal_rules, parse_json_object, prepare_body
from tray_app.chat_api import ChatApi
from tray_app.clock import Clock, SystemClock
from tray_app.config import Config
from tray_app.conversations import ConversationStore
from tray_app.cors import CorsPolicy
from tray_app.errors import AuthError
from tray_app.forwarding import Forwarder, Outcome, shutting_down
from tray_app.headers import is_upgrade_request, sane_request_id
from tray_app.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from tray_app.metrics import GatewayMetrics
from tray_app.pairing import PairingError, PairingService
from tray_app.protection import Protections, origin_refused
from tray_app.routes import SCOPE_CHAT, SCOPE_METRICS, Refusal, Route, RouteTable, normalise_path
from tray_app.secrets import LMSTUDIO_API_TOKEN, SecretStore
from tray_app.upstream import UPSTREAM_SESSION, session_context
from tray_app.webpage import WebPage

log = logging.getLogger("lmgate.gateway")
access_log = logging.getLogger(ACCESS_LOGGER)

READY_TIMEOUT = 5.0
USAGE_FLUSH_SECONDS = 2.0

OwnHandler = Callable[[web.Request, "Exchange"], Awaitable[web.StreamResponse]]


@dataclass(slots=True, eq=False)  # identity hash: exchanges live in a set
class Exchange:
    """What the access log records about one request; filled in as the request proceeds."""

    request_id: str
    method: str
    started: float
    client: str | None
    path: str = "-"
    route: str = "other"  # bounded label for metrics
    principal: str | None = None
    model: str | None = None
    status: int = 0
    bytes_in: int = 0
    stream: bool = False
    cors: dict[str, str] | None = None
    outcome: Outcome = field(default_factory=Outcome, repr=False)
    task: asyncio.Task[object] | None = field(default=None, repr=False)
    aborted_by_stop: bool = False
    error: str | None = None


def _refusal_error(refusal: Refusal) -> ApiError:
    headers = {"Allow": refusal.allow} if refusal.allow else None
    return ApiError(
        refusal.status,
        refusal.message,
        type="invalid_request_error",
        code=refusal.code,
        headers=headers,
    )


def _body_too_large(limit: int) -> ApiError:
    # Built only when raised: every POST reads its body here.
    return ApiError(
        413,
        f"The request body is larger than {limit} bytes (limits.max_body_bytes).",
        type="invalid_request_error",
        code="body_too_large",
    )


class Gateway:
    """Holds the parts and serves requests with them. Identity parts are optional: without
    ``pairing`` there is no /pair, without ``metrics`` no /metrics, without ``recorder`` no
    usage accounting."""

    def __init__(
        self,
        config: Config,
        authenticator: Authenticator,
        *,
        secrets: SecretStore,
        clock: Clock | None = None,
        pairing: PairingService | None = None,
        metrics: GatewayMetrics | None = None,
        recorder: UsageRecorder | None = None,
        conversations: ConversationStore | None = None,
    ) -> None:
        self.config = config
        self._auth = authenticator
        self._secrets = secrets
        self._clock: Clock = clock or SystemClock()
        self._pairing = pairing
        self.metrics = metrics
        self._recorder = recorder
        enabled = frozenset(
            name
            for name, on in (
                ("routes.enable_responses", config.enable_responses),
                ("routes.enable_messages", config.enable_messages),
            )
            if on
        )
        self._routes = RouteTable(enabled)
        self._protect = Protections(config, self._clock)
        self._forward = Forwarder(config, lambda: self._stopping)
        # Read once: a keyring lookup per request would cost milliseconds.
        self._forward.lmstudio_token = secrets.get(LMSTUDIO_API_TOKEN)
        self._inflight: set[Exchange] = set()
        self._stopping = False
        self._drained: asyncio.Event | None = None  # set when the last request ends after a stop
        self._own: dict[tuple[str, str], OwnHandler] = {
            ("GET", "/healthz"): self._healthz,
            ("GET", "/readyz"): self._readyz,
        }
        if metrics is not None:
            self._own[("GET", "/metrics")] = self._metrics
        self._chat: ChatApi | None = None
        self._page: WebPage | None = None
        if pairing is not None:
            self._own[("POST", "/pair")] = self._pair
            # The phone page pairs through /pair, so it is served only where pairing exists.
            self._page = WebPage()
            for page_path in self._page.paths:
                self._own[("GET", page_path)] = self._serve_page
        if conversations is not None:
            self._chat = ChatApi(
                conversations, self._forward, context_chars=config.chat_context_chars
            )
        self._own_paths = {path for _, path in self._own}

    # ---- application wiring ---------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.cleanup_ctx.append(session_context(self.config))
        if self._recorder is not None:
            app.cleanup_ctx.append(self._usage_flusher)
        app.on_shutdown.append(self._on_shutdown)
        # [\s\S]: a decoded %0A in the path must still reach our handler (and its 404).
        app.router.add_route("*", r"/{tail:[\s\S]*}", self._dispatch)
        return app

    def reload_secrets(self) -> None:
        """Pick up a changed LM Studio token from the secret store."""
        self._forward.lmstudio_token = self._secrets.get(LMSTUDIO_API_TOKEN)

    @property
    def inflight_count(self) -> int:
        return len(self._inflight)

    @property
    def stopping(self) -> bool:
        return self._stopping

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
                self._finish(exchange)
                return response
            # The client hung up; the finally clauses below us already closed LM Studio's side.
            exchange.status = exchange.status or 499
            exchange.error = exchange.error or "client_disconnected"
            self._finish(exchange)
            raise
        finally:
            self._inflight.discard(exchange)
            if self._drained is not None and not self._inflight:
                self._drained.set()
        if exchange.cors and not response.prepared:
            response.headers.update(exchange.cors)
        if not exchange.status:
            exchange.status = exchange.outcome.status or response.status
        if isinstance(response, web.Response) and response.body is not None:
            exchange.outcome.bytes_out = len(response.body)  # type: ignore[arg-type]
        if exchange.stream:
            self._finish(exchange)
        else:
            # The access log line, metrics and accounting wait until aiohttp has sent the
            # answer (it does so in this same step, right after we return).
            asyncio.get_running_loop().call_soon(self._finish, exchange)
        return response

    async def _handle(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        headers = request.headers
        path = normalise_path(request.raw_path)
        exchange.path = path if path is not None else "(refused)"
        exchange.client = self._protect.client(request.remote, headers)
        if is_upgrade_request(headers):
            raise ApiError(
                404,
                "WebSocket and other protocol upgrades are not available through LM Gate.",
                type="invalid_request_error",
                code="upgrade_not_allowed",
            )
        origin = headers.get("Origin")
        if CorsPolicy.is_preflight(request.method, headers):
            return self._preflight(path, origin or "", request.host)
        exchange.cors = self._protect.check_origin(origin, request.host)
        if (
            path is not None
            and self._chat is not None
            and (
                path in {"/api/chat", "/api/conversations"}
                or path.startswith("/api/conversations/")
            )
        ):
            return await self._conversation_api(request, exchange, path)
        if path is not None:
            own = self._own.get((request.method, path))
            if own is not None:
                exchange.route = path
                return await own(request, exchange)
            if path in self._own_paths:
                allowed = ", ".join(m for m, p in self._own if p == path)
                raise ApiError(
                    405,
                    f"Method {request.method} is not allowed on {path}; use {allowed}.",
                    type="invalid_request_error",
                    code="method_not_allowed",
                    headers={"Allow": allowed},
                )
        resolved = self._routes.resolve(request.method, path)
        if isinstance(resolved, Refusal):
            raise _refusal_error(resolved)
        exchange.route = resolved.path
        principal = self._authenticate(request, exchange)
        if not principal.has_scope(resolved.scope):
            raise ApiError(
                403,
                f"This key may not use {resolved.path} (it lacks the '{resolved.scope}' scope).",
                type="permission_error",
                code="insufficient_scope",
            )
        self._protect.take_request(principal.name)
        self._protect.enter(principal.name)
        try:
            if resolved.method == "GET":
                return await self._forward.models(
                    request, exchange.request_id, resolved, principal, exchange.outcome
                )
            return await self._forward_post(request, exchange, resolved, principal)
        finally:
            self._protect.leave(principal.name)

    async def _conversation_api(
        self, request: web.Request, exchange: Exchange, path: str
    ) -> web.StreamResponse:
        assert self._chat is not None
        exchange.route = "/api/chat" if path == "/api/chat" else "/api/conversations"
        principal = self._authenticate(request, exchange)
        if not principal.has_scope(SCOPE_CHAT):
            raise ApiError(
                403,
                "Conversations need a key with the 'chat' scope.",
                type="permission_error",
                code="insufficient_scope",
            )
        self._protect.take_request(principal.name)
        self._protect.enter(principal.name)
        try:
            return await self._chat.handle(
                request, exchange.request_id, path, principal, exchange.outcome, exchange.cors
            )
        finally:
            self._protect.leave(principal.name)

    async def _serve_page(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        assert self._page is not None
        return self._page.response(exchange.path, exchange.request_id)

    def _authenticate(self, request: web.Request, exchange: Exchange) -> Principal:
        client = exchange.client or "unknown"
        self._protect.check_auth_allowed(client)
        try:
            principal = self._auth.authenticate(request.headers, request.remote)
        except AuthError as exc:
            self._protect.auth_failed(client)
            if self.metrics is not None:
                self.metrics.auth_failure(exc.code)
            kind = "authentication_error" if exc.status == 401 else "permission_error"
            headers = {"WWW-Authenticate": 'Bearer realm="lmgate"'} if exc.status == 401 else None
            raise ApiError(
                exc.status, str(exc), type=kind, code=exc.code, headers=headers
            ) from None
        exchange.principal = principal.name
        return principal

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _body_too_large(limit)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _body_too_large(limit) from None

    async def _forward_post(
        self, request: web.Request, exchange: Exchange, route: Route, principal: Principal
    ) -> web.StreamResponse:
        raw = await self._read_body(request)
        exchange.bytes_in = len(raw)
        prepared = prepare_body(route, raw)
        exchange.model = prepared.model
        exchange.stream = prepared.stream
        if prepared.model is not None and not principal.may_use_model(prepared.model):
            raise ApiError(
                403,
                f"This key may not use the model {prepared.model!r}.",
                type="permission_error",
                code="model_not_allowed",
                param="model",
            )
        adjusted = apply_principal_rules(
            prepared, route, max_tokens=principal.max_tokens, want_usage=self._recorder is not None
        )
        if not prepared.stream or self.metrics is None:
            return await self._forward.post(
                request,
                exchange.request_id,
                route,
                adjusted.body.raw,
                stream=prepared.stream,
                outcome=exchange.outcome,
                extra_headers=exchange.cors,
                hide_usage=adjusted.hide_usage,
            )
        self.metrics.active_streams.inc()
        try:
            return await self._forward.post(
                request,
                exchange.request_id,
                route,
                adjusted.body.raw,
                stream=True,
                outcome=exchange.outcome,
                extra_headers=exchange.cors,
                hide_usage=adjusted.hide_usage,
            )
        finally:
            self.metrics.active_streams.dec()

    def _preflight(self, path: str | None, origin: str, host: str) -> web.Response:
        known = path is not None and (
            path in self._own_paths
            or isinstance(self._routes.resolve("POST", path), Route)
            or isinstance(self._routes.resolve("GET", path), Route)
        )
        if not known:
            raise ApiError(
                404, "No such endpoint.", type="invalid_request_error", code="unknown_path"
            )
        if not self._protect.cors.allows(origin, host):
            raise origin_refused()
        return web.Response(status=204, headers=CorsPolicy.preflight_headers(origin))

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

    async def _metrics(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        assert self.metrics is not None
        principal = self._authenticate(request, exchange)
        if not principal.has_scope(SCOPE_METRICS):
            raise ApiError(
                403,
                "Metrics need a key with the 'metrics' scope.",
                type="permission_error",
                code="insufficient_scope",
            )
        response = web.Response(body=self.metrics.exposition())
        response.headers["Content-Type"] = METRICS_CONTENT_TYPE
        response.headers[REQUEST_ID_HEADER] = exchange.request_id
        return response

    async def _pair(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        assert self._pairing is not None
        client = exchange.client or "unknown"
        self._protect.check_pairing_allowed(client)
        payload = parse_json_object(await self._read_body(request))
        code, device = payload.get("code"), payload.get("device_name", "device")
        if not isinstance(code, str) or not isinstance(device, str):
            self._protect.pairing_failed(client)
            raise ApiError(
                400,
                'Send {"code": "<pairing code>", "device_name": "..."}.',
                type="invalid_request_error",
                code="invalid_body",
                param="code",
            )
        try:
            issued = self._pairing.exchange(code, device)
        except PairingError as exc:
            self._protect.pairing_failed(client)
            if self.metrics is not None:
                self.metrics.auth_failure(exc.code)
            raise ApiError(401, str(exc), type="authentication_error", code=exc.code) from None
        exchange.principal = issued.record.sub
        record = issued.record
        return web.json_response(
            {
                "token": issued.token,
                "token_type": "Bearer",
                "device_id": record.device_id,
                "device_name": record.name,
                "scopes": sorted(record.scopes),
                "expires_at": int(record.expires),
            },
            headers={REQUEST_ID_HEADER: exchange.request_id, "Cache-Control": "no-store"},
        )

    async def lmstudio_reachable(self, session: aiohttp.ClientSession) -> bool:
        token = self._forward.lmstudio_token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            async with session.get(
                self.config.upstream_url + "/v1/models",
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=READY_TIMEOUT),
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    # ---- accounting, shutdown and logging -----------------------------------------------

    async def _usage_flusher(self, app: web.Application) -> AsyncIterator[None]:
        recorder = self._recorder
        assert recorder is not None

        async def flush_forever() -> None:
            while True:
                await asyncio.sleep(USAGE_FLUSH_SECONDS)
                if recorder.has_pending:
                    await asyncio.to_thread(recorder.flush)

        task = spawn(flush_forever(), name="usage-flush")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.wait({task})
            recorder.flush()

    async def _answer_aborted(self, exchange: Exchange) -> web.StreamResponse:
        error = shutting_down()
        exchange.error = error.code
        relay = exchange.outcome.relay
        if relay is not None and relay.committed:
            return await relay.fail(error.message, error.type, error.code)
        return error.to_response(exchange.request_id)

    async def _on_shutdown(self, app: web.Application) -> None:
        """Let in-flight requests finish for ``shutdown_grace`` seconds, then close them."""
        self._stopping = True
        if self._inflight:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), self.config.shutdown_grace)
        for exchange in list(self._inflight):
            upstream = exchange.outcome.upstream
            if upstream is not None:
                # The relay or reader sees the closed connection and ends the answer itself.
                upstream.close()
            elif exchange.task is not None and not exchange.task.done():
                exchange.aborted_by_stop = True
                exchange.task.cancel()

    def _finish(self, exchange: Exchange) -> None:
        outcome = exchange.outcome
        error = exchange.error or outcome.error
        usage = outcome.usage
        seconds = self._clock.monotonic() - exchange.started
        if self.metrics is not None:
            self.metrics.observe_request(exchange.route, exchange.status, seconds)
            if usage is not None:
                self.metrics.observe_tokens(usage.prompt_tokens, usage.completion_tokens)
            if error is not None and error.startswith("upstream_"):
                self.metrics.upstream_error(error)
            if error is not None and error in {
                "rate_limit_exceeded",
                "too_many_concurrent_requests",
                "too_many_auth_failures",
                "too_many_pairing_attempts",
            }:
                self.metrics.rate_limited(error)
        if (
            self._recorder is not None
            and exchange.principal is not None
            and exchange.route != "/pair"
        ):
            self._recorder.record(exchange.principal, usage)
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
            "latency_ms": round(seconds * 1000, 2),
            "bytes_in": exchange.bytes_in,
            "bytes_out": outcome.bytes_out,
        }
        if usage is not None:
            fields["prompt_tokens"] = usage.prompt_tokens
            fields["completion_tokens"] = usage.completion_tokens
        if error:
            fields["error"] = error
        access_log.info("request", extra={"access": fields})
