"""Issue 21, point 4: the hardening suite's classes over the surface added since issue 12,
through real sockets, each limit on both sides of it.

- The OpenAPI description the fuzz test reads is a valid OpenAPI 3.0 document, and documents
  exactly the endpoints and methods the gateway answers, with the new answers (budgets, the
  queue, the model guard, upstreams) on every generation endpoint and on no other.
- ``POST /v1/messages/count_tokens``: every credential kind and misuse, every malformed
  ``messages``, the model name's length, the allowlist, length fields it does not read; LM
  Studio is never asked, no budget is spent and no queue is waited in.
- ``POST /stream-check``: its own body limit, bodies that are not objects, the probe token
  (accepted there only), any valid credential whatever its scopes.
- Budgets and the fair queue as a caller meets them on ``/v1/messages`` and ``/api/chat``:
  ``budget_exceeded`` with Retry-After and the reset time, ``queue_full`` (429 per caller,
  503 for the whole queue) and ``queue_timeout`` with Retry-After, a waiting stream told its
  place.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import jsonschema_rs
import pytest
import yaml
from schemathesis.specs.openapi.definitions import OPENAPI_30

from tests.conftest import IdentityFactory, IdentityRig
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.helpers import REPO_ROOT, LogCapture, sse_events
from tests.security.test_body_hardening import NOT_LENGTHS
from tray_app.config.upstreams import UpstreamEntry
from tray_app.gateway import api_errors
from tray_app.gateway.body_rules import MAX_MODEL_NAME
from tray_app.gateway.routes import COUNT_TOKENS, ENDPOINTS
from tray_app.gateway.stream_probe import MAX_BODY_BYTES as STREAM_CHECK_MAX_BODY
from tray_app.gateway.token_estimate import METHOD, METHOD_HEADER
from tray_app.gateway.upstream.pool import UpstreamView
from tray_app.identity.principal import ALL_SCOPES
from tray_app.storage.budgets import NO_BUDGET, Budget
from tray_app.stream_pacing import EVENTS
from tray_app.stream_pacing import PATH as STREAM_CHECK

OPENAPI = REPO_ROOT / "docs" / "openapi.yaml"
MODEL, OTHER_MODEL, _ = MODELS
# 18 characters: ceil(18 / 4) + 4 = 9 tokens, as the estimate counts them.
QUESTION = [{"role": "user", "content": "hello there friend"}]
ESTIMATE = math.ceil(len(QUESTION[0]["content"]) / 4) + 4
MESSAGES_BODY = {"model": MODEL, "messages": QUESTION}
MESSAGES = "/v1/messages"
CHAT = "/v1/chat/completions"


def spec() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(OPENAPI.read_text())
    return loaded


async def send(
    rig: IdentityRig,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    sent = {"Content-Type": "application/json", **(headers or {})}
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, rig.url + path, data=data, headers=sent) as r,
    ):
        return r.status, dict(r.headers), await r.read()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def error_of(raw: bytes) -> tuple[str, str | None]:
    error = json.loads(raw)["error"]
    return error["code"], error["param"]


def new_key(rig: IdentityRig, name: str = "k", **kwargs: Any) -> str:
    kwargs.setdefault("scopes", ALL_SCOPES)
    return rig.identity.api_keys.create(name, **kwargs)[0]


@pytest.fixture
async def rig(start_identity_gateway: IdentityFactory) -> IdentityRig:
    return await start_identity_gateway(routes_enable_messages=True)


# ---- the OpenAPI description ----------------------------------------------------------------


class TestTheOpenApiDescription:
    def test_is_a_valid_openapi_3_0_document(self) -> None:
        errors = [
            f"{e.instance_path}: {e.message[:200]}"
            for e in jsonschema_rs.Draft4Validator(OPENAPI_30).iter_errors(spec())
        ]
        assert errors == []

    def test_documents_every_endpoint_and_method_the_gateway_answers_and_no_other(self) -> None:
        documented = {
            (path, method.upper())
            for path, item in spec()["paths"].items()
            for method in item
            if method != "parameters"
        }
        answered = {(e.path, m) for e in ENDPOINTS for m in e.methods}
        assert documented == answered

    def test_generation_endpoints_document_the_budget_queue_and_model_answers(self) -> None:
        paths = spec()["paths"]
        generations = [
            e.path
            for e in ENDPOINTS
            if (e.route is not None and e.route.method == "POST" and e.path != COUNT_TOKENS)
            or e.path == "/api/chat"
        ]
        assert len(generations) == 6
        for path in generations:
            responses = paths[path]["post"]["responses"]
            assert responses["429"] == {"$ref": "#/components/responses/GenerationTooMany"}, path
            assert responses["503"] == {"$ref": "#/components/responses/GenerationUnavailable"}
            assert {"502", "504"} <= responses.keys(), path
        # Answered by LM Gate alone: no budget, no queue, no LM Studio.
        for path in (COUNT_TOKENS, STREAM_CHECK):
            responses = paths[path]["post"]["responses"]
            assert not {"502", "504"} & responses.keys(), path
            assert responses["429"] == {"$ref": "#/components/responses/Throttled"}, path
            assert responses["503"] == {"$ref": "#/components/responses/Unavailable"}, path
        count = paths[COUNT_TOKENS]["post"]["responses"]["200"]
        assert count["headers"][METHOD_HEADER] == {"$ref": "#/components/headers/TokenCount"}
        assert spec()["components"]["headers"]["TokenCount"]["schema"]["enum"] == [METHOD]

    def test_every_refusal_that_says_when_to_retry_documents_retry_after(self) -> None:
        responses = spec()["components"]["responses"]
        for name in ("Throttled", "GenerationTooMany", "GenerationUnavailable", "Unavailable"):
            assert "Retry-After" in responses[name]["headers"], name
        # And the catalogue does send one with each of them.
        for err in (
            api_errors.budget_exceeded("day", 10, 0, 9, "2026-12-05 00:00 UTC", 30.0),
            api_errors.queue_full(True, 2.0),
            api_errors.queue_full(False, 2.0),
            api_errors.queue_full_for_caller(2.0),
            api_errors.queue_wait_timeout(5.0, 2.0),
            api_errors.model_switch_refused(MODEL, 2.0),
            api_errors.no_upstream(MODEL),
        ):
            assert int(err.headers["Retry-After"]) >= 1, err.code
        assert "Retry-After" not in api_errors.no_upstream_enabled().headers

    def test_every_error_code_it_names_is_in_the_catalogue(self) -> None:
        schemas = spec()["components"]["schemas"]
        named: set[str] = set()
        for name in ("BudgetExceeded", "TooMany", "Unavailable", "BadGateway", "GatewayTimeout"):
            codes = schemas[name]["allOf"][1]["properties"]["error"]["properties"]["code"]
            named.update(codes["enum"])
        catalogue = (REPO_ROOT / "tray_app" / "gateway" / "api_errors.py").read_text()
        assert sorted(c for c in named if f'"{c}"' not in catalogue) == []

    def test_the_readiness_schema_names_every_upstream_state(self) -> None:
        states = spec()["components"]["schemas"]["Upstream"]["properties"]["state"]["enum"]
        views = [
            UpstreamView("a", "http://127.0.0.1:1", enabled, up, None, (), (), 0)
            for enabled in (True, False)
            for up in (None, True, False)
        ]
        assert set(states) == {view.state for view in views}


async def test_readyz_answers_as_its_schema_says(rig: IdentityRig) -> None:
    status, _, raw = await send(rig, "GET", "/readyz")
    readiness = spec()["components"]["schemas"]["Readiness"]
    resolver = {"components": spec()["components"], **readiness}
    jsonschema_rs.validate(resolver, json.loads(raw))
    assert status == 200
    assert [u["state"] for u in json.loads(raw)["upstreams"]] == ["up"]


# ---- POST /v1/messages/count_tokens ---------------------------------------------------------


def no_budget_key(rig: IdentityRig, name: str = "counter") -> str:
    return new_key(rig, name, scopes=frozenset({"chat"}))


class TestCountTokens:
    async def test_answers_an_estimate_without_asking_lm_studio(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio
    ) -> None:
        status, headers, raw = await send(
            rig, "POST", COUNT_TOKENS, MESSAGES_BODY, bearer(no_budget_key(rig))
        )
        assert (status, json.loads(raw)) == (200, {"input_tokens": ESTIMATE})
        assert headers[METHOD_HEADER] == METHOD and headers["X-Request-ID"]
        assert fake_lmstudio.received == []

    async def test_is_off_with_the_messages_route(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        off = await start_identity_gateway()
        status, _, raw = await send(off, "POST", COUNT_TOKENS, MESSAGES_BODY, bearer(new_key(off)))
        assert (status, error_of(raw)) == (404, ("route_disabled", None))
        assert b"routes.enable_messages" in raw
        assert fake_lmstudio.received == []

    @pytest.mark.parametrize(
        "messages",
        [None, "hi", {"role": "user", "content": "hi"}, 1, True, "absent"],
        ids=["null", "string", "object", "number", "true", "absent"],
    )
    async def test_messages_that_are_not_a_list_are_a_400(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio, messages: Any
    ) -> None:
        body: dict[str, Any] = {"model": MODEL}
        if messages != "absent":
            body["messages"] = messages
        status, _, raw = await send(rig, "POST", COUNT_TOKENS, body, bearer(no_budget_key(rig)))
        assert (status, error_of(raw)) == (400, ("invalid_messages", "messages"))

    @pytest.mark.parametrize(
        "messages",
        [[], [None], [1], ["text"], [{"content": None}], [{"content": {"type": "image"}}]],
        ids=["empty", "null", "number", "string", "null_content", "odd_block"],
    )
    async def test_odd_messages_in_a_list_are_counted_never_a_500(
        self, rig: IdentityRig, messages: list[Any]
    ) -> None:
        with LogCapture() as logs:
            status, _, raw = await send(
                rig,
                "POST",
                COUNT_TOKENS,
                {"model": MODEL, "messages": messages},
                bearer(no_budget_key(rig)),
            )
        assert status == 200, raw
        assert json.loads(raw)["input_tokens"] >= 0
        assert "Traceback" not in logs.text

    @pytest.mark.parametrize(
        ("length", "refused"), [(MAX_MODEL_NAME, False), (MAX_MODEL_NAME + 1, True)]
    )
    @pytest.mark.parametrize("param", ["model", "draft_model"])
    async def test_a_model_name_is_held_to_its_length_on_both_sides(
        self, rig: IdentityRig, param: str, length: int, refused: bool
    ) -> None:
        body = {**MESSAGES_BODY, param: "m" * length}
        status, _, raw = await send(rig, "POST", COUNT_TOKENS, body, bearer(no_budget_key(rig)))
        if refused:
            assert (status, error_of(raw)) == (400, ("invalid_model", param))
        else:
            assert status == 200, raw

    @pytest.mark.parametrize(
        ("body", "expected"),
        [
            ({"messages": QUESTION}, ("missing_model", "model")),
            ({"model": "", "messages": QUESTION}, ("invalid_model", "model")),
            ({"model": 7, "messages": QUESTION}, ("invalid_model", "model")),
            ({**MESSAGES_BODY, "draft_model": ""}, ("invalid_model", "draft_model")),
            ({**MESSAGES_BODY, "stream": "yes"}, ("invalid_stream", "stream")),
            ({**MESSAGES_BODY, "tools": {"type": "mcp"}}, ("invalid_body", "tools")),
            ({**MESSAGES_BODY, "tools": [1]}, ("invalid_body", "tools")),
        ],
        ids=[
            "no_model",
            "empty_model",
            "number_model",
            "empty_draft",
            "stream_string",
            "tools_object",
            "tool_number",
        ],
    )
    async def test_the_messages_routes_body_rules_apply(
        self,
        rig: IdentityRig,
        fake_lmstudio: FakeLMStudio,
        body: dict[str, Any],
        expected: tuple[str, str],
    ) -> None:
        status, _, raw = await send(rig, "POST", COUNT_TOKENS, body, bearer(no_budget_key(rig)))
        assert (status, error_of(raw)) == (400, expected)
        assert fake_lmstudio.received == []

    @pytest.mark.parametrize("param", ["model", "draft_model"])
    async def test_the_model_allowlist_applies(self, rig: IdentityRig, param: str) -> None:
        key = new_key(rig, scopes=frozenset({"chat"}), models=frozenset({MODEL}))
        allowed = await send(
            rig, "POST", COUNT_TOKENS, {**MESSAGES_BODY, param: MODEL}, bearer(key)
        )
        assert allowed[0] == 200
        body = {**MESSAGES_BODY, param: OTHER_MODEL}
        status, _, raw = await send(rig, "POST", COUNT_TOKENS, body, bearer(key))
        assert (status, error_of(raw)) == (403, ("model_not_allowed", param))

    @pytest.mark.parametrize("value", NOT_LENGTHS.values(), ids=NOT_LENGTHS.keys())
    @pytest.mark.parametrize("field", ["max_tokens", "max_output_tokens", "max_completion_tokens"])
    async def test_length_fields_are_not_read_and_never_a_500(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio, field: str, value: Any
    ) -> None:
        body = {**MESSAGES_BODY, field: value}
        status, _, raw = await send(rig, "POST", COUNT_TOKENS, body, bearer(no_budget_key(rig)))
        assert (status, json.loads(raw)) == (200, {"input_tokens": ESTIMATE})
        assert fake_lmstudio.received == []

    async def test_a_used_up_budget_still_counts_and_spends_nothing(self, rig: IdentityRig) -> None:
        key = new_key(rig, scopes=frozenset({"chat"}), budget=Budget(tokens_per_day=1))
        for _ in range(3):
            status, _, raw = await send(rig, "POST", COUNT_TOKENS, MESSAGES_BODY, bearer(key))
            assert (status, json.loads(raw)) == (200, {"input_tokens": ESTIMATE})
        status, _, raw = await send(rig, "POST", MESSAGES, MESSAGES_BODY, bearer(key))
        assert (status, error_of(raw)) == (429, ("budget_exceeded", None))


# ---- every credential kind x every misuse, on the two endpoints LM Gate answers itself ------

Credential = Callable[[IdentityRig], Awaitable[dict[str, str]]]


async def _nothing(rig: IdentityRig) -> dict[str, str]:
    return {}


async def _unknown_key(rig: IdentityRig) -> dict[str, str]:
    return bearer("lmg_" + "A" * 43)


async def _wrong_scheme(rig: IdentityRig) -> dict[str, str]:
    return {"Authorization": f"Basic {no_budget_key(rig)}"}


async def _forged_token(rig: IdentityRig) -> dict[str, str]:
    return bearer("eyJhbGciOiJub25lIn0.eyJzdWIiOiJvd25lciJ9.")


async def _revoked_key(rig: IdentityRig) -> dict[str, str]:
    key, record = rig.identity.api_keys.create("gone", scopes=ALL_SCOPES)
    rig.identity.api_keys.revoke(record.id)
    return bearer(key)


async def _revoked_token(rig: IdentityRig) -> dict[str, str]:
    # (An expired one is still taken for tokens.LEEWAY_SECONDS: clock skew, by design.)
    token = rig.identity.tokens.issue(name="old", scopes=ALL_SCOPES, ttl=600)
    rig.identity.tokens.revoke(token.record.jti)
    return bearer(token.token)


async def _probe_token(rig: IdentityRig) -> dict[str, str]:
    return bearer(rig.server.gateway.stream_probe_token)


async def _no_chat_scope(rig: IdentityRig) -> dict[str, str]:
    return bearer(new_key(rig, "models only", scopes=frozenset({"models"})))


async def _valid_key(rig: IdentityRig) -> dict[str, str]:
    return bearer(no_budget_key(rig))


async def _x_api_key(rig: IdentityRig) -> dict[str, str]:
    return {"X-API-Key": no_budget_key(rig)}


async def _valid_token(rig: IdentityRig) -> dict[str, str]:
    return bearer(rig.identity.tokens.issue(name="t", scopes=frozenset({"chat"}), ttl=600).token)


CREDENTIALS: dict[str, Credential] = {
    "none": _nothing,
    "unknown_key": _unknown_key,
    "wrong_scheme": _wrong_scheme,
    "forged_token": _forged_token,
    "revoked_key": _revoked_key,
    "revoked_token": _revoked_token,
    "probe_token": _probe_token,
    "no_chat_scope": _no_chat_scope,
    "valid_key": _valid_key,
    "x_api_key": _x_api_key,
    "valid_token": _valid_token,
}
# What each endpoint answers each credential: the stream check takes any valid credential
# (whatever its scopes) and the probe token; the token counter is /v1/messages' own (chat).
REFUSED_401 = {"none", "unknown_key", "wrong_scheme", "forged_token", "revoked_key"}
EXPECTED: dict[str, dict[str, int]] = {
    COUNT_TOKENS: {
        **dict.fromkeys(REFUSED_401 | {"revoked_token", "probe_token"}, 401),
        "no_chat_scope": 403,
        **dict.fromkeys({"valid_key", "x_api_key", "valid_token"}, 200),
    },
    STREAM_CHECK: {
        **dict.fromkeys(REFUSED_401 | {"revoked_token"}, 401),
        **dict.fromkeys({"probe_token", "no_chat_scope", "valid_key", "x_api_key"}, 200),
        "valid_token": 200,
    },
}


@pytest.mark.parametrize("kind", CREDENTIALS)
@pytest.mark.parametrize("path", [COUNT_TOKENS, STREAM_CHECK])
async def test_every_credential_kind_gets_what_its_endpoint_allows(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio, path: str, kind: str
) -> None:
    headers = await CREDENTIALS[kind](rig)
    status, answer_headers, raw = await send(rig, "POST", path, MESSAGES_BODY, headers)
    expected = EXPECTED[path][kind]
    assert status == expected, (status, raw[:300])
    if status == 401:
        error = json.loads(raw)["error"]
        assert error["type"] == "authentication_error"
        assert answer_headers["WWW-Authenticate"] == 'Bearer realm="lmgate"'
    elif status == 403:
        assert error_of(raw) == ("insufficient_scope", None)
    assert fake_lmstudio.received == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("POST", CHAT),
        ("POST", MESSAGES),
        ("GET", "/api/conversations"),
        ("POST", "/api/chat"),
        ("GET", "/metrics"),
    ],
)
async def test_the_probe_token_is_refused_everywhere_but_the_stream_check(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio, method: str, path: str
) -> None:
    headers = await _probe_token(rig)
    body = {**MESSAGES_BODY, "message": "hi"}
    status, _, raw = await send(rig, method, path, body if method == "POST" else None, headers)
    assert status == 401, raw[:300]
    assert json.loads(raw)["error"]["type"] == "authentication_error"
    assert fake_lmstudio.received == []


# ---- POST /stream-check -----------------------------------------------------------------------


def object_of_size(size: int) -> bytes:
    bare = json.dumps({"pad": ""}).encode()
    body = json.dumps({"pad": "x" * (size - len(bare))}).encode()
    assert len(body) == size
    return body


class TestStreamCheck:
    @pytest.mark.parametrize("body", [b"", b"  \r\n", b"{}", b'{"why": "tunnel"}'])
    async def test_an_empty_body_or_an_object_gets_the_paced_stream(
        self, rig: IdentityRig, body: bytes
    ) -> None:
        status, headers, raw = await send(rig, "POST", STREAM_CHECK, body, await _valid_key(rig))
        assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
        assert headers["X-Accel-Buffering"] == "no"
        events = sse_events(raw)
        assert events[-1] == "[DONE]"
        assert [json.loads(e) for e in events[:-1]] == [
            {"n": n, "of": EVENTS} for n in range(1, EVENTS + 1)
        ]

    @pytest.mark.parametrize("body", [b"[]", b"1", b"null", b'"x"', b"{", b"\xff\xfe"])
    async def test_a_body_that_is_not_an_object_is_a_400(
        self, rig: IdentityRig, body: bytes
    ) -> None:
        status, _, raw = await send(rig, "POST", STREAM_CHECK, body, await _valid_key(rig))
        assert (status, error_of(raw)) == (400, ("invalid_body", None))

    @pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
    async def test_its_own_body_limit_holds_on_both_sides(
        self, rig: IdentityRig, chunked: bool
    ) -> None:
        headers = await _valid_key(rig)
        for size, expected in ((STREAM_CHECK_MAX_BODY, 200), (STREAM_CHECK_MAX_BODY + 1, 413)):
            body = object_of_size(size)
            data: Any = body
            if chunked:

                async def parts(body: bytes = body) -> Any:
                    yield body[:1000]
                    yield body[1000:]

                data = parts()
            async with (
                aiohttp.ClientSession() as s,
                s.post(rig.url + STREAM_CHECK, data=data, headers=headers) as r,
            ):
                raw = await r.read()
            assert r.status == expected, (size, raw[:200])
            if expected == 413:
                assert error_of(raw) == ("body_too_large", None)
                assert b"the most this endpoint takes" in raw
                assert str(STREAM_CHECK_MAX_BODY).encode() in raw


# ---- budgets, as a caller meets them -----------------------------------------------------------


def budget_key(rig: IdentityRig, tokens_per_day: int | None, name: str = "friend") -> str:
    budget = Budget(tokens_per_day=tokens_per_day) if tokens_per_day is not None else NO_BUDGET
    return new_key(rig, name, scopes=frozenset({"chat", "models"}), budget=budget)


def next_utc_midnight() -> dt.datetime:
    today = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today + dt.timedelta(days=1)


class TestBudgetAnswers:
    @pytest.mark.parametrize(("path", "body"), [(MESSAGES, MESSAGES_BODY), ("/api/chat", None)])
    async def test_a_budget_is_held_on_both_sides_of_it_with_the_reset_time(
        self, start_identity_gateway: IdentityFactory, path: str, body: dict[str, Any] | None
    ) -> None:
        rig = await start_identity_gateway(routes_enable_messages=True)
        asked = 10  # the output asked for: the request needs ESTIMATE + asked tokens
        if body is None:  # /api/chat: its own shape; its estimate is its own
            sent: dict[str, Any] = {"message": "hello there friend", "model": MODEL}
        else:
            sent = {**body, "max_tokens": asked}
        # What the request needs is what it reserves: a small budget's refusal says it.
        need = await needed_tokens(rig, path, sent)
        fits = budget_key(rig, need, "fits")
        status, _, raw = await send(rig, "POST", path, sent, bearer(fits))
        assert status == 200, raw[:300]
        short = budget_key(rig, need - 1, "short")
        status, headers, raw = await send(rig, "POST", path, sent, bearer(short))
        assert (status, error_of(raw)) == (429, ("budget_exceeded", None))
        error = json.loads(raw)["error"]
        assert error["type"] == "rate_limit_error"
        midnight = next_utc_midnight()
        assert f"it resets at {midnight:%Y-%m-%d %H:%M} UTC" in error["message"]
        left = (midnight - dt.datetime.now(dt.UTC)).total_seconds()
        assert left - 5 <= int(headers["Retry-After"]) <= left + 5

    async def test_a_used_up_budget_refuses_generations_but_not_the_stream_check(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        rig = await start_identity_gateway(routes_enable_messages=True)
        key = budget_key(rig, 1)
        for path, body in ((MESSAGES, MESSAGES_BODY), ("/api/chat", {"message": "hi"})):
            status, headers, raw = await send(rig, "POST", path, body, bearer(key))
            assert (status, error_of(raw)) == (429, ("budget_exceeded", None)), path
            assert int(headers["Retry-After"]) >= 1
        status, _, _ = await send(rig, "POST", STREAM_CHECK, None, bearer(key))
        assert status == 200
        # /api/chat without a model asks for LM Studio's list; no generation was asked for.
        assert [r.path for r in fake_lmstudio.received if r.method == "POST"] == []


async def needed_tokens(rig: IdentityRig, path: str, body: dict[str, Any]) -> int:
    """The tokens ``body`` reserves on ``path``: read from the refusal a budget of 1 gets."""
    small = budget_key(rig, 1, "one")
    _, _, raw = await send(rig, "POST", path, body, bearer(small))
    message = json.loads(raw)["error"]["message"]
    match = re.search(r"could use about ([\d,]+) tokens", message)
    assert match, message
    return int(match.group(1).replace(",", ""))


# ---- the fair queue, as a caller meets it --------------------------------------------------------


def answers_slowly(fake: FakeLMStudio) -> None:
    fake.behaviour.chunks = 40
    fake.behaviour.chunk_delay = 0.05


async def occupy(session: aiohttp.ClientSession, rig: IdentityRig, key: str) -> asyncio.Task[int]:
    """A stream that holds a generation slot for about two seconds."""

    async def run() -> int:
        body = {"model": MODEL, "messages": QUESTION, "stream": True}
        async with session.post(rig.url + CHAT, json=body, headers=bearer(key)) as r:
            await r.read()
            return r.status

    task = asyncio.ensure_future(run())
    await asyncio.sleep(0.2)
    return task


class TestQueueAnswers:
    async def test_the_token_counter_and_the_stream_check_never_wait_for_a_slot(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        answers_slowly(fake_lmstudio)
        rig = await start_identity_gateway(
            routes_enable_messages=True, queue_generations_in_flight=1, queue_max_wait=0.3
        )
        busy, other = budget_key(rig, None, "busy"), budget_key(rig, None, "other")
        async with aiohttp.ClientSession() as session:
            running = await occupy(session, rig, busy)
            counted = await send(rig, "POST", COUNT_TOKENS, MESSAGES_BODY, bearer(other))
            checked = await send(rig, "POST", STREAM_CHECK, None, bearer(other))
            waited = await send(rig, "POST", MESSAGES, MESSAGES_BODY, bearer(other))
            running.cancel()
        assert counted[0] == 200 and checked[0] == 200
        assert (waited[0], error_of(waited[2])) == (503, ("queue_timeout", None))
        assert 1 <= int(waited[1]["Retry-After"]) <= 5
        assert json.loads(waited[2])["error"]["type"] == "server_error"

    @pytest.mark.parametrize("path", [MESSAGES, "/api/chat"])
    async def test_waiting_places_per_caller_hold_on_both_sides(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio, path: str
    ) -> None:
        answers_slowly(fake_lmstudio)
        rig = await start_identity_gateway(
            routes_enable_messages=True,
            queue_generations_in_flight=1,
            queue_max_waiting_per_caller=1,
            queue_max_stream_wait=5.0,
        )
        busy, caller = budget_key(rig, None, "busy"), budget_key(rig, None, "caller")
        body: dict[str, Any] = {**MESSAGES_BODY, "stream": True}
        if path == "/api/chat":
            body = {"message": "hi", "model": MODEL, "stream": True}
        async with aiohttp.ClientSession() as session:
            running = await occupy(session, rig, busy)
            # One waiting place: the first waiter is told its place (and stays)...
            waiting = await session.post(rig.url + path, json=body, headers=bearer(caller))
            told = await asyncio.wait_for(waiting.content.readuntil(b"\n\n"), 5)
            assert (waiting.status, told) == (200, b": waiting, 0 ahead\n\n")
            # ...the second is refused, at once, with a time to retry.
            second = await send(rig, "POST", path, body, bearer(caller))
            waiting.close()
            running.cancel()
        assert (second[0], error_of(second[2])) == (429, ("queue_full", None))
        assert int(second[1]["Retry-After"]) >= 1
        assert b"queue.max_waiting_per_caller" in second[2]

    async def test_the_whole_queue_full_is_a_503_with_retry_after(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        answers_slowly(fake_lmstudio)
        rig = await start_identity_gateway(
            routes_enable_messages=True,
            queue_generations_in_flight=1,
            queue_max_waiting=1,
            queue_max_stream_wait=5.0,
        )
        keys = [budget_key(rig, None, name) for name in ("busy", "first", "second")]
        body = {**MESSAGES_BODY, "stream": True}
        async with aiohttp.ClientSession() as session:
            running = await occupy(session, rig, keys[0])
            waiting = await session.post(rig.url + MESSAGES, json=body, headers=bearer(keys[1]))
            told = await asyncio.wait_for(waiting.content.readuntil(b"\n\n"), 5)
            assert told == b": waiting, 0 ahead\n\n"
            status, headers, raw = await send(rig, "POST", MESSAGES, body, bearer(keys[2]))
            waiting.close()
            running.cancel()
        assert (status, error_of(raw)) == (503, ("queue_full", None))
        assert json.loads(raw)["error"]["type"] == "server_error"
        assert int(headers["Retry-After"]) >= 1


# ---- a block whose type is no string (found by this issue's fuzzing) -------------------------
#
# A content block whose "type" was an object or a list crashed the token estimate (`kind in
# {...}` on an unhashable value): 500 internal_error with a traceback, on count_tokens for
# anyone with the chat scope and on every generation endpoint for a caller with a budget (the
# reservation uses the same estimate). Such a block is now counted whole, as an unknown kind's.

# The string is the control: the same request passes with it.
ODD_TYPES: dict[str, Any] = {"object": {}, "list": [], "list_of_text": ["text"], "string": "text"}


@pytest.mark.parametrize("kind", ODD_TYPES.values(), ids=ODD_TYPES.keys())
async def test_a_block_type_that_is_not_a_string_is_counted_by_count_tokens(
    rig: IdentityRig, kind: Any
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": kind}]}]}
    with LogCapture() as logs:
        status, _, raw = await send(rig, "POST", COUNT_TOKENS, body, bearer(no_budget_key(rig)))
    assert status == 200, raw[:300]
    assert json.loads(raw)["input_tokens"] >= 1
    assert "Traceback" not in logs.text


# Where each generation endpoint's estimate reads content blocks.
ODD_BLOCK_AT: dict[str, str] = {
    MESSAGES: "messages",
    CHAT: "messages",
    "/v1/completions": "prompt",
    "/v1/embeddings": "input",
    "/v1/responses": "input",
}


def with_odd_block(path: str, kind: Any) -> dict[str, Any]:
    block = [{"type": kind}]
    if ODD_BLOCK_AT[path] == "messages":
        return {"model": MODEL, "messages": [{"role": "user", "content": block}]}
    return {"model": MODEL, ODD_BLOCK_AT[path]: block}


@pytest.mark.parametrize("kind", ODD_TYPES.values(), ids=ODD_TYPES.keys())
@pytest.mark.parametrize("path", ODD_BLOCK_AT)
async def test_a_block_type_that_is_not_a_string_is_no_500_for_a_budgeted_caller(
    start_identity_gateway: IdentityFactory, path: str, kind: Any
) -> None:
    rig = await start_identity_gateway(routes_enable_messages=True, routes_enable_responses=True)
    body = with_odd_block(path, kind)
    key = new_key(rig, "budgeted", scopes=ALL_SCOPES, budget=Budget(tokens_per_day=100_000))
    with LogCapture() as logs:
        status, _, raw = await send(rig, "POST", path, body, bearer(key))
    # Answered, or refused for what the body is: never the internal error.
    assert status == 200 or error_of(raw)[0] != "internal_error", raw[:300]
    assert "Traceback" not in logs.text


# ---- upstreams, as a caller meets them ----------------------------------------------------------


async def test_with_every_upstream_switched_off_only_lm_gates_own_answers_go_on(
    start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
) -> None:
    rig = await start_identity_gateway(
        routes_enable_messages=True,
        upstreams=(UpstreamEntry("local", fake_lmstudio.url, enabled=False),),
    )
    key = bearer(new_key(rig))
    status, _, raw = await send(rig, "GET", "/readyz")
    readiness = json.loads(raw)
    assert (status, readiness["status"]) == (503, "unavailable")
    assert readiness["upstreams"] == [{"name": "local", "state": "disabled"}]
    assert (await send(rig, "POST", COUNT_TOKENS, MESSAGES_BODY, key))[0] == 200
    assert (await send(rig, "POST", STREAM_CHECK, None, key))[0] == 200
    for method, path in (("POST", MESSAGES), ("POST", CHAT), ("GET", "/v1/models")):
        body = {**MESSAGES_BODY} if method == "POST" else None
        status, headers, raw = await send(rig, method, path, body, key)
        assert (status, error_of(raw)) == (503, ("upstream_disabled", None)), path
        assert json.loads(raw)["error"]["type"] == "upstream_error"
        assert "Retry-After" not in headers  # waiting does not help: the owner must act
        assert fake_lmstudio.url.rsplit(":", 1)[1].encode() not in raw
    assert fake_lmstudio.received == []
