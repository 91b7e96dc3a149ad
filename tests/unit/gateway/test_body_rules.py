"""Body rules: a JSON object, a size cap, ttl dropped, model required, MCP tools removed; and,
as units, the JSON the parser refuses and the limits on both sides. Every route through a real
gateway is in test_body_hardening.py."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import CLIENT_KEY, GatewayFactory, auth_headers
from tests.fake_lmstudio import FakeLMStudio
from tests.helpers import FixedPrincipalAuthenticator
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.body_rules import (
    MAX_INT_DIGITS,
    MAX_JSON_CONTAINERS,
    MAX_JSON_DEPTH,
    PreparedBody,
    apply_principal_rules,
    parse_json_object,
    prepare_body,
)
from tray_app.gateway.routes import FORWARDED_ROUTES, Route
from tray_app.gateway.server.runner import GatewayServer
from tray_app.identity.principal import ALL_SCOPES, Principal


async def post(
    server: GatewayServer, path: str, data: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
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
        (b"[1, 2]", "JSON object, not a JSON array."),
        (b'"text"', "JSON object, not a JSON string."),
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
    gateway: GatewayServer, fake_lmstudio: FakeLMStudio, body: dict[str, object], code: str
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
    server = await start_gateway(limits_max_body_bytes=2048)
    status, payload = await post(
        server, "/v1/chat/completions", json.dumps({"model": "m", "pad": "x" * 4000}).encode()
    )
    assert status == 413
    assert payload["error"]["code"] == "body_too_large"
    assert fake_lmstudio.received == []


async def test_body_over_the_cap_is_413_chunked(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    server = await start_gateway(limits_max_body_bytes=2048)

    # No Content-Length: the cap must hold while reading.
    async def chunks() -> AsyncIterator[bytes]:
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
    server = await start_gateway(routes_enable_responses=True, routes_enable_messages=True)
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
        "max_completion_tokens": 100,  # chat's other length field gets the cap too
    }


def test_a_cap_only_added_keeps_the_clients_bytes() -> None:
    # A budget's cap on a body that named no length (the common budgeted request): the fields
    # go in front, the client's own bytes follow untouched; encoding the body again cost more
    # than the rest of the gate.
    raw = b' {"model" : "m",\n "messages":[{"role":"user","content":"h\\u00e9"}]}'
    adjusted = apply_principal_rules(
        prepare_body(CHAT_ROUTE, raw), CHAT_ROUTE, max_tokens=64, want_usage=True
    )
    assert not adjusted.hide_usage  # not a stream
    assert adjusted.body.raw == b'{"max_tokens":64,"max_completion_tokens":64,' + raw.lstrip()[1:]
    assert json.loads(adjusted.body.raw) == {
        **json.loads(raw),
        "max_tokens": 64,
        "max_completion_tokens": 64,
    }


def test_a_capped_stream_gets_the_cap_and_the_usage_option_in_front() -> None:
    raw = b'{"model":"m","stream":true,"max_completion_tokens":10,"messages":[]}'
    adjusted = apply_principal_rules(
        prepare_body(CHAT_ROUTE, raw), CHAT_ROUTE, max_tokens=64, want_usage=True
    )
    assert adjusted.hide_usage
    # The client's own smaller limit is kept, and given to the field it left out.
    assert adjusted.body.raw == (
        b'{"max_tokens":10,"stream_options":{"include_usage":true},' + raw[1:]
    )


@pytest.mark.parametrize(
    ("member", "name"),
    [
        (b'"max_tokens":null', b"max_tokens"),
        (b'"max_tokens":0', b"max_tokens"),
        (b'"max_completion_tokens":true', b"max_completion_tokens"),
        (b'"max_output_tokens":9000', b"max_output_tokens"),
        (b'"n":3', b'"n"'),
        (b'"stream_options":null', b"stream_options"),
    ],
)
def test_a_member_the_client_sent_is_replaced_never_doubled(member: bytes, name: bytes) -> None:
    # A member put in front of one of the same name would lose to it (the last one is read):
    # a body whose own member is changed is encoded again, with that member once.
    raw = b'{"model":"m","stream":true,' + member + b',"messages":[]}'
    adjusted = apply_principal_rules(
        prepare_body(CHAT_ROUTE, raw), CHAT_ROUTE, max_tokens=64, want_usage=True
    )
    assert adjusted.body.raw.count(name) == 1
    sent = json.loads(adjusted.body.raw)
    assert (sent["max_tokens"], sent["max_completion_tokens"]) == (64, 64)
    assert sent["stream_options"] == {"include_usage": True}
    assert sent.get("n", 1) == 1


def test_an_empty_object_is_encoded_not_spliced() -> None:
    # Every forwarded route needs a model today, but "{" + members + "," + "}" is not JSON.
    empty = PreparedBody(payload={}, raw=b" {} ", model=None, stream=False, draft_model=None)
    adjusted = apply_principal_rules(empty, CHAT_ROUTE, max_tokens=5, want_usage=False)
    assert json.loads(adjusted.body.raw) == {"max_tokens": 5, "max_completion_tokens": 5}


def test_nothing_to_change_keeps_the_body_itself() -> None:
    prepared = prepare_body(CHAT_ROUTE, b'{"model":"m","max_tokens":5,"messages":[]}')
    adjusted = apply_principal_rules(prepared, CHAT_ROUTE, max_tokens=64, want_usage=True)
    assert adjusted.body is not prepared
    assert adjusted.body.raw == b'{"max_completion_tokens":5,' + prepared.raw[1:]
    assert apply_principal_rules(prepared, CHAT_ROUTE, max_tokens=None, want_usage=True).body is (
        prepared
    )


# ---- JSON the parser refuses (issue 12, defect 8) ----------------------------------------


def nested(depth: int, *, kind: str = "array") -> bytes:
    """A body whose deepest value sits at ``depth`` (the body object itself is level 1)."""
    inner = depth - 1
    if kind == "array":
        value = "[" * inner + "]" * inner
    elif kind == "object":
        value = '{"a":' * inner + "1" + "}" * inner
    else:  # alternating, the way a JSON schema nests
        value = "".join("[" if i % 2 else '{"a":' for i in range(inner)) + "1"
        value += "".join("]" if i % 2 else "}" for i in reversed(range(inner)))
    return b'{"model":"m","x":' + value.encode() + b"}"


def with_value(literal: str) -> bytes:
    return b'{"model":"m","x":' + literal.encode() + b"}"


# Each would crash the parser, the re-encoding or the database (500 with a traceback), or
# reach LM Studio as something other than what the gateway checked.
BOMBS: dict[str, bytes] = {
    "nested_arrays_100k": nested(100_000),
    "nested_objects_100k": nested(100_000, kind="object"),
    "nested_mixed_100k": nested(100_000, kind="mixed"),
    "nested_one_past_the_limit": nested(MAX_JSON_DEPTH + 1),
    "objects_one_past_the_limit": nested(MAX_JSON_DEPTH + 1, kind="object"),
    "integer_5000_digits": with_value("9" * 5000),
    "integer_one_digit_too_long": with_value("9" * (MAX_INT_DIGITS + 1)),
    "negative_integer_too_long": with_value("-" + "9" * (MAX_INT_DIGITS + 1)),
    "integer_in_a_nested_array": with_value("[[" + "1" * 5000 + "]]"),
    "float_1e999": with_value("1e999"),
    "float_minus_1e999": with_value("-1e999"),
    "float_huge_exponent": with_value("1.5E+99999999999999999999"),
    "nan": with_value("NaN"),
    "infinity": with_value("Infinity"),
    "minus_infinity": with_value("-Infinity"),
    "nan_in_a_list": with_value("[1, NaN]"),
    "lone_high_surrogate": with_value('"\\ud800"'),
    "lone_low_surrogate": with_value('"\\udc00"'),
    "surrogates_reversed": with_value('"\\udc00\\ud800"'),
    "high_surrogate_then_a_pair": with_value('"\\uD83D\\ud83d\\ude00"'),
    "lone_surrogate_in_a_key": b'{"model":"m","\\ud800":1}',
    "duplicate_model": b'{"model":"qwen2.5-7b-instruct","model":"llama-3.2-1b-instruct"}',
    "duplicate_nested_key": b'{"model":"m","tools":[{"type":"function","type":"mcp"}]}',
    # Millions of tiny containers: each is cheap, all of them would hold the event loop for
    # seconds.
    "containers_one_past_the_limit": with_value(
        "[" + ",".join(["{}"] * (MAX_JSON_CONTAINERS - 1)) + "]"
    ),
    "eleven_million_objects": b'{"a":[' + b"{}," * 11_000_000 + b"{}]}",
}


class TestParserRefusesCraftedJson:
    @pytest.mark.parametrize("raw", BOMBS.values(), ids=BOMBS.keys())
    def test_is_a_400_invalid_body(self, raw: bytes) -> None:
        with pytest.raises(ApiError) as caught:
            parse_json_object(raw)
        error = caught.value
        assert (error.status, error.code, error.param) == (400, "invalid_body", None)
        assert error.type == "invalid_request_error"

    @pytest.mark.parametrize("raw", BOMBS.values(), ids=BOMBS.keys())
    def test_prepare_body_refuses_it_on_every_route(self, raw: bytes) -> None:
        for route in FORWARDED_ROUTES:
            if route.method == "POST":
                with pytest.raises(ApiError) as caught:
                    prepare_body(route, raw)
                assert caught.value.code == "invalid_body"


# The other side of each limit: the largest legitimate value still parses.
ACCEPTED: dict[str, bytes] = {
    "nested_arrays_at_the_limit": nested(MAX_JSON_DEPTH),
    "nested_objects_at_the_limit": nested(MAX_JSON_DEPTH, kind="object"),
    "nested_mixed_at_the_limit": nested(MAX_JSON_DEPTH, kind="mixed"),
    "wide_and_shallow": with_value("[" + ",".join(["[{}]"] * 5000) + "]"),
    "containers_at_the_limit": with_value("[" + ",".join(["{}"] * (MAX_JSON_CONTAINERS - 2)) + "]"),
    "brackets_inside_strings": with_value(json.dumps(["[" * 500 + "{" * 500])),
    "integer_at_the_limit": with_value("9" * MAX_INT_DIGITS),
    "negative_integer_at_the_limit": with_value("-" + "9" * MAX_INT_DIGITS),
    "largest_float": with_value("1.7976931348623157e308"),
    "tiny_float_underflows_to_zero": with_value("1e-999"),
    "surrogate_pair": with_value('"\\ud83d\\ude00"'),
    "surrogate_pair_upper_case": with_value('"\\uD83D\\uDE00"'),
    "escaped_backslash_then_ud800": with_value('"\\\\ud800"'),  # the text \ud800, no surrogate
    "same_key_in_two_objects": b'{"model":"m","a":{"k":1},"b":{"k":1}}',
}


class TestParserAcceptsTheLegitimateSide:
    @pytest.mark.parametrize("raw", ACCEPTED.values(), ids=ACCEPTED.keys())
    def test_parses(self, raw: bytes) -> None:
        assert parse_json_object(raw)["model"] == "m"

    def test_values_are_what_json_says(self) -> None:
        payload = parse_json_object(ACCEPTED["surrogate_pair"])
        assert payload["x"] == "\U0001f600"
        assert parse_json_object(ACCEPTED["escaped_backslash_then_ud800"])["x"] == "\\ud800"
        assert parse_json_object(ACCEPTED["integer_at_the_limit"])["x"] == 10**MAX_INT_DIGITS - 1
        assert parse_json_object(ACCEPTED["tiny_float_underflows_to_zero"])["x"] == 0.0


# ---- asking for usage keeps unchanged bodies byte for byte ---------------------------------

POST_ROUTES = [r for r in FORWARDED_ROUTES if r.method == "POST"]
# Spacing, key order, escapes and number spellings a re-encoding would change.
UNCHANGED = (
    b' {"model" : "qwen2.5-7b-instruct",\n "temperature":0.70, "seed": 1E3, "max_tokens": 5,'
    b' "messages":[{"role":"user","content":"h\\u00e9 \\ud83d\\ude00"}], "input": "x",'
    b' "prompt": "p", "max_output_tokens": 5, "max_completion_tokens": 5} '
)


@pytest.mark.parametrize("route", POST_ROUTES, ids=lambda r: r.path)
def test_a_body_no_rule_changes_is_forwarded_as_sent(route: Route) -> None:
    prepared = prepare_body(route, UNCHANGED)
    for cap in (None, 5, 6):
        adjusted = apply_principal_rules(prepared, route, max_tokens=cap, want_usage=True)
        assert adjusted.body.raw is UNCHANGED
        assert not adjusted.hide_usage
