"""Issue 12, defects 2, 8 and 14, through a real gateway in front of the fake LM Studio: one
body rule set for every route. What LM Studio received is the proof.

- The output cap: every length field of every route, every value that is not a length.
- Crafted JSON: every JSON endpoint, every bomb shape is a 400, never a 500 or a traceback.
- Fields that load models or call out: MCP tools in every shape, LM Studio's own fields,
  draft_model against the allowlist.
- And a body no rule changes still reaches LM Studio byte for byte, usage recording on.
"""

from __future__ import annotations

import copy
import io
import json
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import CLIENT_KEY, GatewayFactory, IdentityFactory, IdentityRig, auth_headers
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.helpers import FixedPrincipalAuthenticator, LogCapture
from tests.unit.gateway.test_body_rules import BOMBS
from tray_app.gateway.app import PAIR_MAX_BODY_BYTES
from tray_app.gateway.server.runner import GatewayServer
from tray_app.gateway.stream_probe import MAX_BODY_BYTES as STREAM_CHECK_MAX_BODY
from tray_app.identity.principal import ALL_SCOPES, Principal

CAP = 100
MODEL, OTHER_MODEL, EMBEDDING_MODEL = MODELS
NOT_ALLOWED = "secret-70b-instruct"

# One representative body per forwarded POST route, each valid as it stands.
BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"model": MODEL, "prompt": "hi"},
    "/v1/embeddings": {"model": EMBEDDING_MODEL, "input": "hi"},
    "/v1/responses": {"model": MODEL, "input": "hi"},
    "/v1/messages": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
}
ROUTES = list(BODIES)
# The policy, written out here rather than imported, so that dropping a field from the code
# fails these tests.
LENGTH_FIELDS: dict[str, tuple[str, ...]] = {
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
    "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",),
    "/v1/messages": ("max_tokens",),
}
LENGTH_CASES = [(path, field) for path, fields in LENGTH_FIELDS.items() for field in fields]


def body_for(path: str, **extra: Any) -> dict[str, Any]:
    return {**copy.deepcopy(BODIES[path]), **extra}


async def post(
    url: str, path: str, body: dict[str, Any] | bytes, *, key: str = CLIENT_KEY
) -> tuple[int, dict[str, Any]]:
    data: Any = body if isinstance(body, bytes) else json.dumps(body).encode()
    if len(data) > 1024 * 1024:
        data = io.BytesIO(data)  # aiohttp's client warns about big bodies given as bytes
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            url + path,
            data=data,
            headers={**auth_headers(key), "Content-Type": "application/json"},
        ) as r,
    ):
        return r.status, await r.json()


async def gateway_for(start_gateway: GatewayFactory, principal: Principal) -> GatewayServer:
    return await start_gateway(
        authenticator=FixedPrincipalAuthenticator(CLIENT_KEY, principal),
        routes_enable_responses=True,
        routes_enable_messages=True,
    )


def error_of(payload: dict[str, Any]) -> tuple[str, str | None]:
    return payload["error"]["code"], payload["error"]["param"]


# ---- defect 2: the output cap -------------------------------------------------------------

# LM Studio reads 0 and -1 as "no limit"; none of these is a positive integer <= CAP.
NOT_LENGTHS: dict[str, Any] = {
    "minus_one": -1,
    "zero": 0,
    "negative": -100,
    "true": True,
    "false": False,
    "float_equal_to_a_length": 50.0,
    "fraction": 0.5,
    "string": "50",
    "empty_string": "",
    "null": None,
    "one_over_the_cap": CAP + 1,
    "int64_max": 2**63 - 1,
    "huge": 10**40,
    "list": [50],
    "object": {"value": 50},
}
LENGTHS = {"one": 1, "cap_minus_one": CAP - 1, "cap": CAP}


@pytest.fixture
async def capped(start_gateway: GatewayFactory) -> GatewayServer:
    return await gateway_for(start_gateway, Principal("capped", ALL_SCOPES, max_tokens=CAP))


def without_lengths(payload: dict[str, Any]) -> dict[str, Any]:
    lengths = {f for fields in LENGTH_FIELDS.values() for f in fields}
    return {k: v for k, v in payload.items() if k not in lengths}


