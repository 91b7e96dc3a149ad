"""The gateway: an aiohttp application that authenticates, filters and relays to LM Studio.

One handler receives every request and does the routing itself on the
normalised raw path, so that aiohttp's router can never send an oddly encoded path (or a
CONNECT, or an absolute-form target) somewhere the endpoint table did not decide. For each
request, in order: request ID, path, upgrade refusal, Host name, CORS, the endpoint table
(routes.ENDPOINTS: its methods, else 405), then for forwarded routes authentication (with the
auth-failure throttle for failures only), scope, rate and concurrency limits, body rules,
then forwarding; at the end one access log
line, metrics and usage accounting. A watchdog ends running streams whose credential was
revoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from tray_app.clock import Clock, SystemClock
from tray_app.config.settings import Config
from tray_app.errors import AuthError, StorageError
from tray_app.gateway import api_errors as errors
from tray_app.gateway import stream_probe
from tray_app.gateway.accounting import UsageRecorder
from tray_app.gateway.api_errors import REQUEST_ID_HEADER, ApiError
from tray_app.gateway.body_rules import (
    apply_principal_rules,
    check_models,
    parse_json_object,
    prepare_body,
)
from tray_app.gateway.budgets import BudgetLedger
from tray_app.gateway.chat_api import ChatApi
from tray_app.gateway.cors import CorsPolicy
from tray_app.gateway.exchange import Exchange
from tray_app.gateway.fair_queue import FairQueue
from tray_app.gateway.headers import is_upgrade_request, sane_request_id
from tray_app.gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from tray_app.gateway.metrics import GatewayMetrics
from tray_app.gateway.protection import Protections
from tray_app.gateway.routes import (
    COUNT_TOKENS,
    MODEL_PREFIX,
    Endpoint,
    EndpointTable,
    Part,
    Route,
    normalise_path,
)
from tray_app.gateway.shared_budgets import SharedBudgets
from tray_app.gateway.sharing import Sharing
from tray_app.gateway.state_calls import StateCalls
from tray_app.gateway.token_estimate import METHOD, METHOD_HEADER, estimate_input_tokens
from tray_app.gateway.upstream.client import UPSTREAM_SESSION, session_context
from tray_app.gateway.upstream.forwarding import Forwarder
from tray_app.gateway.upstream.health import HealthChecker, ProbeResult, lmstudio_probe
from tray_app.gateway.upstream.model_api import LMStudioModelApi
from tray_app.gateway.upstream.model_guard import ModelGuard
from tray_app.gateway.upstream.pool import Upstream, UpstreamPool, UpstreamView, specs_of
from tray_app.gateway.upstream.probe import probe_lmstudio
from tray_app.gateway.upstream.routing import Router
from tray_app.gateway.webpage import WebPage
from tray_app.identity.pairing import PairingError, PairingService
from tray_app.identity.principal import SCOPE_CHAT, SCOPE_METRICS, Authenticator, Principal
from tray_app.logs import ACCESS_LOGGER, new_request_id
from tray_app.secret_store.base import SecretStore
from tray_app.secret_store.upstream_tokens import read_token
from tray_app.storage.conversations import ConversationStore
from tray_app.tasks import spawn

if TYPE_CHECKING:
    # redis-py is the team extra's: a desktop or Docker install without it must still import
    # the gateway; only a gateway that is given shared limits needs it.
    from tray_app.gateway.shared_limits import SharedLimits

log = logging.getLogger("lmgate.gateway")
access_log = logging.getLogger(ACCESS_LOGGER)

READY_TIMEOUT = 5.0
# What a client is told to wait while the database cannot be read: the authenticator asks it
# again twice a second.
STATE_RETRY_AFTER_SECONDS = 1.0
# /readyz needs no credential: one LM Studio probe per this many seconds, whoever asks.
READY_CACHE_SECONDS = 2.0
USAGE_FLUSH_SECONDS = 2.0
# How soon a running request ends after its credential is revoked (by the CLI, tray or pairing).
REVALIDATE_SECONDS = 2.0
# /pair is the one JSON endpoint anyone may call: its body is a code and a device name.
PAIR_MAX_BODY_BYTES = 4096
Handler = Callable[[web.Request, Exchange, Endpoint], Awaitable[web.StreamResponse]]


async def _expect(request: web.Request) -> None:
    """``Expect: 100-continue`` as aiohttp answers it; any other expectation is refused by
    the gateway itself, in its own error shape (aiohttp's own answer is plain text)."""
    if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0


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
        ledger: BudgetLedger | None = None,
        shared_limits: SharedLimits | None = None,
        state_calls: StateCalls | None = None,
    ) -> None:
        self.config = config
        self._auth = authenticator
        # Every call that may read the database goes through it: a remote one's on a thread.
        self._state = state_calls or StateCalls(offload=False)
        self._secrets = secrets
        self._clock: Clock = clock or SystemClock()
        self._pairing = pairing
        self.metrics = metrics
        self._recorder = recorder
        enabled = frozenset(
            name
            for name, on in (
                ("routes.enable_responses", config.routes_enable_responses),
                ("routes.enable_messages", config.routes_enable_messages),
            )
            if on
        )
        # Several replicas count in Redis; one counts in this process.
        self._shared = shared_limits
        self._protect = Protections(config, self._clock, shared_limits)
        self.pool = UpstreamPool(specs_of(config), self._clock)
        # Read once: a keyring lookup per request would cost milliseconds. Each token only
        # for the server it was given for (a name can outlive its machine).
        self._refused: dict[str, str] = {}  # why an upstream's stored token is not sent
        tokens: dict[str, str | None] = {}
        for upstream in self.pool:
            read = read_token(secrets, upstream.name, upstream.spec.url)
            tokens[upstream.name] = read.token
            self._say_refusal(upstream.name, read.refused)
        self._session: aiohttp.ClientSession | None = None  # while the server runs
        self._reading_token: set[str] = set()  # upstreams whose token is being read
        self.health = HealthChecker(self.pool, self._probe_upstream, self._clock)
        several = self.pool.several
        # One upstream is always asked (see the pool): nothing checks it in the background,
        # and a failed request says nothing about where the next one goes.
        router = Router(self.pool, health=self.health if several else None)
        self._forward = Forwarder(config, lambda: self._stopping, router, tokens)
        # Each machine runs its own generations: a queue (its slots) per upstream, each fair
        # across callers, so a busy or hung machine holds no other machine's slots.
        self.queues = {
            u.name: FairQueue(
                slots=config.queue_generations_in_flight,
                per_caller=config.limits_concurrent_requests,
                max_waiting=config.queue_max_waiting,
                max_waiting_per_client=config.queue_max_waiting_per_client,
                max_waiting_per_caller=config.queue_max_waiting_per_caller,
            )
            for u in self.pool
        }
        self.queue = next(iter(self.queues.values()))  # with one upstream, its queue
        self.ledger = ledger
        # The guard needs LM Studio's session, which lives while the server runs (build_app).
        self.guards: dict[str, ModelGuard] = {}  # each upstream's, by name
        self.sharing = Sharing(
            self.queue,
            guard=None,
            ledger=ledger,
            max_wait=config.queue_max_wait,
            max_stream_wait=config.queue_max_stream_wait,
            state=self._state,
        )
        self.sharing.queues = self.queues
        if shared_limits is not None:
            self.sharing.leases = self._protect
            self.sharing.slots = shared_limits
            if ledger is not None:
                ledger.shared = SharedBudgets(shared_limits)
        if metrics is not None:
            queues = tuple(self.queues.values())
            metrics.watch_sharing(
                waiting=lambda: sum(q.waiting for q in queues),
                busy=lambda: sum(q.busy for q in queues),
                budgeted=lambda: ledger.principals_tracked if ledger is not None else 0,
                reserved=lambda: ledger.reserved_tokens if ledger is not None else 0,
            )
            if several:
                metrics.watch_upstreams(self.pool.views, lambda: router.retries)
        self._inflight: set[Exchange] = set()
        self._stopping = False
        self._drained: asyncio.Event | None = None  # set when the last request ends after a stop
        handlers: dict[Part, Handler] = {
            Part.HEALTH: self._healthz,
            Part.READINESS: lambda request, exchange, _: self._readyz(request, exchange),
            Part.LM_STUDIO: self._forwarded,
            Part.STREAM_CHECK: self._stream_check,
        }
        # The tunnel's own stream check calls with it: per process, accepted on
        # /stream-check only, never logged.
        self._stream_probe_token = stream_probe.new_probe_token()
        if metrics is not None:
            handlers[Part.METRICS] = self._metrics
        self._chat: ChatApi | None = None
        self._page: WebPage | None = None
        if pairing is not None:
            handlers[Part.PAIRING] = self._pair
            self._page = WebPage()
            handlers[Part.PHONE_PAGE] = self._serve_page
        if conversations is not None:
            handlers[Part.CONVERSATIONS] = self._conversation_api
            self._chat = ChatApi(
                conversations,
                self._forward,
                context_chars=config.chat_context_chars,
                read_body=self._read_body,
                max_event_bytes=config.limits_max_event_bytes,
                max_answer_chars=config.limits_max_response_bytes,
                count_usage=recorder is not None,
                max_body_bytes=config.limits_max_body_bytes,
                sharing=self.sharing,
                state=self._state,
            )
        self._endpoints = EndpointTable(enabled, handlers)
        self._handlers = handlers
        self._ready: tuple[float, bool] | None = None  # (when probed, answer)
        self._ready_probe: asyncio.Task[bool] | None = None

    # ---- application wiring ---------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.limits_max_body_bytes)
        app.cleanup_ctx.append(session_context(self.config))
        if self._shared is not None:
            app.cleanup_ctx.append(self._shared_limits_context)
        app.cleanup_ctx.append(self._model_guard_context)
        if self.pool.several:
            app.cleanup_ctx.append(self._health_context)
        if self._recorder is not None:
            app.cleanup_ctx.append(self._usage_flusher)
        app.cleanup_ctx.append(self._revocation_watchdog)
        app.on_shutdown.append(self._on_shutdown)
        # One route for every target that starts with "/" ([\s\S]: a decoded %0A in the path
        # must match too): the gateway routes by itself. Other targets (CONNECT host:port)
        # reach dispatch() from the server (tray_app.gateway.server.connections).
        app.router.add_route("*", r"/{tail:[\s\S]*}", self.dispatch, expect_handler=_expect)
        return app

    # ---- what the tunnel tells us ---------------------------------------------------------

    def tunnel_opened(self, public_url: str, forwarded_header: str | None) -> None:
        """A tunnel is up: requests may be addressed to its public host, and its agent (which
        dials in from loopback) is believed about the client's address in
        ``forwarded_header``. Called on the loop thread."""
        self._protect.hosts.set_public_host(urlsplit(public_url).hostname)
        self._protect.trust_tunnel(forwarded_header)

    def tunnel_closed(self) -> None:
        self._protect.hosts.set_public_host(None)
        self._protect.trust_tunnel(None)

    def trusts_peer(self, peer: str | None) -> bool:
        """Whether a connection from ``peer`` is a proxy carrying many clients (the running
        tunnel's agent, a configured proxy): per-address connection caps do not apply."""
        return self._protect.trusts_peer(peer)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def stream_probe_token(self) -> str:
        """The bearer with which this process's tunnel check calls ``POST /stream-check``
        (and nothing else: every other route refuses it, as any unknown credential)."""
        return self._stream_probe_token

    # ---- request handling -----------------------------------------------------------------

    async def dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer one request: every request the server receives comes here (the app's
        request factory made it a web.Request, routed or not)."""
        assert isinstance(request, web.Request)
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
            if err.headers.get("Connection") == "close":
                # A body that never came, or must not be read: neither wait for it nor drain it.
                response.force_close()
                stop_reading = getattr(request.protocol, "stop_reading", None)
                if stop_reading is not None:
                    stop_reading()
        except StorageError as exc:
            # The database failed, not the code: pairing, conversations or budgets could not be
            # read or written, and nothing of the request was kept (a transaction or nothing).
            log.warning("request %s: %s", exchange.request_id, exc)
            exchange.error = "state_unavailable"
            response = errors.state_unavailable(STATE_RETRY_AFTER_SECONDS).to_response(
                exchange.request_id
            )
        except Exception:
            # A bug, not a request problem: keep serving, answer in the API's shape, and log
            # the traceback under the request ID the client was given.
            log.exception("internal error handling request %s", exchange.request_id)
            exchange.error = "internal_error"
            response = errors.internal_error(exchange.request_id).to_response(exchange.request_id)
        except asyncio.CancelledError:
            if exchange.aborted_with is not None and exchange.task is not None:
                # We cancelled a request still waiting for LM Studio (shutdown, revocation);
                # the client is still there and gets a proper answer.
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
            raise errors.upgrade_not_allowed()
        if "Content-Encoding" in headers:
            for encoding in headers.getall("Content-Encoding"):
                if encoding.strip().lower() not in {"", "identity"}:
                    # Refused on every path, before anything reads (and so inflates) the
                    # body: a 1 MB gzip is 1 GB of work, even drained unread.
                    raise errors.body_compressed(encoding.strip().lower())
        expect = headers.get("Expect")
        if expect is not None and expect.lower() != "100-continue":
            raise errors.expectation_failed()
        host = headers.get("Host")
        # /healthz answers nothing worth rebinding for, and the tunnel proves its new public
        # URL with it before that URL's host is known to be ours.
        if path != "/healthz" and not self._protect.hosts.allows(host):
            raise errors.host_not_allowed()
        origin = headers.get("Origin")
        endpoint = self._endpoints.find(path)
        if CorsPolicy.is_preflight(request.method, headers):
            return self._preflight(endpoint, origin or "", request.host)
        exchange.cors = self._protect.check_origin(origin, request.host)
        if endpoint is None:
            raise self._endpoints.refusal(path)
        if request.method not in endpoint.methods:
            # The table's path, not the client's: a 405 comes before authentication, and must
            # not echo back an arbitrarily long conversation id to anyone who asks.
            raise errors.method_not_allowed(request.method, endpoint.path, endpoint.allow)
        exchange.route = endpoint.path
        return await self._handlers[endpoint.part](request, exchange, endpoint)

    async def _forwarded(
        self, request: web.Request, exchange: Exchange, endpoint: Endpoint
    ) -> web.StreamResponse:
        resolved = endpoint.route
        assert resolved is not None
        principal = await self._authenticate(request, exchange)
        if not principal.has_scope(resolved.scope):
            raise errors.missing_scope(resolved.path, resolved.scope)
        await self._protect.take_request(principal.name)
        if resolved.method == "POST" and resolved.path != COUNT_TOKENS:
            # A generation: the fair queue holds the caller's concurrency cap, and waits
            # instead of refusing.
            return await self._forward_post(request, exchange, resolved, principal)
        lease = await self._protect.enter(principal.name)
        try:
            if resolved.path == COUNT_TOKENS:
                return await self._count_tokens(request, exchange, resolved, principal)
            if resolved.local:
                return await self._forward.model(
                    request,
                    exchange.request_id,
                    exchange.path.removeprefix(MODEL_PREFIX),
                    principal,
                    exchange.outcome,
                )
            return await self._forward.models(
                request, exchange.request_id, resolved, principal, exchange.outcome
            )
        finally:
            self._protect.leave(principal.name, lease)

    async def _conversation_api(
        self, request: web.Request, exchange: Exchange, endpoint: Endpoint
    ) -> web.StreamResponse:
        assert self._chat is not None
        path = exchange.path
        exchange.route = "/api/chat" if path == "/api/chat" else "/api/conversations"
        principal = await self._authenticate(request, exchange)
        if not principal.has_scope(SCOPE_CHAT):
            raise errors.conversations_need_chat_scope()
        await self._protect.take_request(principal.name)
        if exchange.method == "POST":
            # A chat turn is a generation: its concurrency is the fair queue's.
            if self.metrics is None:
                return await self._chat.handle(request, exchange, path, principal)
            self.metrics.active_streams.inc()
            try:
                return await self._chat.handle(request, exchange, path, principal)
            finally:
                self.metrics.active_streams.dec()
        lease = await self._protect.enter(principal.name)
        try:
            return await self._chat.handle(request, exchange, path, principal)
        finally:
            self._protect.leave(principal.name, lease)

    async def _serve_page(
        self, request: web.Request, exchange: Exchange, endpoint: Endpoint
    ) -> web.StreamResponse:
        assert self._page is not None
        return self._page.response(exchange.path, exchange.request_id)

    async def _authenticate(self, request: web.Request, exchange: Exchange) -> Principal:
        client = exchange.client or "unknown"
        try:
            principal = await self._state.call(
                self._auth.authenticate, request.headers, request.remote
            )
        except AuthError as exc:
            # The throttle slows guessing from an address; it never refuses a valid
            # credential because others at that address guessed wrong.
            await self._protect.auth_failed(client)
            if self.metrics is not None:
                self.metrics.auth_failure(exc.code)
            raise errors.not_authenticated(exc) from None
        except StorageError:
            # Fail closed: the authenticator logged the outage once, and finds it over.
            raise errors.state_unavailable(STATE_RETRY_AFTER_SECONDS) from None
        exchange.principal = principal.name
        exchange.caller = principal
        if self._recorder is not None:
            exchange.begun = self._recorder.begin(principal.name)
        return principal

    async def _read_body(
        self, request: web.Request, exchange: Exchange, *, limit: int | None = None
    ) -> bytes:
        """The whole body, within the size and time limits; ``limit`` below the configured
        one for endpoints whose bodies are small by nature."""
        limit = min(limit or self.config.limits_max_body_bytes, self.config.limits_max_body_bytes)
        setting = (
            "limits.max_body_bytes"
            if limit == self.config.limits_max_body_bytes
            else "the most this endpoint takes"
        )
        if request.content_length is not None and request.content_length > limit:
            raise errors.body_too_large(limit, setting)
        content = request.content
        if content.is_eof() and content.exception() is None:
            # The whole body came with the headers (a small request usually does): taken as it
            # is, without arming a timer for a wait that cannot happen.
            raw = content.read_nowait(-1)
            if len(raw) > limit:
                raise errors.body_too_large(limit, setting)
            exchange.bytes_in = len(raw)
            return raw
        parts: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.config.server_body_timeout):
                async for chunk in request.content.iter_any():
                    size += len(chunk)
                    if size > limit:
                        raise errors.body_too_large(limit, setting)
                    parts.append(chunk)
        except TimeoutError:
            raise errors.body_too_slow(self.config.server_body_timeout) from None
        except RequestPayloadError:
            raise errors.body_broken() from None
        raw = b"".join(parts)
        exchange.bytes_in = size
        return raw

    async def _forward_post(
        self, request: web.Request, exchange: Exchange, route: Route, principal: Principal
    ) -> web.StreamResponse:
        raw = await self._read_body(request, exchange)
        prepared = prepare_body(route, raw)
        exchange.model = prepared.model
        exchange.stream = prepared.stream
        check_models(prepared, principal)
        generation = exchange.generation = await self.sharing.admit(
            principal, exchange.client or "unknown", route, prepared
        )
        outcome = exchange.outcome
        try:
            adjusted = apply_principal_rules(
                prepared,
                route,
                max_tokens=generation.max_tokens,
                want_usage=self._recorder is not None,
            )
            if not prepared.stream or self.metrics is None:
                return await self._forward.post(
                    request,
                    exchange.request_id,
                    route,
                    adjusted.body.raw,
                    stream=prepared.stream,
                    outcome=outcome,
                    extra_headers=exchange.cors,
                    hide_usage=adjusted.hide_usage,
                    wait_turn=generation.wait_turn,
                    caller=principal.name,
                    model=prepared.model,
                )
            self.metrics.active_streams.inc()
            try:
                return await self._forward.post(
                    request,
                    exchange.request_id,
                    route,
                    adjusted.body.raw,
                    stream=True,
                    outcome=outcome,
                    extra_headers=exchange.cors,
                    hide_usage=adjusted.hide_usage,
                    wait_turn=generation.wait_turn,
                    caller=principal.name,
                    model=prepared.model,
                )
            finally:
                self.metrics.active_streams.dec()
        finally:
            generation.release()

    async def _count_tokens(
        self, request: web.Request, exchange: Exchange, route: Route, principal: Principal
    ) -> web.StreamResponse:
        """Answered here (LM Studio has no such endpoint), under /v1/messages' own rules: the
        same body limits, body checks and model allowlist."""
        prepared = prepare_body(route, await self._read_body(request, exchange))
        exchange.model = prepared.model
        check_models(prepared, principal)
        return web.json_response(
            {"input_tokens": estimate_input_tokens(prepared.payload)},
            headers={REQUEST_ID_HEADER: exchange.request_id, METHOD_HEADER: METHOD},
        )

    def _preflight(self, endpoint: Endpoint | None, origin: str, host: str) -> web.Response:
        if endpoint is None:
            raise errors.no_such_endpoint()
        if not self._protect.cors.allows(origin, host):
            raise errors.origin_not_allowed()
        return web.Response(
            status=204, headers=CorsPolicy.preflight_headers(origin, endpoint.allow)
        )

    # ---- the gateway's own endpoints ------------------------------------------------------

    async def _stream_check(
        self, request: web.Request, exchange: Exchange, endpoint: Endpoint
    ) -> web.StreamResponse:
        """A paced SSE stream (tray_app.gateway.stream_probe), for the probe token or any
        valid credential; anything else fails, and is counted, as on every other route."""
        if stream_probe.carries_probe_token(request.headers, self._stream_probe_token):
            # Limited like any caller: the token crosses the tunnel's edge, which sees it.
            name = stream_probe.PROBE_CALLER
        else:
            principal = await self._authenticate(request, exchange)
            # Under a second, and LM Studio is never asked: a revocation has nothing to end
            # (the watchdog cancels only requests with a caller).
            exchange.caller = None
            name = principal.name
        await self._protect.take_request(name)
        lease = (name, await self._protect.enter(name))
        try:
            raw = await self._read_body(request, exchange, limit=stream_probe.MAX_BODY_BYTES)
            stream_probe.check_body(raw)
            exchange.stream = True
            response, sent = await stream_probe.answer(
                request,
                exchange.request_id,
                self._clock,
                extra_headers=exchange.cors,
                aborted=lambda: exchange.aborted_with,
            )
        finally:
            self._protect.leave(*lease)
        exchange.outcome.bytes_out = sent
        if exchange.aborted_with is not None:
            exchange.error = exchange.aborted_with.code
        return response

    async def _healthz(
        self, request: web.Request, exchange: Exchange, endpoint: Endpoint
    ) -> web.StreamResponse:
        return web.json_response({"status": "ok"}, headers={REQUEST_ID_HEADER: exchange.request_id})

    async def _readyz(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        """Ready while some upstream answers. Each upstream is named with its state only:
        anyone may ask, and its address and failure are the owner's business (the tray,
        `doctor`)."""
        only = next(iter(self.pool))
        if not self.pool.any_enabled:
            # Switched off is not probed: nothing is sent to a server the owner switched off.
            ready = False
            states = {view.name: view.state for view in self.pool.views()}
            status = "unavailable"
        elif not self.pool.several:
            ready = await self._ready_cached(request.app[UPSTREAM_SESSION])
            states = {only.name: "up" if ready else "down"}
            status = "ready" if ready else "unavailable"
        else:
            states = {view.name: view.state for view in self.pool.views()}
            up = [state == "up" for state in states.values() if state != "disabled"]
            ready = any(up)
            status = "unavailable" if not ready else "ready" if all(up) else "degraded"
        answer: dict[str, object] = {
            "status": status,
            "upstreams": [{"name": name, "state": state} for name, state in states.items()],
        }
        try:
            await self._state.call(self._auth.check_state)
            answer["database"] = "up"
        except StorageError:
            # Nothing can be authenticated, whatever the upstreams say.
            answer["database"], answer["status"], ready = "down", "unavailable", False
        shared = self._shared
        if shared is not None:
            answer["shared_limits"] = "up" if shared.available else "down"
            if not shared.available and ready:
                # Open: served, but without the limits. Closed: every limited request is
                # refused, so this replica cannot serve.
                ready = shared.fails_open
                answer["status"] = "degraded" if ready else "unavailable"
        return web.json_response(
            answer,
            status=200 if ready else 503,
            headers={REQUEST_ID_HEADER: exchange.request_id},
        )

    async def _metrics(
        self, request: web.Request, exchange: Exchange, endpoint: Endpoint
    ) -> web.StreamResponse:
        assert self.metrics is not None
        principal = await self._authenticate(request, exchange)
        if not principal.has_scope(SCOPE_METRICS):
            raise errors.metrics_need_metrics_scope()
        response = web.Response(body=self.metrics.exposition())
        response.headers["Content-Type"] = METRICS_CONTENT_TYPE
        response.headers[REQUEST_ID_HEADER] = exchange.request_id
        return response

    async def _pair(
        self, request: web.Request, exchange: Exchange, endpoint: Endpoint
    ) -> web.StreamResponse:
        assert self._pairing is not None
        client = exchange.client or "unknown"
        try:
            raw = await self._read_body(request, exchange, limit=PAIR_MAX_BODY_BYTES)
            payload = parse_json_object(raw)
            code, device = payload.get("code"), payload.get("device_name", "device")
            if not isinstance(code, str) or not isinstance(device, str):
                raise errors.pairing_body_invalid()
            issued = await self._state.call(self._pairing.exchange, code, device)
        except (ApiError, PairingError) as exc:
            # Every failed attempt counts, malformed ones too; a valid code is never refused
            # for others' failures at this address.
            await self._protect.pairing_failed(client)
            if isinstance(exc, ApiError):
                raise
            if self.metrics is not None:
                self.metrics.auth_failure(exc.code)
            raise errors.pairing_refused(exc) from None
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

    async def _ready_cached(self, session: aiohttp.ClientSession) -> bool:
        """LM Studio's reachability, probed at most once per READY_CACHE_SECONDS and never
        twice at once: an unauthenticated caller cannot turn /readyz into load on LM Studio."""
        now = self._clock.monotonic()
        if self._ready is not None and now - self._ready[0] < READY_CACHE_SECONDS:
            return self._ready[1]
        probe = self._ready_probe
        if probe is None:
            probe = self._ready_probe = spawn(self.lmstudio_reachable(session), name="readyz")
            probe.add_done_callback(self._ready_probed)
        # shield: one caller hanging up must not cancel the probe the others wait for.
        return await asyncio.shield(probe)

    def _ready_probed(self, probe: asyncio.Task[bool]) -> None:
        self._ready_probe = None
        if not probe.cancelled() and probe.exception() is None:
            self._ready = (self._clock.monotonic(), probe.result())

    async def upstreams_reachable(self) -> bool:
        """At the start: whether some upstream answers (with several, as the probes before
        serving found)."""
        if not self.pool.any_enabled:
            return False
        if not self.pool.several:
            return await self.lmstudio_reachable()
        return any(view.state == "up" for view in self.pool.views())

    async def lmstudio_reachable(self, session: aiohttp.ClientSession | None = None) -> bool:
        """Whether LM Studio answers with LM Gate's token; without ``session``, asked on a
        session of its own (the app's lives only while the server runs)."""
        probe = await probe_lmstudio(
            self._forward.upstream_url,
            self._forward.lmstudio_token,
            session=session,
            within=READY_TIMEOUT,
            list_models=False,
        )
        return probe.ready

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

    async def _shared_limits_context(self, app: web.Application) -> AsyncIterator[None]:
        """The Redis client lives on the gateway's loop, while the server runs."""
        shared = self._shared
        assert shared is not None
        await shared.open()
        try:
            yield
        finally:
            await shared.close()

    async def _model_guard_context(self, app: web.Application) -> AsyncIterator[None]:
        session = self._session = app[UPSTREAM_SESSION]
        forward = self._forward
        guards: dict[str, ModelGuard] = {}
        for upstream in self.pool:
            name = upstream.name
            api = LMStudioModelApi(upstream.spec.url, partial(forward.token_of, name), session)
            guards[name] = ModelGuard(
                api,
                policy=self.config.models_switch,
                load_timeout=self.config.models_load_timeout,
                clock=self._clock,
            )
        self.guards = self.sharing.guards = guards
        try:
            yield
        finally:
            self.guards = {}
            self.sharing.guards = {}
            self._session = None
            for guard in guards.values():
                await guard.close()

    async def _health_context(self, app: web.Application) -> AsyncIterator[None]:
        """Several upstreams: each is probed in the background, so a request goes to one
        that answers and offers its model (one upstream is always asked: see the pool)."""
        # Once before serving (each probe within its deadline), so the first requests find
        # every upstream's state and models known; then in the background.
        await self.health.check_all()
        task = spawn(self.health.run(), name="upstream-health")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.wait({task})

    async def _probe_upstream(self, upstream: Upstream) -> ProbeResult:
        """Each probe reads the upstream's token from the secret store first (off the loop:
        a keyring read takes milliseconds), so a token the owner fixed while LM Gate runs is
        used from that probe on, requests included."""
        session = self._session
        if session is None:
            return ProbeResult(failure="LM Gate is stopping")
        name = upstream.name
        token = self._forward.token_of(name)
        if name not in self._reading_token:
            # One read at a time: a keyring stuck on an unlock prompt must not pile up threads.
            self._reading_token.add(name)
            try:
                read = await asyncio.to_thread(read_token, self._secrets, name, upstream.spec.url)
            except Exception:  # an unreadable store: keep the token read at the start
                token = self._forward.token_of(name)
            else:
                token = read.token
                self._say_refusal(name, read.refused)
            finally:
                self._reading_token.discard(name)
        if token != self._forward.token_of(name):
            log.info("upstream %s: its token changed in the secret store; using the new one", name)
            self._forward.set_token(name, token)
        return await lmstudio_probe(session, self._forward.token_of)(upstream)

    def _say_refusal(self, name: str, refused: str | None) -> None:
        """Tell the owner once (not at every probe) that a stored token is not sent."""
        if refused is None:
            self._refused.pop(name, None)
        elif self._refused.get(name) != refused:
            self._refused[name] = refused
            log.warning("upstream %s: %s", name, refused)

    def upstream_views(self) -> tuple[UpstreamView, ...]:
        """Each upstream's state now (for the tray, /readyz, metrics and `doctor`)."""
        return self.pool.views()

    async def warm_up(self, model: str) -> float:
        """Load ``model`` before people arrive (the tray's and the CLI's warm-up), by the
        guard's rules: it waits for other models' answers first. Seconds the load took."""
        if not self.guards:
            raise errors.shutting_down()
        upstream = self.pool.choose(model)
        if upstream is None:
            if not self.pool.any_enabled:
                raise errors.no_upstream_enabled()
            raise errors.no_upstream(model)
        return await self.guards[upstream.name].warm_up(model)

    async def _revocation_watchdog(self, app: web.Application) -> AsyncIterator[None]:
        async def watch() -> None:
            while True:
                await asyncio.sleep(REVALIDATE_SECONDS)
                await self.end_revoked_requests()

        task = spawn(watch(), name="revocation-watchdog")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.wait({task})
            self._state.close()

    async def end_revoked_requests(self) -> int:
        """End every running request whose credential is no longer valid; how many. A stream
        ends with an SSE error; a request still waiting for LM Studio's answer with a 401."""
        running = [
            exchange
            for exchange in self._inflight
            if exchange.caller is not None
            and exchange.task is not None
            and not exchange.task.done()
        ]
        if not running:
            return 0
        callers = {exchange.caller for exchange in running if exchange.caller is not None}
        try:
            validity = await self._state.call(self._validity, callers)
        except StorageError:
            # Cannot be told now; a running stream was checked when it began, and is checked
            # again once the database answers (the outage is logged once).
            return 0
        ended = 0
        for exchange in running:
            caller, task = exchange.caller, exchange.task
            if caller is None or task is None or task.done() or validity.get(caller, True):
                continue
            error = errors.credential_revoked()
            relay = exchange.outcome.relay
            if relay is not None:
                relay.abort(error)
            elif exchange.aborted_with is None:
                exchange.aborted_with = error
                task.cancel()
            ended += 1
        return ended

    def _validity(self, callers: set[Principal]) -> dict[Principal, bool]:
        """Whether each caller's credential may go on; a caller that cannot be told is left
        out (its request goes on)."""
        validity: dict[Principal, bool] = {}
        for caller in callers:
            try:
                validity[caller] = self._auth.still_valid(caller)
            except StorageError:
                break  # the database cannot be read: nothing more can be told either
            except Exception:
                log.exception("checking a running stream's credential failed")
        return validity

    async def _answer_aborted(self, exchange: Exchange) -> web.StreamResponse:
        error = exchange.aborted_with or errors.shutting_down()
        exchange.error = error.code
        relay = exchange.outcome.relay
        if relay is not None and relay.committed:
            return await relay.fail(error)
        return error.to_response(exchange.request_id)

    async def _on_shutdown(self, app: web.Application) -> None:
        """Let in-flight requests finish for ``server.shutdown_grace`` seconds, then close them."""
        self._stopping = True
        if self._inflight:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), self.config.server_shutdown_grace)
        for exchange in list(self._inflight):
            upstream = exchange.outcome.upstream
            if upstream is not None:
                # The relay or reader sees the closed connection and ends the answer itself.
                upstream.close()
            elif exchange.task is not None and not exchange.task.done():
                exchange.aborted_with = errors.shutting_down()
                exchange.task.cancel()

    def _finish(self, exchange: Exchange) -> None:
        outcome = exchange.outcome
        error = exchange.error or outcome.error
        usage = outcome.usage
        counted = usage
        generation = exchange.generation
        if generation is not None:
            # Settled and recorded in one step: no usage counted twice, or never, by a budget.
            exchange.generation = None
            # Charged by what reached LM Studio, not by how the client left: a hang-up
            # mid-answer, or before a non-streamed answer's headers, still pays for it; a
            # wait that ended in a refusal pays nothing.
            upstream = outcome.upstream
            reached = outcome.sent and (upstream is None or upstream.status < 400)
            counted = generation.settle(
                usage,
                outcome.bytes_out if reached else 0,
                reached=reached,
                unanswered=reached and upstream is None and outcome.relay is None,
            )
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
                "budget_exceeded",
                "queue_full",
                "queue_timeout",
                "model_busy",
            }:
                self.metrics.rate_limited(error)
        if (
            self._recorder is not None
            and exchange.principal is not None
            and exchange.route != "/pair"
        ):
            self._recorder.record(exchange.principal, counted, exchange.begun)
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
        if outcome.served_by is not None and self._forward.several:
            fields["upstream"] = outcome.served_by
        if usage is not None:
            fields["prompt_tokens"] = usage.prompt_tokens
            fields["completion_tokens"] = usage.completion_tokens
        if error:
            fields["error"] = error
        access_log.info("request", extra={"access": fields})
