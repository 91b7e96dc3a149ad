"""Body rules: a JSON object, a size cap, ttl dropped, model required, MCP tools removed."""

from __future__ import annotations

import io
import json

import aiohttp
import pytest

from tests.conftest import CLIENT_KEY, GatewayFactory, auth_headers
from tests.fake_lmstudio import FakeLMStudio
from tests.helpers import FixedPrincipalAuthenticator
from tray_app.auth import ALL_SCOPES, Principal
from tray_app.body import apply_principal_rules, prepare_body
from tray_app.routes import FORWARDED_ROUTES
from tray_app.server import GatewayServer


async def post(
    server: GatewayServer, path: str, data: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            server.url + path,
            data=io.BytesIO(data) if len(data) > 2**20 else data,
            headers={**auth_headers(), "Content-Type": "application/json", **(headers or {})},
        ) as r,
    ):
        return r.status, await r.json()


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b"not json", "not valid JSON"),
        (b'{"model": "m",', "not valid JSON"),
        (b"[1, 2]", "JSON object, not a JSON list"),
        (b'"text"', "JSON object, not a JSON str"),
        (b"\xff\xfe{\x00}\x00", "not UTF-8"),  # UTF-16: valid to json.loads, not to HTTP JSON
        (b'{"model": "\xc3\x28"}', "not UTF-8"),
    ],
)
async def test_post_needs_a_json_object(
    gateway: GatewayServer, fake_lmstudio: FakeLMStudio, body: bytes, fragment: str
) -> None:
    status, payload = await post(gateway, "/v1/chat/completions", body)
    assert status == 400
    assert fragment in payload["error"]["message"]
    assert payload["error"]["type"] == "invalid_request_error"
    assert fake_lmstudio.received == []


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"messages": []}, "missing_model"),
        ({"model": "", "messages": []}, "invalid_model"),
        ({"model": 42, "messages": []}, "invalid_model"),
        ({"model": "x" * 300, "messages": []}, "invalid_model"),
        ({"model": "m", "stream": "yes"}, "invalid_stream"),
    ],
)
async def test_model_and_stream_are_checked(
    gateway: GatewayServer, fake_lmstudio: FakeLMStudio, body: dict, code: str
) -> None:
    status, payload = await post(gateway, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400
    assert payload["error"]["code"] == code
    assert fake_lmstudio.received == []


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/embeddings"])
async def test_model_is_required_on_every_inference_endpoint(
    gateway: GatewayServer, fake_lmstudio: FakeLMStudio, path: str
) -> None:
    status, payload = await post(gateway, path, b'{"input": "x", "prompt": "x"}')
    assert (status, payload["error"]["param"]) == (400, "model")


async def test_body_over_the_cap_is_413_declared(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    server = await start_gateway(max_body_bytes=2048)
    status, payload = await post(
        server, "/v1/chat/completions", json.dumps({"model": "m", "pad": "x" * 4000}).encode()
    )
    assert status == 413
    assert payload["error"]["code"] == "body_too_large"
    assert fake_lmstudio.received == []


async def test_body_over_the_cap_is_413_chunked(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    server = await start_gateway(max_body_bytes=2048)

    async def chunks():  # no Content-Length: the cap must hold while reading
        yield b'{"model": "m", "pad": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    async with (
        aiohttp.ClientSession() as s,
        s.post(server.url + "/v1/chat/completions", data=chunks(), headers=auth_headers()) as r,
    ):
        assert r.status == 413
        assert (await r.json())["error"]["code"] == "body_too_large"
    assert fake_lmstudio.received == []


async def test_default_cap_takes_an_image_input(
    gateway: GatewayServer, fake_lmstudio: FakeLMStudio
) -> None:
    image = "data:image/png;base64," + "A" * (8 * 1024 * 1024)  # an 8 MiB photo
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}
        ],
    }
    status, _ = await post(gateway, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200


async def test_ttl_is_dropped_and_the_rest_kept(
    gateway: GatewayServer, fake_lmstudio: FakeLMStudio
) -> None:
    body = {
        "model": "m",
        "ttl": 1,
        "temperature": 0.2,
        "messages": [{"role": "user", "content": "héllo"}],
    }
    status, _ = await post(gateway, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200
    received = fake_lmstudio.received[0].json()
    assert "ttl" not in received
    assert received == {k: v for k, v in body.items() if k != "ttl"}


async def test_unchanged_bodies_are_forwarded_byte_for_byte(
    gateway: GatewayServer, fake_lmstudio: FakeLMStudio
) -> None:
    raw = b'{ "model" :"m",\n  "messages": [ ],  "temperature":0.70 }'
    status, _ = await post(gateway, "/v1/chat/completions", raw, {"Content-Type": "text/plain"})
    assert status == 200
    assert fake_lmstudio.received[0].body == raw
    # whatever the client claimed, LM Studio is told it is JSON
    assert fake_lmstudio.received[0].headers["Content-Type"] == "application/json"


async def test_mcp_tools_are_removed_from_responses(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    server = await start_gateway(enable_responses=True, enable_messages=True)
    function_tool = {"type": "function", "name": "add", "parameters": {}}
    body = {
        "model": "m",
        "input": "hi",
        "tools": [
            {"type": "mcp", "server_label": "x", "server_url": "https://evil.example/mcp"},
            function_tool,
        ],
    }
    status, _ = await post(server, "/v1/responses", json.dumps(body).encode())
    assert status == 200
    assert fake_lmstudio.received[-1].json()["tools"] == [function_tool]

    only_mcp = {
        "model": "m",
        "input": "hi",
        "tool_choice": "required",
        "tools": [{"type": "mcp", "server_url": "https://evil.example/mcp"}],
    }
    await post(server, "/v1/responses", json.dumps(only_mcp).encode())
    forwarded = fake_lmstudio.received[-1].json()
    assert "tools" not in forwarded and "tool_choice" not in forwarded

    anthropic = {
        "model": "m",
        "max_tokens": 5,
        "messages": [],
        "mcp_servers": [{"type": "url", "url": "https://evil.example/mcp"}],
    }
    await post(server, "/v1/messages", json.dumps(anthropic).encode())
    assert "mcp_servers" not in fake_lmstudio.received[-1].json()


async def test_model_allowlist_hook_refuses_other_models(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    principal = Principal("phone", ALL_SCOPES, models=frozenset({"qwen2.5-7b-instruct"}))
    server = await start_gateway(authenticator=FixedPrincipalAuthenticator(CLIENT_KEY, principal))
    status, payload = await post(
        server, "/v1/chat/completions", b'{"model": "llama-3.2-1b-instruct", "messages": []}'
    )
    assert status == 403
    assert payload["error"]["code"] == "model_not_allowed"
    assert fake_lmstudio.received == []
    status, _ = await post(
        server, "/v1/chat/completions", b'{"model": "qwen2.5-7b-instruct", "messages": []}'
    )
    assert status == 200


async def test_models_list_hook_shows_only_allowed_models(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    principal = Principal("phone", ALL_SCOPES, models=frozenset({"llama-3.2-1b-instruct"}))
    server = await start_gateway(authenticator=FixedPrincipalAuthenticator(CLIENT_KEY, principal))
    async with (
        aiohttp.ClientSession() as s,
        s.get(server.url + "/v1/models", headers=auth_headers()) as r,
    ):
        ids = [m["id"] for m in (await r.json())["data"]]
    assert ids == ["llama-3.2-1b-instruct"]


async def test_scope_hook_refuses_a_route_outside_the_scopes(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    principal = Principal("phone", frozenset({"chat"}))
    server = await start_gateway(authenticator=FixedPrincipalAuthenticator(CLIENT_KEY, principal))
    status, payload = await post(server, "/v1/embeddings", b'{"model": "e", "input": "x"}')
    assert (status, payload["error"]["code"]) == (403, "insufficient_scope")
    assert fake_lmstudio.received == []


# ---- asking LM Studio for usage on streams --------------------------------------------------

CHAT_ROUTE = next(r for r in FORWARDED_ROUTES if r.path == "/v1/chat/completions")


def test_usage_option_is_added_without_re_encoding_the_body() -> None:
    raw = b' {"model" : "m",\n "stream":true, "messages":[{"role":"user","content":"h\\u00e9"}]}'
    adjusted = apply_principal_rules(
        prepare_body(CHAT_ROUTE, raw), CHAT_ROUTE, max_tokens=None, want_usage=True
    )
    assert adjusted.hide_usage
    # The client's own bytes follow the added member untouched (escapes, spacing, order).
    assert adjusted.body.raw.endswith(raw.lstrip()[1:])
    assert json.loads(adjusted.body.raw) == {
        **json.loads(raw),
        "stream_options": {"include_usage": True},
    }


@pytest.mark.parametrize(
    ("options", "sent"),
    [
        ({"include_usage": False}, {"include_usage": True}),
        ({"other": 1}, {"other": 1, "include_usage": True}),
        ("nonsense", {"include_usage": True}),
        ({"include_usage": True}, {"include_usage": True}),
    ],
)
def test_existing_stream_options_are_merged(options: object, sent: dict[str, object]) -> None:
    body = {"model": "m", "stream": True, "stream_options": options, "messages": []}
    prepared = prepare_body(CHAT_ROUTE, json.dumps(body).encode())
    adjusted = apply_principal_rules(prepared, CHAT_ROUTE, max_tokens=None, want_usage=True)
    assert json.loads(adjusted.body.raw) == {**body, "stream_options": sent}
    assert adjusted.hide_usage == (options != {"include_usage": True})


def test_a_capped_stream_gets_both_the_cap_and_the_usage_option() -> None:
    raw = b'{"model":"m","stream":true,"max_tokens":9000,"messages":[]}'
    adjusted = apply_principal_rules(
        prepare_body(CHAT_ROUTE, raw), CHAT_ROUTE, max_tokens=100, want_usage=True
    )
    assert json.loads(adjusted.body.raw) == {
        "model": "m",
        "stream": True,
        "max_tokens": 100,
        "messages": [],
        "stream_options": {"include_usage": True},
    }
