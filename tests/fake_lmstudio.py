"""A fake LM Studio server for tests: a real aiohttp server on 127.0.0.1, port 0.

It speaks the OpenAI-compatible endpoints LM Studio serves (models, chat JSON and SSE,
completions, embeddings, responses, messages), answers every other path with 200 like the real
one does, and records every request it receives so tests can prove what reached it. Behaviour
is set through :class:`Behaviour` (chunk counts, delays, a mid-stream failure, status overrides,
and the shapes a hostile or broken LM Studio sends: CRLF or CR line ends, an oversized or
never-ending SSE event, compression bombs). Its own tests are in ``test_fake_lmstudio.py``.

It can also simulate LM Studio's memory (set :attr:`FakeLMStudio.loaded` to a list): the
native ``/api/v0/models`` says which models are loaded, ``/api/v1/models/load`` loads one
after ``Behaviour.load_delay``, a request naming a listed model that is not loaded loads it
first (JIT), and a load beyond ``Behaviour.max_loaded`` evicts the oldest model, cutting off
its running streams mid-answer — LM Studio's bug #671, which the model guard must prevent.
Simultaneous first requests each start a load of their own (#1751). Counters (``loads``,
``evicted``, ``streams_cut``) let tests show what happened.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests import fake_lmstudio_apis as apis
from tray_app.control.loop_thread import LoopThread

NATIVE_MODEL_PATHS = frozenset({"/api/v0/models", "/api/v1/models/load"})
MODELS = ("qwen2.5-7b-instruct", "llama-3.2-1b-instruct", "nomic-embed-text-v1.5")


@dataclass
class Behaviour:
    chunks: int = 5  # content chunks in a streamed answer
    chunk_delay: float = 0.0  # seconds between chunks
    header_delay: float = 0.0  # seconds before response headers (any endpoint)
    first_chunk_delay: float = 0.0  # seconds after SSE headers before the first chunk
    fail_after: int | None = None  # cut the connection after this many stream chunks
    status: int | None = None  # answer every inference request with this status...
    error_body: bytes | None = None  # ...and this body (default: OpenAI-shaped JSON)
    error_content_type: str = "application/json"
    extra_response_headers: dict[str, str] = field(default_factory=dict)
    gzip_json: bool = False  # compress JSON answers even when asked not to (= compress "gzip")
    compress: str | None = None  # "gzip" or "deflate": compress JSON answers so
    json_bytes: int | None = None  # ...padded (field "pad") to exactly this size before it
    line_end: bytes = b"\n"  # SSE line end: b"\r\n" and b"\r" are valid SSE too
    event_bytes: int | None = None  # pad the first content event to exactly this size
    # After the content chunks, one event of this many bytes that never ends; then the
    # connection stays open for hold_open seconds (or until the client goes away).
    unterminated_event_bytes: int | None = None
    hold_open: float = 30.0
    require_token: str | None = None  # act like "Require Authentication" is on
    reply: str | None = None  # stream this text (split into `chunks` pieces) instead of tokN
    reasoning: str | None = None  # stream this as delta.reasoning before the answer
    models: tuple[str, ...] = MODELS  # what GET /v1/models lists: () = none loaded
    # LM Studio's memory, when FakeLMStudio.loaded is a list (the models above are on disk):
    load_delay: float = 0.0  # seconds a load takes
    max_loaded: int = 1  # models in memory at once; a load past it evicts the oldest
    load_error: str | None = None  # /api/v1/models/load answers 500 with this message
    native_api: bool = True  # False: /api/v0/models and the load answer 404 (llama.cpp)
    native_delay: float = 0.0  # seconds before the native model API answers (header_delay's twin)
    # /v1/messages and /v1/responses streams write their first event in this many pieces, a
    # pause between (each its own read on the other side).
    first_event_pieces: int = 1


@dataclass
class Received:
    method: str
    path: str  # the raw path as sent on the wire
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


class _Stream:
    """A running SSE answer, which an eviction can cut off."""

    def __init__(self, request: web.BaseRequest) -> None:
        self.request = request
        self.cut = False


class FakeLMStudio:
    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.received: list[Received] = []
        # The gateway's own calls to the native model API (its model guard), kept apart from
        # what it forwarded: tests of forwarding see only what a caller's request caused.
        self.native: list[Received] = []
        self.disconnects: list[float] = []  # monotonic times a client went away mid-answer
        self.chunk_sent_at: list[float] = []  # monotonic times each SSE chunk was written
        self.connections: set[object] = set()  # client (host, port) pairs seen: pooling shows
        self.disconnected = asyncio.Event()
        # None: memory is not simulated (every listed model counts as loaded, none is ever
        # evicted); a list: the models in memory, oldest load first.
        self.loaded: list[str] | None = None
        self.loads: Counter[str] = Counter()  # loads started per model (JIT ones included)
        self.evicted: list[str] = []  # each model evicted, in order
        self.streams_cut: list[str] = []  # the model of each stream an eviction cut off
        self._streaming: dict[str, set[_Stream]] = {}
        self._load_tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.received]

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        app = web.Application(client_max_size=1024**3)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_get("/api/v0/models", self._native_models)
        app.router.add_post("/api/v1/models/load", self._load_endpoint)
        app.router.add_route("*", "/{tail:.*}", self._anything)
        app.middlewares.append(self._record)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        for task in list(self._load_tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- recording and common behaviour -----------------------------------------------------

    @web.middleware
    async def _record(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        body = await request.read()
        if request.transport is not None:
            self.connections.add(request.transport.get_extra_info("peername"))
        seen = Received(
            request.method, request.raw_path, dict(request.headers), body, time.monotonic()
        )
        native = request.path in NATIVE_MODEL_PATHS
        (self.native if native else self.received).append(seen)
        b = self.behaviour
        expected = f"Bearer {b.require_token}"
        if b.require_token is not None and request.headers.get("Authorization") != expected:
            return web.json_response({"error": {"message": "Invalid token"}}, status=401)
        if native:
            if b.native_delay:
                await asyncio.sleep(b.native_delay)
            return await handler(request)
        if b.header_delay:
            try:
                await asyncio.sleep(b.header_delay)
            except asyncio.CancelledError:
                self._note_disconnect()
                raise
        if b.status is not None and request.path.startswith("/v1/"):
            body_out = b.error_body
            if body_out is None:
                body_out = json.dumps(
                    {"error": {"message": f"fake error {b.status}", "type": "server_error"}}
                ).encode()
            return web.Response(
                status=b.status, body=body_out, headers={"Content-Type": b.error_content_type}
            )
        response = await handler(request)
        for name, value in b.extra_response_headers.items():
            response.headers[name] = value
        return response

    def _note_disconnect(self) -> None:
        self.disconnects.append(time.monotonic())
        self.disconnected.set()

    def _json(self, payload: Any) -> web.Response:
        b = self.behaviour
        encoding = b.compress or ("gzip" if b.gzip_json else None)
        if b.json_bytes is not None:
            if encoding is None:
                return web.Response(
                    body=b"".join(_padded_json(payload, b.json_bytes)),
                    content_type="application/json",
                )
            return web.Response(
                body=_compressed(_padded_json(payload, b.json_bytes), encoding),
                headers={"Content-Type": "application/json", "Content-Encoding": encoding},
            )
        body = json.dumps(payload).encode()
        if encoding is not None:
            compressed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
            return web.Response(
                body=compressed,
                headers={"Content-Type": "application/json", "Content-Encoding": encoding},
            )
        return web.Response(body=body, content_type="application/json")

    # ---- endpoints ----------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.StreamResponse:
        return self._json(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "owned_by": "organization_owner"}
                    for m in self.behaviour.models
                ],
            }
        )

    # ---- LM Studio's memory: the native model list, loads, JIT loading, eviction -----------

    def is_loaded(self, model: str) -> bool:
        return model in self.behaviour.models if self.loaded is None else model in self.loaded

    async def _native_models(self, request: web.Request) -> web.StreamResponse:
        if not self.behaviour.native_api:
            return _not_found("Unexpected endpoint or method. (GET /api/v0/models)")
        return self._json(
            {
                "object": "list",
                "data": [
                    {
                        "id": m,
                        "object": "model",
                        "type": "embeddings" if "embed" in m else "llm",
                        "publisher": "lmstudio-community",
                        "arch": "fake",
                        "compatibility_type": "gguf",
                        "quantization": "Q4_K_M",
                        "state": "loaded" if self.is_loaded(m) else "not-loaded",
                        "max_context_length": 32768,
                    }
                    for m in self.behaviour.models
                ],
            }
        )

    async def _load_endpoint(self, request: web.Request) -> web.StreamResponse:
        b = self.behaviour
        if not b.native_api:
            return _not_found("Unexpected endpoint or method. (POST /api/v1/models/load)")
        payload = await request.json()
        model = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(model, str) or model not in b.models:
            return _not_found(f"Model not found: {model}")
        if b.load_error is not None:
            self.loads[model] += 1
            return web.json_response({"error": {"message": b.load_error}}, status=500)
        started = time.monotonic()
        await self._load(model)
        return web.json_response(
            {
                "model_instance_id": model,
                "config": {"context_length": 4096},
                "load_time_seconds": round(time.monotonic() - started, 3),
            }
        )

    async def _load(self, model: str) -> None:
        """Load ``model``; like LM Studio's, the load goes on when the asker goes away."""
        task = asyncio.ensure_future(self._loading(model))
        self._load_tasks.add(task)
        task.add_done_callback(self._load_tasks.discard)
        await asyncio.shield(task)

    async def _loading(self, model: str) -> None:
        self.loads[model] += 1
        if self.loaded is None:  # memory not simulated: a load only takes its time
            await asyncio.sleep(self.behaviour.load_delay)
            return
        # Memory is freed first, as LM Studio does: the evicted model's answers stop at once.
        while len(self.loaded) >= self.behaviour.max_loaded:
            others = [m for m in self.loaded if m != model]
            if not others:
                break
            self._evict(others[0])
        await asyncio.sleep(self.behaviour.load_delay)
        if model not in self.loaded:
            self.loaded.append(model)

    def _evict(self, model: str) -> None:
        assert self.loaded is not None
        self.loaded.remove(model)
        self.evicted.append(model)
        for stream in self._streaming.pop(model, set()):
            stream.cut = True
            self.streams_cut.append(model)
            if stream.request.transport is not None:
                stream.request.transport.abort()

    async def _jit(self, model: str) -> web.Response | None:
        """What LM Studio does before answering a request naming ``model``: load it if it is
        on disk but not in memory (evicting others), or refuse a model it does not have."""
        if self.loaded is None or model in self.loaded:
            return None
        if model not in self.behaviour.models:
            return _not_found(f"Model not found: {model}")
        await self._load(model)
        return None

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        if (refusal := await self._jit(payload["model"])) is not None:
            return refusal
        inputs = payload["input"] if isinstance(payload["input"], list) else [payload["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": [0.1 * (i + 1), 0.2, 0.3]}
            for i in range(len(inputs))
        ]
        return self._json(
            {
                "object": "list",
                "data": data,
                "model": payload["model"],
                "usage": {"prompt_tokens": 4 * len(inputs), "total_tokens": 4 * len(inputs)},
            }
        )

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        length = apis.answer_length(payload, self.behaviour.chunks, "max_tokens")
        if not payload.get("stream"):
            return self._json(apis.messages_answer(payload, length))
        events = apis.messages_events(payload, length, self.behaviour.line_end)
        return await self._stream_events(request, events)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        length = apis.answer_length(payload, self.behaviour.chunks, "max_output_tokens")
        if not payload.get("stream"):
            return self._json(apis.responses_answer(payload, length))
        events = apis.responses_events(payload, length, self.behaviour.line_end)
        return await self._stream_events(request, events)

    async def _stream_events(self, request: web.Request, events: list[bytes]) -> web.StreamResponse:
        b = self.behaviour
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        first, rest = events[0], events[1:]
        size = -(-len(first) // b.first_event_pieces)
        pieces = [first[i : i + size] for i in range(0, len(first), size)]
        try:
            for piece in pieces:
                await response.write(piece)
                if len(pieces) > 1:
                    await asyncio.sleep(0.02)
            for event in rest:
                if b.chunk_delay:
                    await asyncio.sleep(b.chunk_delay)
                await response.write(event)
        except (asyncio.CancelledError, ConnectionResetError):
            self._note_disconnect()
            raise
        return response

    async def _anything(self, request: web.Request) -> web.StreamResponse:
        # The real server answers unknown paths with 200, which is why the gateway must not
        # forward them: a scanner would think it found something.
        return web.json_response({"fake": "anything", "path": request.path})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        model = payload.get("model", "unknown")
        if (refusal := await self._jit(model)) is not None:
            return refusal
        # Like a real model, it stops at the request's max_tokens (one token per chunk here).
        length = _answer_length(payload, self.behaviour.chunks)
        if not payload.get("stream"):
            words = [f"tok{i}" for i in range(length)]
            return self._json(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": 1,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": " ".join(words)},
                        }
                    ],
                    "usage": {
                        "prompt_tokens": 7,
                        "completion_tokens": len(words),
                        "total_tokens": 7 + len(words),
                    },
                }
            )
        include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        return await self._stream(request, model, include_usage, length)

    async def _stream(
        self, request: web.Request, model: str, include_usage: bool, length: int
    ) -> web.StreamResponse:
        b = self.behaviour
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        stream = _Stream(request)
        running = self._streaming.setdefault(model, set())
        running.add(stream)
        try:
            if b.first_chunk_delay:
                await asyncio.sleep(b.first_chunk_delay)
            eol = b.line_end
            if b.reasoning:
                await response.write(_chunk(model, {"reasoning": b.reasoning}, None, eol))
            for i in range(length):
                if b.fail_after is not None and i == b.fail_after:
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                if i and b.chunk_delay:
                    await asyncio.sleep(b.chunk_delay)
                piece = f"tok{i} " if b.reply is None else _piece(b.reply, i, length)
                size = b.event_bytes if i == 0 else None
                await response.write(_chunk(model, {"content": piece}, None, eol, size))
                self.chunk_sent_at.append(time.monotonic())
            if b.unterminated_event_bytes is not None:
                await _write_unterminated(response, b.unterminated_event_bytes)
                await asyncio.sleep(b.hold_open)
                return response
            await response.write(_chunk(model, {}, "stop", eol))
            if include_usage:
                usage = {
                    "prompt_tokens": 7,
                    "completion_tokens": length,
                    "total_tokens": 7 + length,
                }
                await response.write(
                    b"data: "
                    + json.dumps(
                        {
                            "id": "chatcmpl-fake",
                            "object": "chat.completion.chunk",
                            "created": 1,
                            "model": model,
                            "choices": [],
                            "usage": usage,
                        }
                    ).encode()
                    + eol * 2
                )
            await response.write(b"data: [DONE]" + eol * 2)
        except (asyncio.CancelledError, ConnectionResetError):
            if not stream.cut:  # an eviction's cut is LM Studio's doing, not the client's
                self._note_disconnect()
            raise
        finally:
            running.discard(stream)
        return response


