"""The main client-facing errors over real sockets, each asserted as the whole ``error``
object a client receives (message, type, param, code and the request ID it sent), with the
status and the headers that go with it."""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

import pytest

from tests.conftest import CLIENT_KEY, GatewayFactory, IdentityFactory, IdentityRig
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.helpers import RawResponse, raw_request
from tray_app.identity.principal import ALL_SCOPES

REQUEST_ID = "contract-test-1"
CHAT = {"model": MODELS[0], "messages": [{"role": "user", "content": "hi"}]}
FORWARDED = (
    "GET /v1/models, POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings, "
    "GET /v1/models/{model}"
)


@pytest.fixture
async def rig(start_identity_gateway: IdentityFactory) -> IdentityRig:
    return await start_identity_gateway(
        cors_allowed_origins=("https://app.example.com",), limits_max_body_bytes=4096
    )


def key_for(rig: IdentityRig, **kwargs: Any) -> str:
    kwargs.setdefault("scopes", ALL_SCOPES)
    return rig.identity.api_keys.create("k", **kwargs)[0]


async def send(
    port: int | None,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> RawResponse:
    assert port is not None
    sent = {"X-Request-ID": REQUEST_ID, "Content-Type": "application/json", **(headers or {})}
    return await raw_request(port, method, path, sent, body)


def assert_error(
    answer: RawResponse, status: int, type: str, code: str, param: str | None, message: str
) -> None:
    assert answer.status == status, answer.body
    assert answer.headers["x-request-id"] == REQUEST_ID
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json() == {
        "error": {
            "message": message,
            "type": type,
            "param": param,
            "code": code,
            "request_id": REQUEST_ID,
        }
    }


class TestErrorsOverSockets:
    async def test_unknown_path(self, rig: IdentityRig) -> None:
        answer = await send(rig.server.port, "GET", "/v2/models")
        assert_error(
            answer,
            404,
            "invalid_request_error",
            "unknown_path",
            None,
            f"Unknown path /v2/models. LM Gate forwards only: {FORWARDED}.",
        )

    async def test_native_api(self, rig: IdentityRig) -> None:
        answer = await send(rig.server.port, "POST", "/api/v1/models/load", body=b"{}")
        assert_error(
            answer,
            404,
            "invalid_request_error",
            "path_not_allowed",
            None,
            "LM Studio's native /api endpoints (model download, load, unload) are never "
            f"exposed by LM Gate. Forwarded: {FORWARDED}.",
        )

    async def test_route_disabled(self, rig: IdentityRig) -> None:
        answer = await send(rig.server.port, "POST", "/v1/responses", body=b"{}")
        assert_error(
            answer,
            404,
            "invalid_request_error",
            "route_disabled",
            None,
            "/v1/responses is turned off in LM Gate; enable it with the setting "
            "routes.enable_responses or the flag --enable-responses.",
        )

    async def test_method_not_allowed(self, rig: IdentityRig) -> None:
        answer = await send(rig.server.port, "GET", "/v1/chat/completions")
        assert_error(
            answer,
            405,
            "invalid_request_error",
            "method_not_allowed",
            None,
            "Method GET is not allowed on /v1/chat/completions; use POST.",
        )
        assert answer.headers["allow"] == "POST"

    async def test_host_not_allowed(self, rig: IdentityRig) -> None:
        answer = await send(rig.server.port, "GET", "/v1/models", {"Host": "evil.example"})
        assert_error(
            answer,
            421,
            "invalid_request_error",
            "host_not_allowed",
            None,
            "This request is addressed to a host name LM Gate does not serve; if it should, "
            "add the name to server.allowed_hosts.",
        )

    async def test_origin_not_allowed(self, rig: IdentityRig) -> None:
        answer = await send(
            rig.server.port, "GET", "/v1/models", {"Origin": "https://evil.example"}
        )
        assert_error(
            answer,
            403,
            "permission_error",
            "origin_not_allowed",
            None,
            "This web origin may not call LM Gate; add it to cors.allowed_origins if it should.",
        )

    async def test_invalid_key(self, rig: IdentityRig) -> None:
        answer = await send(
            rig.server.port, "GET", "/v1/models", {"Authorization": "Bearer lmg_" + "x" * 40}
        )
        assert_error(
            answer, 401, "authentication_error", "invalid_api_key", None, "Invalid API key."
        )
        assert answer.headers["www-authenticate"] == 'Bearer realm="lmgate"'

    async def test_missing_scope(self, rig: IdentityRig) -> None:
        key = key_for(rig, scopes=frozenset({"models"}))
        auth = {"Authorization": f"Bearer {key}"}
        answer = await send(
            rig.server.port, "POST", "/v1/embeddings", auth, b'{"model": "m", "input": "x"}'
        )
        assert_error(
            answer,
            403,
            "permission_error",
            "insufficient_scope",
            None,
            "This key may not use /v1/embeddings (it lacks the 'embeddings' scope).",
        )

    async def test_model_not_allowed(self, rig: IdentityRig, fake_lmstudio: FakeLMStudio) -> None:
        key = key_for(rig, models=frozenset({MODELS[1]}))
        auth = {"Authorization": f"Bearer {key}"}
        answer = await send(
            rig.server.port, "POST", "/v1/chat/completions", auth, json.dumps(CHAT).encode()
        )
        assert_error(
            answer,
            403,
            "permission_error",
            "model_not_allowed",
            "model",
            f"This key may not use the model {MODELS[0]!r}.",
        )
        assert fake_lmstudio.received == []

    async def test_body_not_json(self, rig: IdentityRig) -> None:
        auth = {"Authorization": f"Bearer {key_for(rig)}"}
        answer = await send(rig.server.port, "POST", "/v1/chat/completions", auth, b"{nope")
        assert_error(
            answer,
            400,
            "invalid_request_error",
            "invalid_body",
            None,
            "The request body is not valid JSON: Expecting property name enclosed in double "
            "quotes at 1.",
        )

    async def test_model_missing(self, rig: IdentityRig) -> None:
        auth = {"Authorization": f"Bearer {key_for(rig)}"}
        answer = await send(
            rig.server.port, "POST", "/v1/chat/completions", auth, b'{"messages": []}'
        )
        assert_error(
            answer,
            400,
            "invalid_request_error",
            "missing_model",
            "model",
            "You must provide a model parameter.",
        )

    async def test_body_too_large(self, rig: IdentityRig) -> None:
        auth = {"Authorization": f"Bearer {key_for(rig)}"}
        answer = await send(rig.server.port, "POST", "/v1/chat/completions", auth, b"x" * 5000)
        assert_error(
            answer,
            413,
            "invalid_request_error",
            "body_too_large",
            None,
            "The request body is larger than 4096 bytes (limits.max_body_bytes).",
        )

    async def test_body_compressed(self, rig: IdentityRig) -> None:
        headers = {"Authorization": f"Bearer {key_for(rig)}", "Content-Encoding": "gzip"}
        answer = await send(rig.server.port, "POST", "/v1/chat/completions", headers, b"\x1f\x8b")
        assert_error(
            answer,
            415,
            "invalid_request_error",
            "unsupported_content_encoding",
            None,
            "Request bodies must not be compressed (Content-Encoding: gzip); send plain JSON.",
        )
        assert answer.headers["connection"] == "close"

    async def test_pairing_body_invalid(self, rig: IdentityRig) -> None:
        answer = await send(rig.server.port, "POST", "/pair", body=b'{"code": 7}')
        assert_error(
            answer,
            400,
            "invalid_request_error",
            "invalid_body",
            "code",
            'Send {"code": "<pairing code>", "device_name": "..."}.',
        )

    async def test_conversation_not_found(self, rig: IdentityRig) -> None:
        auth = {"Authorization": f"Bearer {key_for(rig)}"}
        answer = await send(rig.server.port, "GET", "/api/conversations/nope", auth)
        assert_error(
            answer,
            404,
            "invalid_request_error",
            "conversation_not_found",
            None,
            "No such conversation.",
        )

    async def test_chat_message_missing(self, rig: IdentityRig) -> None:
        auth = {"Authorization": f"Bearer {key_for(rig)}"}
        answer = await send(rig.server.port, "POST", "/api/chat", auth, b'{"message": " "}')
        assert_error(
            answer,
            400,
            "invalid_request_error",
            "invalid_body",
            "message",
            'Send a non-empty "message".',
        )


UNREACHABLE = (
    "LM Studio is not reachable. Start its server (LM Studio → Developer → Start Server, or "
    "`lms server start`) and check that LM Gate's upstream.url matches (LM Gate's log names "
    "the address it tried)."
)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/models", b""),
        ("GET", "/v1/models/m", b""),
        ("POST", "/v1/chat/completions", b'{"model": "m", "messages": []}'),
        ("POST", "/v1/chat/completions", b'{"model": "m", "messages": [], "stream": true}'),
    ],
)
async def test_upstream_unreachable_names_no_address(
    start_gateway: GatewayFactory,
    method: str,
    path: str,
    body: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The owner's LAN addresses are not the caller's business: the log has it, not the answer.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    server = await start_gateway(upstream_url=closed)
    auth = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
    with caplog.at_level(logging.WARNING, logger="lmgate.upstreams"):
        answer = await send(server.port, method, path, auth, body)
    if b'"stream": true' in body and answer.status == 200:
        assert closed not in answer.body.decode() and UNREACHABLE in answer.body.decode()
    else:
        assert_error(answer, 502, "upstream_error", "upstream_unreachable", None, UNREACHABLE)
    assert f"upstream local at {closed} failed: nothing accepts connections there" in caplog.text


async def test_headers_too_large_on_the_raw_socket(start_gateway: GatewayFactory) -> None:
    server = await start_gateway()
    assert server.port is not None
    answer = await raw_request(server.port, "GET", "/v1/models", {"X-Big": "x" * 70_000})
    assert answer.status == 431
    error = answer.json()["error"]
    assert {k: v for k, v in error.items() if k != "request_id"} == {
        "message": "The request line or a header field is too long, or there are too many headers.",
        "type": "invalid_request_error",
        "param": None,
        "code": "headers_too_large",
    }
    # No request was parsed, so the ID is the gateway's own, in the header and the body.
    assert answer.headers["x-request-id"] == error["request_id"] != REQUEST_ID