class TestOutputCap:
    @pytest.mark.parametrize("value", NOT_LENGTHS.values(), ids=NOT_LENGTHS.keys())
    @pytest.mark.parametrize(("path", "field"), LENGTH_CASES)
    async def test_a_value_that_is_not_a_length_becomes_the_cap(
        self, capped: GatewayServer, fake_lmstudio: FakeLMStudio, path: str, field: str, value: Any
    ) -> None:
        body = without_lengths(body_for(path)) | {field: value}
        status, _ = await post(capped.url, path, body)
        assert status == 200
        received = fake_lmstudio.received[-1].json()
        assert {f: received[f] for f in LENGTH_FIELDS[path]} == dict.fromkeys(
            LENGTH_FIELDS[path], CAP
        )
        assert without_lengths(received) == without_lengths(body)

    @pytest.mark.parametrize("path", LENGTH_FIELDS)
    async def test_a_missing_length_is_added_as_the_cap(
        self, capped: GatewayServer, fake_lmstudio: FakeLMStudio, path: str
    ) -> None:
        body = without_lengths(body_for(path))
        status, _ = await post(capped.url, path, body)
        assert status == 200
        received = fake_lmstudio.received[-1].json()
        assert received == body | dict.fromkeys(LENGTH_FIELDS[path], CAP)

    @pytest.mark.parametrize("value", LENGTHS.values(), ids=LENGTHS.keys())
    @pytest.mark.parametrize(("path", "field"), LENGTH_CASES)
    async def test_a_length_within_the_cap_passes_unchanged(
        self, capped: GatewayServer, fake_lmstudio: FakeLMStudio, path: str, field: str, value: int
    ) -> None:
        raw = json.dumps(without_lengths(body_for(path)) | {field: value}).encode()
        status, _ = await post(capped.url, path, raw)
        assert status == 200
        received = fake_lmstudio.received[-1]
        if len(LENGTH_FIELDS[path]) == 1:
            assert received.body == raw  # byte for byte
        else:
            # The sibling field is added with the client's own, smaller, limit.
            assert {f: received.json()[f] for f in LENGTH_FIELDS[path]} == dict.fromkeys(
                LENGTH_FIELDS[path], value
            )

    async def test_two_chat_lengths_within_the_cap_are_both_kept(
        self, capped: GatewayServer, fake_lmstudio: FakeLMStudio
    ) -> None:
        path = "/v1/chat/completions"
        raw = json.dumps(body_for(path, max_tokens=10, max_completion_tokens=CAP)).encode()
        assert (await post(capped.url, path, raw))[0] == 200
        assert fake_lmstudio.received[-1].body == raw

    async def test_one_good_and_one_bad_chat_length_become_the_good_one(
        self, capped: GatewayServer, fake_lmstudio: FakeLMStudio
    ) -> None:
        path = "/v1/chat/completions"
        await post(capped.url, path, body_for(path, max_tokens=-1, max_completion_tokens=7))
        received = fake_lmstudio.received[-1].json()
        assert (received["max_tokens"], received["max_completion_tokens"]) == (7, 7)

    @pytest.mark.parametrize("stream", [False, True])
    @pytest.mark.parametrize("value", [-1, 0])
    async def test_the_openai_client_cannot_ask_for_no_limit(
        self, capped: GatewayServer, fake_lmstudio: FakeLMStudio, value: int, stream: bool
    ) -> None:
        async with openai.AsyncOpenAI(
            base_url=capped.url + "/v1", api_key=CLIENT_KEY, max_retries=0
        ) as client:
            messages: Any = [{"role": "user", "content": "hi"}]
            if stream:
                chunks = await client.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=value, stream=True
                )
                async for _ in chunks:
                    pass
            else:
                await client.chat.completions.create(
                    model=MODEL, messages=messages, max_completion_tokens=value
                )
            await client.completions.create(model=MODEL, prompt="hi", max_tokens=value)
        chat, completion = (r.json() for r in fake_lmstudio.received)
        assert (chat["max_tokens"], chat["max_completion_tokens"]) == (CAP, CAP)
        assert completion["max_tokens"] == CAP

    @pytest.mark.parametrize(("path", "field"), LENGTH_CASES)
    async def test_an_uncapped_principal_is_left_alone(
        self, start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio, path: str, field: str
    ) -> None:
        server = await gateway_for(start_gateway, Principal("owner", ALL_SCOPES))
        raw = json.dumps(without_lengths(body_for(path)) | {field: -1}).encode()
        assert (await post(server.url, path, raw))[0] == 200
        assert fake_lmstudio.received[-1].body == raw


