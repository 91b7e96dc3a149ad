"""Body rules reached only by unusual bodies: what Python's own parser gives up on, tools that
need no change, and a model named on a route that does not need one."""

from __future__ import annotations

import json

import pytest

from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.body_rules import MAX_JSON_DEPTH, parse_json_object, prepare_body
from tray_app.gateway.routes import FORWARDED_ROUTES, Route
from tray_app.identity.principal import SCOPE_CHAT

CHAT = next(r for r in FORWARDED_ROUTES if r.path == "/v1/chat/completions")
# No forwarded POST route goes without a model today; the rule for one that does is kept.
NO_MODEL_NEEDED = Route("/v1/future", "POST", SCOPE_CHAT, needs_model=False)


def refusal(raw: bytes, route: Route = CHAT) -> ApiError:
    with pytest.raises(ApiError) as caught:
        prepare_body(route, raw)
    assert caught.value.status == 400
    return caught.value


def test_nesting_the_parser_itself_cannot_follow_is_a_400_not_a_crash() -> None:
    # Deeper than the interpreter's recursion limit, yet few brackets: json's own parser gives
    # up (RecursionError) before the gateway's depth check ever sees a value.
    depth = 5_000
    with pytest.raises(ApiError) as caught:
        parse_json_object(b"[" * depth + b"]" * depth)
    assert caught.value.status == 400 and caught.value.code == "invalid_body"
    assert f"nested deeper than {MAX_JSON_DEPTH} levels" in caught.value.message


def test_local_tools_leave_the_body_byte_for_byte() -> None:
    raw = (
        b'{ "model" : "m",\n  "tools": [ {"type": "function", "function": {"name": "f"}} ],'
        b' "tool_choice": "auto" }'
    )
    prepared = prepare_body(CHAT, raw)
    assert prepared.raw == raw  # not re-encoded: LM Studio gets what was checked
    assert prepared.payload["tools"] == [{"type": "function", "function": {"name": "f"}}]
    assert prepared.payload["tool_choice"] == "auto"


def test_remote_tools_are_stripped_and_the_body_re_encoded() -> None:
    # The counterpart: the same body with one remote tool is changed, so it is re-encoded.
    tools = [{"type": "function", "function": {"name": "f"}}, {"type": "mcp", "server_url": "x"}]
    raw = json.dumps({"model": "m", "tools": tools}, indent=2).encode()
    prepared = prepare_body(CHAT, raw)
    assert prepared.raw != raw
    assert json.loads(prepared.raw)["tools"] == tools[:1]


@pytest.mark.parametrize("model", [3, ["m"], {"name": "m"}, True])
def test_a_model_on_a_route_without_one_must_still_be_a_string(model: object) -> None:
    error = refusal(json.dumps({"model": model, "input": "x"}).encode(), NO_MODEL_NEEDED)
    assert (error.code, error.param) == ("invalid_model", "model")


@pytest.mark.parametrize(("body", "model"), [({"input": "x"}, None), ({"model": "m"}, "m")])
def test_a_route_without_a_model_takes_none_or_a_name(
    body: dict[str, object], model: str | None
) -> None:
    assert prepare_body(NO_MODEL_NEEDED, json.dumps(body).encode()).model == model


def test_capping_a_body_already_within_the_cap_reports_no_change() -> None:
    # What was added and whether anything sent was replaced: the caller forwards the client's
    # bytes when nothing changed, and puts added members in front of them when only added.
    from tray_app.gateway import body_rules

    within = {"model": "m", "max_tokens": 10, "max_completion_tokens": 10, "n": 1}
    assert body_rules._cap_output(within, CHAT, 64) == ([], False)
    over = {"model": "m", "max_tokens": 100}
    assert body_rules._cap_output(over, CHAT, 64) == (["max_completion_tokens"], True)
    assert over == {"model": "m", "max_tokens": 64, "max_completion_tokens": 64}
    missing = {"model": "m"}
    assert body_rules._cap_output(missing, CHAT, 64) == (
        ["max_tokens", "max_completion_tokens"],
        False,
    )
