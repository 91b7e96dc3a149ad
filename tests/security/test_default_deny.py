"""Default-deny: everything but the inference allowlist is answered by the gateway itself and
never reaches LM Studio, whatever the encoding, with or without credentials."""

from __future__ import annotations

import pytest

from tests.conftest import GatewayFactory, auth_headers
from tests.fake_lmstudio import FakeLMStudio
from tests.helpers import raw_request
from tray_app.gateway.server.runner import GatewayServer

WS = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}

# (method, raw request target, extra headers, expected status)
BLOCKED = [
    # LM Studio's native API, model management above all
    ("GET", "/api/v0/models", {}, 404),
    ("POST", "/api/v0/chat/completions", {}, 404),
    ("POST", "/api/v1/chat", {}, 404),
    ("GET", "/api/v1/models", {}, 404),
    ("POST", "/api/v1/models/load", {}, 404),
    ("POST", "/api/v1/models/unload", {}, 404),
    ("POST", "/api/v1/models/download", {}, 404),
    ("GET", "/api/v1/models/download/status/job-1", {}, 404),
    # the SDK's WebSocket namespaces, as upgrades and as plain requests
    ("GET", "/llm", WS, 404),
    ("GET", "/system", WS, 404),
    ("GET", "/repository", {}, 404),
    ("GET", "/v1/models", WS, 404),
    ("POST", "/v1/chat/completions", WS, 404),
    # unknown paths
    ("GET", "/", {}, 404),
    ("GET", "/admin", {}, 404),
    ("GET", "/v1", {}, 404),
    # /v1/models/{model} answers from the list; an encoded slash in it must not climb out.
    ("GET", "/v1/models/..%2F..%2Fapi%2Fv1%2Fmodels%2Fload", {}, 404),
    ("POST", "/v2/chat/completions", {}, 404),
    ("POST", "/v1/chat/completions/extra", {}, 404),
    ("GET", "/.env", {}, 404),
    # off unless enabled
    ("POST", "/v1/responses", {}, 404),
    ("POST", "/v1/messages", {}, 404),
    # other methods on allowed paths
    ("DELETE", "/v1/models", {}, 405),
    ("POST", "/v1/models", {}, 405),
    ("GET", "/v1/chat/completions", {}, 405),
    ("PUT", "/v1/chat/completions", {}, 405),
    ("PATCH", "/v1/embeddings", {}, 405),
    ("HEAD", "/v1/models", {}, 405),
    ("OPTIONS", "/v1/chat/completions", {}, 405),
    # normalisation tricks aimed at the admin endpoints
    ("POST", "/v1/models/../../api/v1/models/load", {}, 404),
    ("POST", "/v1/chat/completions/..%2F..%2Fapi/v1/models/load", {}, 404),
    ("POST", "/v1/chat/completions/..%2f..%2fapi%2fv1%2fmodels%2fload", {}, 404),
    ("POST", "//api/v1/models/load", {}, 404),
    ("POST", "/./api/v1/models/load", {}, 404),
    ("POST", "/API/V1/MODELS/LOAD", {}, 404),
    ("POST", "/Api/v1/models/load", {}, 404),
    ("POST", "/v1/%2e%2e/api/v1/models/load", {}, 404),
    ("POST", "/v1/%2E%2E/%2E%2E/api/v1/models/load", {}, 404),
    ("POST", "/%61pi/v1/models/load", {}, 404),
    ("POST", "/..%252f..%252fapi/v1/models/load", {}, 404),
    ("POST", "/v1/chat/completions%2F..%2F..%2Fapi%2Fv1%2Fmodels%2Fload", {}, 404),
    ("POST", "/v1\\..\\api\\v1\\models\\load", {}, 404),
    ("POST", "/v1/chat/completions%5c..%5capi", {}, 404),
    ("GET", "/v1/models%00", {}, 404),
    ("GET", "/v1/models%0a", {}, 404),
    ("POST", "/v1/chat/completions%0d%0aX-Injected:%20yes", {}, 404),
    ("GET", "/v1%2fmodels", {}, 404),
    ("GET", "/../v1/models", {}, 404),
    ("GET", "/v1/models;/../../api/v1/models", {}, 404),
    ("POST", "/V1/CHAT/COMPLETIONS", {}, 404),
    ("POST", "/v1/chat/completions%20", {}, 404),
    ("GET", "/%ff%fe", {}, 404),
]


@pytest.mark.parametrize("with_credentials", [False, True], ids=["anonymous", "authenticated"])
@pytest.mark.parametrize(
    ("method", "target", "headers", "status"),
    BLOCKED,
    ids=[f"{m} {t}" + (" (upgrade)" if h else "") for m, t, h, _ in BLOCKED],
)
async def test_blocked_requests_never_reach_lm_studio(
    gateway: GatewayServer,
    fake_lmstudio: FakeLMStudio,
    with_credentials: bool,
    method: str,
    target: str,
    headers: dict[str, str],
    status: int,
) -> None:
    sent = dict(headers)
    if with_credentials:
        sent.update(auth_headers())
    body = b'{"model": "qwen2.5-7b-instruct"}' if method in {"POST", "PUT", "PATCH"} else b""
    if body:
        sent["Content-Type"] = "application/json"
    response = await raw_request(gateway.port or 0, method, target, sent, body)
    assert response.status == status
    if method != "HEAD":
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "code"}
        assert error["request_id"] == response.headers["x-request-id"]
    if status == 405:
        assert response.headers["allow"] in {"GET", "POST"}
    assert fake_lmstudio.received == [], "LM Studio must not hear of a blocked request"


@pytest.mark.parametrize(
    "target",
    [
        "//v1//models",
        "/v1/./models",
        "/v1/models/",
        "/v1/x/../models",
        "/%76%31/models",
        "/v1/models?x=/../../api/v1/models/load",
    ],
)
async def test_odd_spellings_of_allowed_paths_reach_only_the_canonical_path(
    gateway: GatewayServer, fake_lmstudio: FakeLMStudio, target: str
) -> None:
    response = await raw_request(gateway.port or 0, "GET", target, auth_headers())
    assert response.status == 200
    # The upstream URL is the route's own path: no query, no client spelling.
    assert fake_lmstudio.paths == ["/v1/models"]


async def test_enabled_responses_route_is_forwarded(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    server = await start_gateway(routes_enable_responses=True)
    response = await raw_request(
        server.port or 0,
        "POST",
        "/v1/responses",
        {**auth_headers(), "Content-Type": "application/json"},
        b'{"model": "m", "input": "hi"}',
    )
    assert response.status == 200
    assert fake_lmstudio.paths == ["/v1/responses"]
    messages = await raw_request(
        server.port or 0,
        "POST",
        "/v1/messages",
        {**auth_headers(), "Content-Type": "application/json"},
        b'{"model": "m", "messages": []}',
    )
    # Enabling /v1/responses must not enable /v1/messages.
    assert (messages.status, messages.json()["error"]["code"]) == (404, "route_disabled")
    assert fake_lmstudio.paths == ["/v1/responses"]


async def test_allowed_route_without_credentials_is_401_and_not_forwarded(
    gateway: GatewayServer, fake_lmstudio: FakeLMStudio
) -> None:
    response = await raw_request(
        gateway.port or 0,
        "POST",
        "/v1/chat/completions",
        {"Content-Type": "application/json"},
        b'{"model": "m"}',
    )
    assert response.status == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "missing_api_key"
    assert fake_lmstudio.received == []