# ---- defect 8: crafted JSON on every JSON endpoint ----------------------------------------

# With the token counter, which LM Gate answers itself under /v1/messages' body rules.
JSON_ENDPOINTS = [*ROUTES, "/v1/messages/count_tokens", "/api/chat", "/pair", "/stream-check"]
# Endpoints with a small body limit of their own: a bigger bomb never reaches the parser there.
SMALL_BODIES = {"/pair": PAIR_MAX_BODY_BYTES, "/stream-check": STREAM_CHECK_MAX_BODY}


@pytest.fixture
async def rig(start_identity_gateway: IdentityFactory) -> IdentityRig:
    return await start_identity_gateway(routes_enable_responses=True, routes_enable_messages=True)


def key_for(rig: IdentityRig) -> str:
    scopes = frozenset({"chat", "embeddings", "models"})
    return rig.identity.api_keys.create("bodies", scopes=scopes)[0]


class TestCraftedJsonOnEveryEndpoint:
    @pytest.mark.parametrize("bomb", BOMBS.values(), ids=BOMBS.keys())
    @pytest.mark.parametrize("path", JSON_ENDPOINTS)
    async def test_is_a_400_and_the_gateway_carries_on(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio, path: str, bomb: bytes
    ) -> None:
        key = key_for(rig)
        with LogCapture() as logs:
            status, payload = await post(rig.url, path, bomb, key=key)
            async with aiohttp.ClientSession() as s, s.get(rig.url + "/healthz") as r:
                assert r.status == 200
        expected = (
            (413, "body_too_large")
            if len(bomb) > SMALL_BODIES.get(path, len(bomb))
            else (400, "invalid_body")
        )
        assert status == expected[0], payload
        assert error_of(payload) == (expected[1], None)
        assert payload["error"]["type"] == "invalid_request_error"
        assert fake_lmstudio.received == []
        assert "Traceback" not in logs.text and "internal_error" not in logs.text
        (line,) = [r for r in logs.access() if r["path"] == path]
        assert (line["status"], line["error"]) == expected


# ---- defect 14: tools and fields that call out or load models -----------------------------

FUNCTION_TOOL = {"type": "function", "function": {"name": "add", "parameters": {}}}
# Found by their type, compared after NFKC, strip and casefold...
MCP_BY_TYPE: dict[str, dict[str, Any]] = {
    "mcp": {"type": "mcp"},
    "leading_space": {"type": " MCP"},
    "trailing_whitespace": {"type": "mcp\t\n"},
    "mixed_case": {"type": "Mcp"},
    "suffix": {"type": "mcp_server"},
    "prefix": {"type": "remote_mcp"},
    "fullwidth": {"type": "\uff4d\uff43\uff50"},
    "anthropic_toolset": {"type": "mcp_toolset"},
}
# ...or by carrying a remote server's address or id, whatever they call themselves.
MCP_BY_KEY: dict[str, dict[str, Any]] = {
    "openai_mcp": {
        "type": "mcp",
        "server_label": "evil",
        "server_url": "https://evil.example/mcp",
        "require_approval": "never",
    },
    "function_with_server_url": {**FUNCTION_TOOL, "server_url": "https://evil.example/mcp"},
    "function_with_connector": {**FUNCTION_TOOL, "connector_id": "connector_gmail"},
    "camel_case_server_url": {**FUNCTION_TOOL, "serverUrl": "https://evil.example/mcp"},
    "no_type_server_label": {"server_label": "installed-in-lm-studio"},
    "anthropic_url_server": {"type": "url", "url": "https://evil.example/mcp", "name": "evil"},
    "mcp_server_name": {"type": "custom", "mcp_server_name": "evil"},
}
MCP_TOOLS = MCP_BY_TYPE | MCP_BY_KEY
# Dropped on every route, in the spellings LM Studio might also accept.
DROPPED_FIELDS: dict[str, Any] = {
    "ttl": 5,
    "TTL": 5,
    "mcp_servers": [{"type": "url", "url": "https://evil.example/mcp"}],
    "mcpServers": [{"type": "url", "url": "https://evil.example/mcp"}],
    "integrations": ["mcp/playwright"],
    "Integrations": [{"type": "plugin", "id": "mcp/filesystem"}],
    "ephemeral_mcp": {"server_url": "https://evil.example/mcp"},
    "plugins": ["mcp/filesystem"],
    "context_length": 131072,
    "draftModel": NOT_ALLOWED,
    "draft-model": NOT_ALLOWED,
}
NOT_A_TOOL_LIST: dict[str, Any] = {
    "object": {"type": "mcp", "server_url": "https://evil.example/mcp"},
    "string": "mcp",
    "number": 1,
    "true": True,
    "null": None,
}
NOT_TOOLS: dict[str, Any] = {
    "string": ["mcp"],
    "number": [1],
    "null": [None],
    "nested_list": [[{"type": "mcp"}]],
    "type_list": [{"type": ["mcp"]}],
    "type_number": [{"type": 1}],
    "type_null": [{"type": None}],
}


