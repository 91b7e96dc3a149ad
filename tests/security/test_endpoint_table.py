"""The endpoint table as the client sees it, through a real gateway on a socket: every entry
answers a CORS preflight with exactly its own methods (from an allowed origin or the
gateway's own page; never from a foreign one), answers its methods, and refuses every other
method with 405 and an ``Allow`` naming exactly its methods.

Preflights, 405s and routing were once written separately, and preflights for the
conversation API (``/api/chat``, ``/api/conversations/...``) got 404."""

from __future__ import annotations

import json

import pytest

from tests.conftest import GatewayFactory, IdentityFactory, IdentityRig
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.helpers import RawResponse, raw_request
from tray_app.gateway.routes import ENDPOINTS, MODEL_ID, ONE_SEGMENT, Endpoint
from tray_app.identity.principal import ALL_SCOPES

ALLOWED_ORIGIN = "https://app.example.com"
FOREIGN_ORIGIN = "https://attacker.example"
EVERY_OPTION = {"routes_enable_responses": True, "routes_enable_messages": True}
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
# The codes with which routing (not the endpoint itself) refuses a request.
ROUTING_CODES = {"unknown_path", "path_not_allowed", "route_disabled", "method_not_allowed"}
BODIES = {
    "/pair": {"code": "AAAAAAAAAAAAAAAAAAAAAAAA", "device_name": "phone"},
    "/api/chat": {"message": "hi", "model": MODELS[0]},
    "/v1/embeddings": {"model": MODELS[0], "input": "hi"},
    "/v1/completions": {"model": MODELS[0], "prompt": "hi"},
    "/v1/responses": {"model": MODELS[0], "input": "hi"},
    "/v1/messages": {"model": MODELS[0], "max_tokens": 8, "messages": []},
}


def concrete(endpoint: Endpoint) -> str:
    """A path the entry serves: one ending in {id} serves any one segment in its place, the
    model one answers for a model LM Studio lists."""
    return endpoint.path.replace(ONE_SEGMENT, "abc123").replace(MODEL_ID, MODELS[0])


def body_for(endpoint: Endpoint) -> bytes:
    default = {"model": MODELS[0], "messages": [{"role": "user", "content": "hi"}]}
    return json.dumps(BODIES.get(endpoint.path, default)).encode()


@pytest.fixture
async def rig(start_identity_gateway: IdentityFactory) -> IdentityRig:
    return await start_identity_gateway(cors_allowed_origins=(ALLOWED_ORIGIN,), **EVERY_OPTION)