def _not_found(message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=404)


def _answer_length(payload: dict[str, Any], chunks: int) -> int:
    cap = payload.get("max_tokens", payload.get("max_completion_tokens"))
    return min(chunks, cap) if type(cap) is int and cap > 0 else chunks


def _chunk(
    model: str,
    delta: dict[str, str],
    finish: str | None,
    eol: bytes = b"\n",
    size: int | None = None,
) -> bytes:
    """One chat.completion.chunk event; with ``size``, padded (field "pad") to exactly that
    many bytes counted with LF line ends, blank line included."""
    event: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if size is not None:
        event["pad"] = ""
        bare = len(b"data: " + json.dumps(event).encode() + b"\n\n")
        event["pad"] = "x" * (size - bare)
    return b"data: " + json.dumps(event).encode() + eol * 2


_PIECE = 64 * 1024


async def _write_unterminated(response: web.StreamResponse, size: int) -> None:
    await response.write(b"data: ")
    block = b"x" * _PIECE
    left = size - len(b"data: ")
    while left > 0:
        await response.write(block[:left])
        left -= _PIECE


def _padded_json(payload: dict[str, Any], size: int) -> list[bytes]:
    """``payload`` with a "pad" field making it exactly ``size`` bytes, in pieces so that a
    bomb's padding is never one big string."""
    head = json.dumps({**payload, "pad": ""}).encode()
    opening, closing = head[: -len(b'""}')] + b'"', b'"}'
    left = size - len(head)
    pieces = [opening]
    block = b"x" * (1024 * 1024)
    while left > 0:
        pieces.append(block[:left])
        left -= len(block)
    pieces.append(closing)
    return pieces


def _compressed(pieces: list[bytes], encoding: str) -> bytes:
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return b"".join(packer.compress(piece) for piece in pieces) + packer.flush()


def _piece(text: str, index: int, count: int) -> str:
    size = -(-len(text) // count)
    return text[index * size : (index + 1) * size]


def fake_on_a_thread(behaviour: Behaviour | None = None) -> Iterator[FakeLMStudio]:
    """A fake LM Studio on a loop thread of its own, for a fixture to ``yield from``: for code
    under test that runs its own loop (the tray's controller, the tray, the CLI), which a
    test's loop cannot serve."""
    thread = LoopThread()
    thread.start()
    fake = FakeLMStudio(behaviour)
    thread.submit(fake.start()).result(5)
    yield fake
    thread.submit(fake.stop()).result(5)
    thread.stop()