@pytest.fixture
async def open_gateway(start_gateway: GatewayFactory) -> GatewayServer:
    return await gateway_for(start_gateway, Principal("owner", ALL_SCOPES))


class TestRemoteToolsAndFields:
    @pytest.mark.parametrize("tool", MCP_TOOLS.values(), ids=MCP_TOOLS.keys())
    @pytest.mark.parametrize("path", ROUTES)
    async def test_mcp_tools_are_removed_and_the_rest_kept(
        self, open_gateway: GatewayServer, fake_lmstudio: FakeLMStudio, path: str, tool: Any
    ) -> None:
        body = body_for(path, tools=[tool, FUNCTION_TOOL], tool_choice="auto")
        assert (await post(open_gateway.url, path, body))[0] == 200
        assert fake_lmstudio.received[-1].json() == body | {"tools": [FUNCTION_TOOL]}

    @pytest.mark.parametrize("tool", MCP_TOOLS.values(), ids=MCP_TOOLS.keys())
    @pytest.mark.parametrize("path", ROUTES)
    async def test_only_mcp_tools_leave_no_tools_and_no_tool_choice(
        self, open_gateway: GatewayServer, fake_lmstudio: FakeLMStudio, path: str, tool: Any
    ) -> None:
        body = body_for(path, tools=[tool, tool], tool_choice="required")
        assert (await post(open_gateway.url, path, body))[0] == 200
        assert fake_lmstudio.received[-1].json() == BODIES[path]

    @pytest.mark.parametrize("path", ROUTES)
    async def test_a_tool_choice_naming_an_mcp_tool_goes_with_it(
        self, open_gateway: GatewayServer, fake_lmstudio: FakeLMStudio, path: str
    ) -> None:
        mcp = MCP_BY_KEY["openai_mcp"]
        choices = [
            {"type": "mcp", "server_label": "evil"},
            {"type": "allowed_tools", "mode": "auto", "tools": [mcp]},
        ]
        for choice in choices:
            body = body_for(path, tools=[mcp, FUNCTION_TOOL], tool_choice=choice)
            assert (await post(open_gateway.url, path, body))[0] == 200
            assert fake_lmstudio.received[-1].json() == body_for(path, tools=[FUNCTION_TOOL])
        kept = {"type": "function", "function": {"name": "add"}}
        body = body_for(path, tools=[mcp, FUNCTION_TOOL], tool_choice=kept)
        await post(open_gateway.url, path, body)
        assert fake_lmstudio.received[-1].json()["tool_choice"] == kept

    @pytest.mark.parametrize("field", DROPPED_FIELDS, ids=DROPPED_FIELDS.keys())
    @pytest.mark.parametrize("path", ROUTES)
    async def test_lm_studio_fields_are_dropped(
        self, open_gateway: GatewayServer, fake_lmstudio: FakeLMStudio, path: str, field: str
    ) -> None:
        body = body_for(path, **{field: DROPPED_FIELDS[field]}, temperature=0.5)
        assert (await post(open_gateway.url, path, body))[0] == 200
        assert fake_lmstudio.received[-1].json() == body_for(path, temperature=0.5)

    @pytest.mark.parametrize("tools", NOT_A_TOOL_LIST.values(), ids=NOT_A_TOOL_LIST.keys())
    @pytest.mark.parametrize("path", ROUTES)
    async def test_tools_that_are_not_a_list_are_refused(
        self, open_gateway: GatewayServer, fake_lmstudio: FakeLMStudio, path: str, tools: Any
    ) -> None:
        status, payload = await post(open_gateway.url, path, body_for(path, tools=tools))
        assert (status, error_of(payload)) == (400, ("invalid_body", "tools"))
        assert fake_lmstudio.received == []

    @pytest.mark.parametrize("tools", NOT_TOOLS.values(), ids=NOT_TOOLS.keys())
    @pytest.mark.parametrize("path", ROUTES)
    async def test_tools_that_are_not_tool_objects_are_refused(
        self, open_gateway: GatewayServer, fake_lmstudio: FakeLMStudio, path: str, tools: Any
    ) -> None:
        body = body_for(path, tools=[FUNCTION_TOOL, *tools])
        status, payload = await post(open_gateway.url, path, body)
        assert (status, error_of(payload)) == (400, ("invalid_body", "tools"))
        assert fake_lmstudio.received == []