async def send(
    rig: IdentityRig, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> RawResponse:
    assert rig.server.port is not None
    host = {"Host": f"127.0.0.1:{rig.server.port}"}
    return await raw_request(rig.server.port, method, path, {**host, **headers}, body)


def preflight(origin: str, method: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type",
    }


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.path)
class TestEveryEndpointAnswersPreflights:
    async def test_from_an_allowed_origin_with_its_own_methods(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio, endpoint: Endpoint
    ) -> None:
        own_page = f"http://127.0.0.1:{rig.server.port}"
        for origin in (ALLOWED_ORIGIN, own_page):
            for method in endpoint.methods:
                answer = await send(rig, "OPTIONS", concrete(endpoint), preflight(origin, method))
                assert answer.status == 204, (origin, answer.body)
                assert answer.headers["access-control-allow-origin"] == origin
                assert answer.headers["access-control-allow-methods"] == (
                    f"{endpoint.allow}, OPTIONS"
                )
                assert answer.headers["vary"] == "Origin"
        assert fake_lmstudio.received == [], "a preflight is never forwarded"

    async def test_from_a_foreign_origin_is_refused(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio, endpoint: Endpoint
    ) -> None:
        answer = await send(
            rig, "OPTIONS", concrete(endpoint), preflight(FOREIGN_ORIGIN, endpoint.methods[0])
        )
        assert answer.status == 403, answer.body
        assert answer.json()["error"]["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in answer.headers
        assert "access-control-allow-methods" not in answer.headers
        assert fake_lmstudio.received == []


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.path)
class TestEveryEndpointAnswersItsMethodsOnly:
    async def test_its_methods_reach_the_endpoint(
        self, rig: IdentityRig, endpoint: Endpoint
    ) -> None:
        key = rig.identity.api_keys.create("k", scopes=ALL_SCOPES)[0]
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        for method in endpoint.methods:
            body = body_for(endpoint) if method == "POST" else b""
            answer = await send(rig, method, concrete(endpoint), headers, body)
            assert answer.status < 500, (method, answer.body)
            if endpoint.methods == ("GET",):
                assert answer.status == 200, answer.body
            if answer.status >= 400:
                # The endpoint itself may refuse (a wrong pairing code, an unknown
                # conversation), but routing must not have.
                code = answer.json()["error"]["code"]
                assert code not in ROUTING_CODES, (method, answer.status, answer.body)
            assert "allow" not in answer.headers

    async def test_other_methods_get_405_with_exactly_its_methods(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio, endpoint: Endpoint
    ) -> None:
        for method in METHODS:
            if method in endpoint.methods:
                continue
            # No credential: a wrong method is refused before anyone is asked who calls.
            answer = await send(rig, method, concrete(endpoint), {}, b"")
            assert answer.status == 405, (method, answer.body)
            assert answer.headers["allow"] == endpoint.allow
            error = answer.json()["error"]
            assert (error["type"], error["code"], error["param"]) == (
                "invalid_request_error",
                "method_not_allowed",
                None,
            )
            assert error["message"] == (
                f"Method {method} is not allowed on {endpoint.path}; use {endpoint.allow}."
            )
        assert fake_lmstudio.received == []


async def test_a_gateway_without_a_part_does_not_answer_its_preflights(
    start_gateway: GatewayFactory,
) -> None:
    # No pairing, metrics or conversation store: their paths are not served, preflight or not.
    server = await start_gateway(cors_allowed_origins=(ALLOWED_ORIGIN,))
    assert server.port is not None
    for path in ("/api/chat", "/api/conversations/abc", "/pair", "/metrics", "/"):
        answer = await raw_request(
            server.port, "OPTIONS", path, preflight(ALLOWED_ORIGIN, "GET"), b""
        )
        assert (answer.status, answer.json()["error"]["code"]) == (404, "unknown_path"), path
    answer = await raw_request(
        server.port, "OPTIONS", "/v1/models", preflight(ALLOWED_ORIGIN, "GET"), b""
    )
    assert answer.headers["access-control-allow-methods"] == "GET, OPTIONS"


async def test_an_unknown_path_names_what_this_gateway_forwards(rig: IdentityRig) -> None:
    answer = await send(rig, "GET", "/v2/anything", {})
    assert answer.status == 404
    error = answer.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "unknown_path",
        None,
    )
    assert error["message"] == (
        "Unknown path /v2/anything. LM Gate forwards only: GET /v1/models, "
        "POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings, "
        "POST /v1/responses, POST /v1/messages, POST /v1/messages/count_tokens, "
        "GET /v1/models/{model}."
    )


@pytest.mark.parametrize(
    "conversation",
    ["a" * 6000, "%3Cimg%20src=x%20onerror=alert(1)%3E", "%E2%80%AEevil", "x" * 64],
)
async def test_a_405_names_the_tables_path_never_the_callers(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio, conversation: str
) -> None:
    answer = await send(rig, "PUT", f"/api/conversations/{conversation}", {}, b"")
    assert (answer.status, answer.json()["error"]["code"]) == (405, "method_not_allowed")
    message = answer.json()["error"]["message"]
    assert message == "Method PUT is not allowed on /api/conversations/{id}; use GET, DELETE."
    assert len(answer.body) < 400
    assert fake_lmstudio.received == []
