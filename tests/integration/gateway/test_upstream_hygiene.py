"""Upstream hygiene: which headers cross, whose credentials LM Studio sees, one pooled session."""

from __future__ import annotations

import gzip
import json

import aiohttp

from tests.conftest import CLIENT_KEY, LMSTUDIO_TOKEN, GatewayFactory, auth_headers
from tests.fake_lmstudio import FakeLMStudio
from tests.helpers import raw_request
from tray_app.gateway.server.runner import GatewayServer

CHAT = b'{"model": "m", "messages": []}'


async def test_client_credentials_and_hop_by_hop_headers_never_reach_lm_studio(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    gateway = await start_gateway(cors_allowed_origins=("https://app.example",))
    headers = {
        **auth_headers(),
        "X-API-Key": CLIENT_KEY,
        "Cookie": "session=secret-cookie",
        "Origin": "https://app.example",
        "Referer": "https://app.example/page",
        "Connection": "keep-alive, X-Custom-Hop",
        "X-Custom-Hop": "hop",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "X-Forwarded-For": "203.0.113.9",
        "X-User-Id": "admin",
        "ngrok-skip-browser-warning": "1",
        "Content-Type": "application/json",
        "User-Agent": "OpenAI/Python test",
    }
    response = await raw_request(gateway.port or 0, "POST", "/v1/chat/completions", headers, CHAT)
    assert response.status == 200
    seen = {k.lower(): v for k, v in fake_lmstudio.received[0].headers.items()}
    for name in (
        "x-api-key",
        "cookie",
        "origin",
        "referer",
        "x-custom-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "x-forwarded-for",
        "x-user-id",
        "ngrok-skip-browser-warning",
    ):
        assert name not in seen, name
    assert seen["authorization"] == f"Bearer {LMSTUDIO_TOKEN}"
    assert CLIENT_KEY not in json.dumps(seen)
    assert seen["host"] == f"127.0.0.1:{fake_lmstudio.port}"  # rewritten to LM Studio's
    assert seen["user-agent"] == "OpenAI/Python test"
    assert seen["x-request-id"] == response.headers["x-request-id"]


async def test_without_an_lm_studio_token_no_authorization_is_sent(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    server = await start_gateway(lmstudio_token=None)
    await raw_request(
        server.port or 0,
        "POST",
        "/v1/chat/completions",
        {**auth_headers(), "Content-Type": "application/json"},
        CHAT,
    )
    assert "Authorization" not in fake_lmstudio.received[0].headers


async def test_lm_studios_own_headers_do_not_reach_the_client(
    gateway: GatewayServer, fake_lmstudio: FakeLMStudio
) -> None:
    fake_lmstudio.behaviour.extra_response_headers = {
        "Access-Control-Allow-Origin": "*",
        "Set-Cookie": "lmstudio=1",
        "X-Powered-By": "Express",
        "Keep-Alive": "timeout=99",
    }
    response = await raw_request(
        gateway.port or 0,
        "POST",
        "/v1/chat/completions",
        {**auth_headers(), "Content-Type": "application/json"},
        CHAT,
    )
    assert response.status == 200
    for name in ("access-control-allow-origin", "set-cookie", "x-powered-by", "keep-alive"):
        assert name not in response.headers, name
    assert response.headers["content-type"].startswith("application/json")


async def test_compressed_answers_are_relayed_untouched(
    gateway: GatewayServer, fake_lmstudio: FakeLMStudio
) -> None:
    fake_lmstudio.behaviour.gzip_json = True
    response = await raw_request(
        gateway.port or 0,
        "POST",
        "/v1/chat/completions",
        {**auth_headers(), "Content-Type": "application/json"},
        CHAT,
    )
    # auto_decompress=False: the bytes and their Content-Encoding stay together.
    assert response.headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(response.body))["object"] == "chat.completion"
    assert fake_lmstudio.received[0].headers["Accept-Encoding"] == "identity"


async def test_model_list_filtering_copes_with_a_compressed_answer(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    from tests.helpers import FixedPrincipalAuthenticator
    from tray_app.identity.principal import ALL_SCOPES, Principal

    fake_lmstudio.behaviour.gzip_json = True
    principal = Principal("p", ALL_SCOPES, models=frozenset({"qwen2.5-7b-instruct"}))
    server = await start_gateway(authenticator=FixedPrincipalAuthenticator(CLIENT_KEY, principal))
    async with (
        aiohttp.ClientSession() as s,
        s.get(server.url + "/v1/models", headers=auth_headers()) as r,
    ):
        assert [m["id"] for m in (await r.json())["data"]] == ["qwen2.5-7b-instruct"]


async def test_connections_to_lm_studio_are_pooled(
    gateway: GatewayServer, fake_lmstudio: FakeLMStudio
) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            async with s.post(
                gateway.url + "/v1/chat/completions", data=CHAT, headers=auth_headers()
            ) as r:
                assert r.status == 200
    # One keep-alive connection served all five requests.
    assert len(fake_lmstudio.received) == 5
    assert len(fake_lmstudio.connections) == 1