ALLOWED = frozenset({MODEL, OTHER_MODEL, EMBEDDING_MODEL})
NOT_MODEL_NAMES: dict[str, Any] = {
    "number": 1,
    "float": 1.5,
    "true": True,
    "null": None,
    "list": [OTHER_MODEL],
    "object": {"id": OTHER_MODEL},
    "empty": "",
    "blank": "   ",
    "too_long": "x" * 257,
}


@pytest.fixture
async def restricted(start_gateway: GatewayFactory) -> GatewayServer:
    return await gateway_for(start_gateway, Principal("phone", ALL_SCOPES, models=ALLOWED))


class TestDraftModel:
    @pytest.mark.parametrize("path", ROUTES)
    async def test_an_allowed_draft_model_passes_byte_for_byte(
        self, restricted: GatewayServer, fake_lmstudio: FakeLMStudio, path: str
    ) -> None:
        raw = json.dumps(body_for(path, draft_model=OTHER_MODEL)).encode()
        assert (await post(restricted.url, path, raw))[0] == 200
        assert fake_lmstudio.received[-1].body == raw

    @pytest.mark.parametrize("draft", [NOT_ALLOWED, MODEL.upper(), MODEL + " "])
    @pytest.mark.parametrize("path", ROUTES)
    async def test_a_draft_model_outside_the_allowlist_is_403(
        self, restricted: GatewayServer, fake_lmstudio: FakeLMStudio, path: str, draft: str
    ) -> None:
        status, payload = await post(restricted.url, path, body_for(path, draft_model=draft))
        assert (status, error_of(payload)) == (403, ("model_not_allowed", "draft_model"))
        assert payload["error"]["type"] == "permission_error"
        assert fake_lmstudio.received == []

    @pytest.mark.parametrize("path", ROUTES)
    async def test_the_model_is_still_checked_first(
        self, restricted: GatewayServer, fake_lmstudio: FakeLMStudio, path: str
    ) -> None:
        body = body_for(path, model=NOT_ALLOWED, draft_model=OTHER_MODEL)
        status, payload = await post(restricted.url, path, body)
        assert (status, error_of(payload)) == (403, ("model_not_allowed", "model"))
        assert fake_lmstudio.received == []

    @pytest.mark.parametrize("draft", NOT_MODEL_NAMES.values(), ids=NOT_MODEL_NAMES.keys())
    @pytest.mark.parametrize("path", ROUTES)
    async def test_a_draft_model_that_is_not_a_model_name_is_400(
        self, open_gateway: GatewayServer, fake_lmstudio: FakeLMStudio, path: str, draft: Any
    ) -> None:
        status, payload = await post(open_gateway.url, path, body_for(path, draft_model=draft))
        assert (status, error_of(payload)) == (400, ("invalid_model", "draft_model"))
        assert fake_lmstudio.received == []

    @pytest.mark.parametrize("path", ROUTES)
    async def test_any_draft_model_name_is_fine_for_an_unrestricted_key(
        self, open_gateway: GatewayServer, fake_lmstudio: FakeLMStudio, path: str
    ) -> None:
        for draft in (NOT_ALLOWED, "x" * 256):  # 256 characters: the longest name accepted
            raw = json.dumps(body_for(path, draft_model=draft)).encode()
            assert (await post(open_gateway.url, path, raw))[0] == 200
            assert fake_lmstudio.received[-1].body == raw


