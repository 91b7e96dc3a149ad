"""Anthropic-API clients (Claude Code, the official ``anthropic`` SDK) and openai's
``models.retrieve``, through a real gateway on a socket.

LM Studio answers ``/v1/messages`` but has no ``/v1/messages/count_tokens``, which Claude
Code calls before its turns: the gateway answers it itself. ``GET /v1/models/{id}`` is
answered from the caller's filtered list, and never tells a caller that a model it may not
use exists."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anthropic
import openai
import pytest
from aiohttp import web

from tests.conftest import LMSTUDIO_TOKEN, IdentityFactory, IdentityRig
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tray_app.gateway.token_estimate import METHOD, METHOD_HEADER
from tray_app.identity.principal import ALL_SCOPES

SLASHED = "qwen/qwen3-4b"  # LM Studio's model IDs often hold a slash


class AnthropicUpstream:
    """LM Studio's /v1/messages as it streams: Anthropic's event sequence."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_route("*", "/{tail:.*}", self._anything)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def paths(self) -> list[str]:
        return [path for path, _, _ in self.received]

    async def _models(self, request: web.Request) -> web.Response:
        self.received.append((request.path, dict(request.headers), b""))
        ids = [*MODELS, SLASHED]
        return web.json_response(
            {"object": "list", "data": [{"id": i, "object": "model"} for i in ids]}
        )

    async def _anything(self, request: web.Request) -> web.Response:
        self.received.append((request.path, dict(request.headers), await request.read()))
        return web.json_response({"fake": "anything"})

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append((request.path, dict(request.headers), body))
        model = json.loads(body)["model"]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        events = [
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": "msg_1",
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": 9, "output_tokens": 0},
                    },
                },
            ),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            *(
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": word},
                    },
                )
                for word in ("Hello", " from", " LM Studio")
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 3},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        for name, data in events:
            await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        await response.write_eof()
        return response


@pytest.fixture
async def upstream() -> AsyncIterator[AnthropicUpstream]:
    fake = AnthropicUpstream()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def rig(start_identity_gateway: IdentityFactory, upstream: AnthropicUpstream) -> IdentityRig:
    return await start_identity_gateway(upstream_url=upstream.url, routes_enable_messages=True)


def claude(rig: IdentityRig, key: str, **options: object) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=rig.url, max_retries=0, **options, api_key=key)  # type: ignore[arg-type]


def key_for(rig: IdentityRig, models: frozenset[str] | None = None) -> str:
    return rig.identity.api_keys.create("claude", scopes=ALL_SCOPES, models=models)[0]


async def test_streams_a_message_with_anthropic_headers_and_no_client_key(
    rig: IdentityRig, upstream: AnthropicUpstream
) -> None:
    key = key_for(rig)
    sent = {"anthropic-version": "2023-06-01", "anthropic-beta": "tools-2024-04-04"}
    async with (
        claude(rig, key, default_headers=sent) as client,
        client.messages.stream(
            model=MODELS[0], max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        ) as stream,
    ):
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Hello from LM Studio"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 3
    # The gateway's own read of which models are loaded (its model guard) aside.
    assert [p for p in upstream.paths if p != "/api/v0/models"] == ["/v1/messages"]
    _, headers, _ = next(r for r in upstream.received if r[0] == "/v1/messages")
    lowered = {name.lower(): value for name, value in headers.items()}
    assert lowered["anthropic-version"] == "2023-06-01"
    assert lowered["anthropic-beta"] == "tools-2024-04-04"
    # The SDK sends the key as X-API-Key: it is the caller's credential, never LM Studio's.
    assert "x-api-key" not in lowered
    assert key not in json.dumps(headers)
    assert lowered["authorization"] == f"Bearer {LMSTUDIO_TOKEN}"


async def test_an_auth_token_client_like_claude_code_streams_too(
    rig: IdentityRig, upstream: AnthropicUpstream
) -> None:
    # Claude Code's ANTHROPIC_AUTH_TOKEN is sent as "Authorization: Bearer".
    key = key_for(rig)
    async with anthropic.AsyncAnthropic(base_url=rig.url, auth_token=key, max_retries=0) as client:
        reply = await client.messages.create(
            model=MODELS[0],
            max_tokens=64,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
        )
        kinds = [event.type async for event in reply]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert key not in json.dumps(upstream.received[0][1])


