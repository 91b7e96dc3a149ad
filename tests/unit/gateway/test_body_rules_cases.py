"""Body rules, as units, in the cases the other body tests leave open (issue 13): what a
re-encoded body looks like, what survives the cap besides the lengths, tool choices that
name only local tools, nesting counted from the body itself, and the words of each refusal
(the client's only clue to what it sent wrong)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.body_rules import (
    MAX_INT_DIGITS,
    MAX_JSON_CONTAINERS,
    MAX_JSON_DEPTH,
    MAX_MODEL_NAME,
    apply_principal_rules,
    check_models,
    parse_json_object,
    prepare_body,
)
from tray_app.gateway.routes import FORWARDED_ROUTES
from tray_app.identity.principal import ALL_SCOPES, Principal

CHAT = next(r for r in FORWARDED_ROUTES if r.path == "/v1/chat/completions")
RESPONSES = next(r for r in FORWARDED_ROUTES if r.path == "/v1/responses")


def encoded(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


def refused(raw: bytes) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse_json_object(raw)
    assert (caught.value.status, caught.value.code) == (400, "invalid_body")
    return caught.value


# ---- a re-encoded body ------------------------------------------------------------------


def test_a_re_encoded_body_is_compact_utf8_json() -> None:
    # Changed by the cap, so re-encoded: compact separators, non-ASCII as UTF-8, not \u escapes.
    raw = b'{"model": "m", "max_tokens": 9000,'
    raw += b' "messages": [{"role": "user", "content": "h\xc3\xa9"}]}'
    adjusted = apply_principal_rules(prepare_body(CHAT, raw), CHAT, max_tokens=50, want_usage=False)
    assert (
        adjusted.body.raw
        == (
            '{"model":"m","max_tokens":50,"messages":[{"role":"user","content":"hé"}],'
            '"max_completion_tokens":50}'
        ).encode()
    )


def test_a_stripped_body_is_compact_utf8_json() -> None:
    raw = b'{"model": "m", "ttl": 5, "input": "\xe2\x82\xac"}'
    assert prepare_body(CHAT, raw).raw == '{"model":"m","input":"€"}'.encode()


# ---- what the cap keeps -----------------------------------------------------------------


@pytest.mark.parametrize("want_usage", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_a_capped_body_keeps_its_payload_model_stream_and_draft_model(
    stream: bool, want_usage: bool
) -> None:
    raw = encoded(
        {"model": "m", "draft_model": "d", "stream": stream, "max_tokens": 0, "messages": []}
    )
    prepared = prepare_body(CHAT, raw)
    adjusted = apply_principal_rules(prepared, CHAT, max_tokens=10, want_usage=want_usage)
    body = adjusted.body
    assert (body.model, body.stream, body.draft_model) == ("m", stream, "d")
    assert body.payload == json.loads(body.raw)
    assert body.payload["max_tokens"] == 10
    assert adjusted.hide_usage is (stream and want_usage)


# ---- tool choices -----------------------------------------------------------------------

LOCAL_TOOL = {"type": "function", "name": "f", "parameters": {}}
REMOTE_TOOL = {"type": "mcp", "server_label": "x", "server_url": "https://evil.example/mcp"}


def test_only_remote_tools_and_no_tool_choice_leave_neither() -> None:
    prepared = prepare_body(RESPONSES, encoded({"model": "m", "tools": [REMOTE_TOOL]}))
    assert prepared.payload == {"model": "m"}


@pytest.mark.parametrize("with_tools", [False, True])
def test_a_tool_choice_listing_only_local_tools_is_kept(with_tools: bool) -> None:
    choice = {"type": "allowed_tools", "mode": "auto", "tools": [LOCAL_TOOL, "f"]}
    body: dict[str, Any] = {"model": "m", "tool_choice": choice}
    if with_tools:
        body["tools"] = [LOCAL_TOOL, REMOTE_TOOL]
    prepared = prepare_body(RESPONSES, encoded(body))
    assert prepared.payload["tool_choice"] == choice
    assert prepared.payload.get("tools", [LOCAL_TOOL]) == [LOCAL_TOOL]


@pytest.mark.parametrize("with_tools", [False, True])
def test_a_tool_choice_listing_a_remote_tool_goes(with_tools: bool) -> None:
    choice = {"type": "allowed_tools", "mode": "auto", "tools": [LOCAL_TOOL, REMOTE_TOOL]}
    body: dict[str, Any] = {"model": "m", "tool_choice": choice}
    if with_tools:
        body["tools"] = [LOCAL_TOOL, REMOTE_TOOL]
    assert "tool_choice" not in prepare_body(RESPONSES, encoded(body)).payload


# ---- nesting is counted from the body (level 1) -----------------------------------------


def nested_values(levels: int, *, kind: str) -> bytes:
    """A body ``levels`` deep: the body object, then ``levels - 1`` containers inside it.
    Over MAX_JSON_DEPTH brackets, so the depth walk (not the bracket count) decides."""
    inner = levels - 1
    arrays = "[" * inner + "]" * inner
    value = arrays if kind == "array" else '{"a":' * inner + "1" + "}" * inner
    # Shallow siblings push the bracket count over MAX_JSON_DEPTH even for small depths.
    padding = ",".join(["[]"] * MAX_JSON_DEPTH)
    return f'{{"model":"m","pad":[{padding}],"x":{value}}}'.encode()


@pytest.mark.parametrize("kind", ["array", "object"])
@pytest.mark.parametrize("levels", [2, 3, MAX_JSON_DEPTH // 2 + 1, MAX_JSON_DEPTH])
def test_nesting_up_to_the_limit_parses(levels: int, kind: str) -> None:
    assert parse_json_object(nested_values(levels, kind=kind))["model"] == "m"


@pytest.mark.parametrize("kind", ["array", "object"])
def test_nesting_one_past_the_limit_is_refused_by_name(kind: str) -> None:
    error = refused(nested_values(MAX_JSON_DEPTH + 1, kind=kind))
    assert f"nested deeper than {MAX_JSON_DEPTH} levels" in error.message


# ---- unpaired surrogates anywhere -------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ['["\\ud800"]', '[["x", "\\udc00"]]', '{"k": ["\\ud800"]}', '[{"\\udfff": 1}]'],
)
def test_a_lone_surrogate_inside_a_list_is_refused(value: str) -> None:
    error = refused(b'{"model":"m","x":' + value.encode() + b"}")
    assert error.message == (
        "The request body is refused: a string holds an unpaired UTF-16 surrogate."
    )


def test_an_escaped_backslash_before_ud800_in_a_list_is_text() -> None:
    assert parse_json_object(b'{"model":"m","x":["\\\\ud800"]}')["x"] == ["\\ud800"]


# ---- the words of each refusal ----------------------------------------------------------


def test_a_long_integer_is_named() -> None:
    error = refused(b'{"x":' + b"1" * (MAX_INT_DIGITS + 1) + b"}")
    assert f"an integer longer than {MAX_INT_DIGITS} digits" in error.message


def test_an_out_of_range_number_is_quoted_up_to_40_characters() -> None:
    number = "1" + "0" * 60 + "e999"
    error = refused(b'{"x":' + number.encode() + b"}")
    assert f"the number {number[:40]} is out of range" in error.message


@pytest.mark.parametrize("name", ["NaN", "Infinity", "-Infinity"])
def test_a_non_number_is_named(name: str) -> None:
    assert f"{name} is not a JSON number" in refused(b'{"x":' + name.encode() + b"}").message


def test_the_duplicated_name_is_the_one_quoted() -> None:
    error = refused(b'{"model":"m","a":1,"b":2,"a":3}')
    assert "the name 'a' appears twice in one object" in error.message


def test_a_long_duplicated_name_is_quoted_up_to_40_characters() -> None:
    name = "n" * 60
    error = refused(f'{{"{name}":1,"{name}":2}}'.encode())
    assert f"the name {name[:40]!r} appears twice" in error.message


def test_too_many_containers_names_the_limit() -> None:
    error = refused(b'{"x":[' + b"[]," * MAX_JSON_CONTAINERS + b"[]]}")
    assert f"more than {MAX_JSON_CONTAINERS} JSON objects and arrays" in error.message


def test_malformed_json_names_the_problem_and_where() -> None:
    error = refused(b'{"model": "m",')
    assert error.message.endswith(
        "not valid JSON: Expecting property name enclosed in double quotes at 14."
    )


def test_a_too_long_model_name_names_the_limit() -> None:
    with pytest.raises(ApiError) as caught:
        prepare_body(CHAT, encoded({"model": "m" * (MAX_MODEL_NAME + 1)}))
    assert f"longer than {MAX_MODEL_NAME} characters" in caught.value.message


def test_a_refused_model_is_named() -> None:
    principal = Principal("phone", ALL_SCOPES, models=frozenset({"allowed"}))
    prepared = prepare_body(CHAT, encoded({"model": "allowed", "draft_model": "other"}))
    with pytest.raises(ApiError) as caught:
        check_models(prepared, principal)
    error = caught.value
    assert (error.status, error.code, error.param) == (403, "model_not_allowed", "draft_model")
    assert "'other'" in error.message


def test_a_non_finite_number_is_never_encoded_for_lm_studio() -> None:
    # The parser refuses NaN; should one still reach a payload, re-encoding must fail loudly
    # rather than send LM Studio a body that is not JSON.
    # (A length of 0 is replaced, so the body is encoded again, not added to.)
    prepared = prepare_body(CHAT, encoded({"model": "m", "temperature": 1.0, "max_tokens": 0}))
    prepared.payload["temperature"] = float("nan")
    with pytest.raises(ValueError, match="not JSON compliant"):
        apply_principal_rules(prepared, CHAT, max_tokens=10, want_usage=False)