# ---- a body no rule changes ---------------------------------------------------------------


def unusual_spelling(path: str, **extra: Any) -> bytes:
    """The route's body as a client might write it: spacing, key order, escapes and number
    spellings that any re-encoding would change."""
    members = [f'"{k}" :  {json.dumps(v)}' for k, v in body_for(path, **extra).items()]
    members.append('"temperature":0.70')
    members.append('"user" : "h\\u00e9 \\ud83d\\ude00 /\\/"')
    return ("{\n  " + ",\n  ".join(reversed(members)) + "\n}  ").encode()


class TestUnchangedBodies:
    @pytest.mark.parametrize("path", ROUTES)
    async def test_reach_lm_studio_byte_for_byte_with_usage_recording_on(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio, path: str
    ) -> None:
        raw = unusual_spelling(path)
        status, _ = await post(rig.url, path, raw, key=key_for(rig))
        assert status == 200
        assert fake_lmstudio.received[-1].body == raw

    @pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
    async def test_a_stream_that_asks_for_usage_itself_is_unchanged_too(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio, path: str
    ) -> None:
        raw = unusual_spelling(path, stream=True, stream_options={"include_usage": True})
        async with (
            aiohttp.ClientSession() as s,
            s.post(rig.url + path, data=raw, headers=auth_headers(key_for(rig))) as r,
        ):
            assert r.status == 200
            await r.read()
        assert fake_lmstudio.received[-1].body == raw


class TestChoicesUnderACap:
    """A capped key cannot multiply its output by asking for several choices."""

    @pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
    @pytest.mark.parametrize("field", ["n", "best_of"])
    @pytest.mark.parametrize("value", [2, 16, 0, -1, "4", None, 1.5])
    async def test_become_one(
        self,
        start_gateway: GatewayFactory,
        fake_lmstudio: FakeLMStudio,
        path: str,
        field: str,
        value: Any,
    ) -> None:
        principal = Principal("capped", ALL_SCOPES, max_tokens=CAP)
        server = await gateway_for(start_gateway, principal)
        status, _ = await post(server.url, path, body_for(path, **{field: value}))
        assert status == 200
        assert fake_lmstudio.received[-1].json()[field] == 1

    async def test_one_passes_and_an_uncapped_key_is_left_alone(
        self, start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        path = "/v1/chat/completions"
        capped = await gateway_for(start_gateway, Principal("c", ALL_SCOPES, max_tokens=CAP))
        assert (await post(capped.url, path, body_for(path, n=1)))[0] == 200
        assert fake_lmstudio.received[-1].json()["n"] == 1
        free = await gateway_for(start_gateway, Principal("f", ALL_SCOPES))
        raw = json.dumps(body_for(path, n=3)).encode()
        assert (await post(free.url, path, raw))[0] == 200
        assert fake_lmstudio.received[-1].body == raw


class TestOtherRoutesLengthFields:
    """A length field that belongs to another route is capped too, should LM Studio read it."""

    @pytest.mark.parametrize(
        ("path", "field"),
        [
            ("/v1/responses", "max_tokens"),
            ("/v1/completions", "max_completion_tokens"),
            ("/v1/chat/completions", "max_output_tokens"),
            ("/v1/messages", "max_completion_tokens"),
        ],
    )
    @pytest.mark.parametrize("value", [-1, 0, CAP + 1, "x"])
    async def test_is_capped_where_present(
        self,
        start_gateway: GatewayFactory,
        fake_lmstudio: FakeLMStudio,
        path: str,
        field: str,
        value: Any,
    ) -> None:
        server = await gateway_for(start_gateway, Principal("c", ALL_SCOPES, max_tokens=CAP))
        status, _ = await post(server.url, path, body_for(path, **{field: value}))
        assert status == 200
        assert fake_lmstudio.received[-1].json()[field] == CAP


@pytest.mark.parametrize("route", ROUTES)
async def test_an_mcp_tool_choice_without_tools_is_dropped(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio, route: str
) -> None:
    server = await gateway_for(start_gateway, Principal("p", ALL_SCOPES))
    body = body_for(route, tool_choice={"type": "mcp", "server_label": "evil"})
    status, _ = await post(server.url, route, body)
    assert status == 200
    assert "tool_choice" not in fake_lmstudio.received[-1].json()