async def test_count_tokens_is_answered_here_with_an_estimate(
    rig: IdentityRig, upstream: AnthropicUpstream
) -> None:
    async with claude(rig, key_for(rig)) as client:
        raw = await client.messages.with_raw_response.count_tokens(
            model=MODELS[0],
            system="You are terse.",  # 14 characters
            messages=[{"role": "user", "content": "x" * 400}],
        )
    counted = await raw.parse()
    # ceil(414 / 4) = 104, and 4 tokens of framing for the one message.
    assert counted.input_tokens == 108
    assert raw.headers[METHOD_HEADER] == METHOD
    assert upstream.received == [], "LM Studio has no such endpoint and is never asked"


async def test_count_tokens_keeps_the_keys_model_allowlist(
    rig: IdentityRig, upstream: AnthropicUpstream
) -> None:
    async with claude(rig, key_for(rig, frozenset({MODELS[1]}))) as client:
        with pytest.raises(anthropic.PermissionDeniedError) as refused:
            await client.messages.count_tokens(
                model=MODELS[0], messages=[{"role": "user", "content": "hi"}]
            )
    error = refused.value.body["error"]  # type: ignore[index]
    assert (refused.value.status_code, error["code"], error["param"]) == (
        403,
        "model_not_allowed",
        "model",
    )
    assert upstream.received == []


async def test_count_tokens_refuses_a_body_without_messages(rig: IdentityRig) -> None:
    async with claude(rig, key_for(rig)) as client:
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.post(
                "/v1/messages/count_tokens",
                body={"model": MODELS[0], "messages": "hi"},
                cast_to=object,
            )
    error = refused.value.body["error"]  # type: ignore[index]
    assert (refused.value.status_code, error["code"], error["param"]) == (
        400,
        "invalid_messages",
        "messages",
    )


async def test_count_tokens_is_off_while_messages_is_off(
    start_identity_gateway: IdentityFactory, upstream: AnthropicUpstream
) -> None:
    rig = await start_identity_gateway(upstream_url=upstream.url)
    async with claude(rig, key_for(rig)) as client:
        with pytest.raises(anthropic.NotFoundError) as refused:
            await client.messages.count_tokens(
                model=MODELS[0], messages=[{"role": "user", "content": "hi"}]
            )
    error = refused.value.body["error"]  # type: ignore[index]
    assert (refused.value.status_code, error["code"], error["param"]) == (
        404,
        "route_disabled",
        None,
    )


def openai_client(rig: IdentityRig, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=rig.url + "/v1", api_key=key, max_retries=0)


async def test_models_retrieve_answers_from_the_filtered_list(
    rig: IdentityRig, upstream: AnthropicUpstream
) -> None:
    async with openai_client(rig, key_for(rig, frozenset({MODELS[0], SLASHED}))) as client:
        model = await client.models.retrieve(MODELS[0])
        slashed = await client.models.retrieve(SLASHED)  # sent as qwen%2Fqwen3-4b
    assert (model.id, model.object) == (MODELS[0], "model")
    assert slashed.id == SLASHED
    assert upstream.paths == ["/v1/models", "/v1/models"]


@pytest.mark.parametrize("model", [MODELS[1], "no-such-model"], ids=["hidden", "missing"])
async def test_models_retrieve_never_confirms_a_hidden_model(
    rig: IdentityRig, upstream: AnthropicUpstream, model: str
) -> None:
    async with openai_client(rig, key_for(rig, frozenset({MODELS[0]}))) as client:
        with pytest.raises(openai.NotFoundError) as refused:
            await client.models.retrieve(model)
    error = refused.value.body
    assert isinstance(error, dict)
    assert (refused.value.status_code, error["code"], error["param"], error["type"]) == (
        404,
        "model_not_found",
        "model",
        "invalid_request_error",
    )
    # The same words for a hidden model as for one that does not exist.
    assert error["message"] == (
        f"The model {model!r} does not exist or you do not have access to it."
    )


async def test_models_retrieve_needs_the_models_scope(
    rig: IdentityRig, upstream: AnthropicUpstream
) -> None:
    key = rig.identity.api_keys.create("chat only", scopes=frozenset({"chat"}))[0]
    async with openai_client(rig, key) as client:
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.models.retrieve(MODELS[0])
    assert refused.value.status_code == 403
    assert isinstance(refused.value.body, dict)
    assert (refused.value.body["code"], refused.value.body["param"]) == ("insufficient_scope", None)
    assert upstream.received == []


async def test_models_retrieve_through_the_plain_fake(
    start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
) -> None:
    rig = await start_identity_gateway()
    async with openai_client(rig, key_for(rig)) as client:
        model = await client.models.retrieve(MODELS[2])
    assert model.id == MODELS[2]
    assert fake_lmstudio.paths == ["/v1/models"]
