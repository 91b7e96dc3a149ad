"""Request body rules: one set for every forwarded POST, whatever the endpoint.

The body is parsed once to validate it; it is re-encoded only when a rule changed it, so the
common request is forwarded byte for byte.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from tray_app.gateway import api_errors as errors
from tray_app.gateway.routes import Route
from tray_app.identity.access import refused_model
from tray_app.identity.principal import Principal

MAX_MODEL_NAME = 256
# Nesting beyond this is refused before anything walks the body; the deepest legitimate
# bodies (tool JSON schemas inside messages) stay far below it, and Python's own parser
# gives up (RecursionError) somewhere near 1,000.
MAX_JSON_DEPTH = 100
# Longer integer literals are refused: nothing in an inference request needs one (a uint64
# has 20 digits), and parsing them costs time quadratic in their length unless the
# interpreter's own 4,300-digit guard is on, which an environment variable can switch off.
MAX_INT_DIGITS = 100
# Objects and arrays in one body, counted as brackets in the raw text (an upper bound: a
# bracket inside a string counts too). Parsing and checking cost grows with their number; a
# long chat with tools has a few hundred, and a 32 MiB body of "{}," would have eleven million.
MAX_JSON_CONTAINERS = 50_000

# Top-level fields a caller must never control through the gateway, compared with case,
# '_' and '-' folded away, because we cannot know which spellings LM Studio also accepts:
#  ttl: LM Studio's JIT auto-unload timer; a stranger could pin or evict models with it.
#  mcp_servers, integrations, ephemeral_mcp, plugin(s): make LM Studio call MCP servers or
#   run installed plugins from the GPU owner's machine (its native chat API has them; should
#   its OpenAI-compatible endpoints ever read them, they must not arrive).
#  context_length: a model load setting in LM Studio's native API; honoured, it reloads the
#   model for everyone.
_DROPPED_FIELDS = frozenset(
    {"ttl", "mcpservers", "integrations", "ephemeralmcp", "plugin", "plugins", "contextlength"}
)
# The speculative-decoding model: loaded like ``model``, so the same allowlist applies. Only
# this exact spelling is checked and forwarded; others are dropped.
DRAFT_MODEL = "draft_model"
# A tool carrying one of these (folded like the fields above) points at a remote server.
_REMOTE_TOOL_KEYS = frozenset({"serverurl", "connectorid", "serverlabel", "mcpservername", "url"})


@dataclass(frozen=True, slots=True)
class PreparedBody:
    payload: dict[str, Any]
    raw: bytes  # what is sent upstream
    model: str | None
    stream: bool
    draft_model: str | None = None


# ---- parsing ------------------------------------------------------------------------------


class _Refused(Exception):
    """A JSON value the parser would accept but the gateway must not (raised in its hooks)."""


def _parse_int(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_INT_DIGITS:
        raise _Refused(f"an integer longer than {MAX_INT_DIGITS} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999: finite to JSON, infinite to every float parser
        raise _Refused(f"the number {text[:40]} is out of range")
    return value


def _parse_constant(name: str) -> float:
    # NaN and Infinity are not JSON (RFC 8259); LM Studio would choke or misread them.
    raise _Refused(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A duplicated name is read differently by different parsers (first wins or last wins):
    # the gateway's checks and LM Studio must see the same body.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _Refused(f"the name {name[:40]!r} appears twice in one object")
            seen.add(name)
    return obj


_DECODER = json.JSONDecoder(
    parse_int=_parse_int,
    parse_float=_parse_float,
    parse_constant=_parse_constant,
    object_pairs_hook=_unique_keys,
)
# A \uD800-\uDFFF escape that is not half of a pair (a cheap test on the raw bytes; a false
# alarm from an escaped backslash is settled by looking at the parsed strings).
_LONE_SURROGATE_ESCAPE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)
_SURROGATE = re.compile("[\ud800-\udfff]")


Container = dict[str, Any] | list[Any]
_JSON_KINDS: dict[type, str] = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def _containers(payload: dict[str, Any]) -> list[Container]:
    """Every object and array in ``payload``; raises once nesting passes
    :data:`MAX_JSON_DEPTH` (the body itself is level 1)."""
    found: list[Container] = []
    pending: list[tuple[Container, int]] = [(payload, 1)]
    while pending:
        node, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise _Refused(f"it is nested deeper than {MAX_JSON_DEPTH} levels")
        found.append(node)
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (dict, list)):
                pending.append((child, depth + 1))
    return found


def _has_lone_surrogate(containers: list[Container]) -> bool:
    for node in containers:
        texts = [*node, *node.values()] if isinstance(node, dict) else node
        if any(isinstance(t, str) and _SURROGATE.search(t) for t in texts):
            return True
    return False


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or :class:`ApiError` 400 ``invalid_body``.

    Refused as well as malformed JSON: nesting deeper than :data:`MAX_JSON_DEPTH`, integers
    longer than :data:`MAX_INT_DIGITS`, numbers beyond a float's range, NaN and Infinity,
    duplicated names and unpaired UTF-16 surrogates. Each would otherwise crash the gateway
    (the parser, the re-encoding, the database) or reach LM Studio as something other than
    what the gateway checked.
    """
    if not raw.strip():
        raise errors.body_empty()
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_CONTAINERS:
        raise errors.body_too_many_containers(MAX_JSON_CONTAINERS)
    try:
        # Decoded explicitly: json.loads(bytes) would also accept UTF-16/32, which LM Studio
        # and RFC 8259 do not.
        payload = _DECODER.decode(raw.decode("utf-8"))
        if isinstance(payload, dict):
            _refuse_odd_structure(raw, payload)
    except UnicodeDecodeError:
        raise errors.body_not_utf8() from None
    except json.JSONDecodeError as exc:
        raise errors.body_not_json(exc.msg, exc.pos) from None
    except RecursionError:
        raise errors.body_too_deep(MAX_JSON_DEPTH) from None
    except _Refused as exc:
        raise errors.body_refused(str(exc)) from None
    if not isinstance(payload, dict):
        # JSON's words, not Python's: a client never sent a "list" or a "NoneType".
        raise errors.body_not_object(_JSON_KINDS[type(payload)])
    return payload


def _refuse_odd_structure(raw: bytes, payload: dict[str, Any]) -> None:
    # Nesting is at most the number of brackets, and a lone surrogate needs a \u escape:
    # the common body is settled by two byte counts and one search, with no walk at all.
    containers = None
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:
        containers = _containers(payload)
    if (
        b"\\u" in raw
        and _LONE_SURROGATE_ESCAPE.search(raw)
        and _has_lone_surrogate(containers or _containers(payload))
    ):
        raise _Refused("a string holds an unpaired UTF-16 surrogate")


# ---- fields that load models or call out ---------------------------------------------------


def _fold(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def _is_remote_tool(tool: dict[str, Any]) -> bool:
    kind = tool.get("type", "")
    if isinstance(kind, str) and "mcp" in unicodedata.normalize("NFKC", kind).strip().casefold():
        return True
    return any(_fold(k) in _REMOTE_TOOL_KEYS for k in tool)


def _strip_remote_tools(payload: dict[str, Any]) -> bool:
    if "tools" not in payload:
        # A tool_choice alone can still name a remote server (a Responses-style MCP choice).
        choice = payload.get("tool_choice")
        if isinstance(choice, dict) and _names_remote_tool(choice):
            del payload["tool_choice"]
            return True
        return False
    tools = payload["tools"]
    if not isinstance(tools, list):
        raise errors.tools_not_a_list()
    for tool in tools:
        if not isinstance(tool, dict) or not isinstance(tool.get("type", ""), str):
            raise errors.tool_malformed()
    kept = [tool for tool in tools if not _is_remote_tool(tool)]
    if len(kept) == len(tools):
        return False
    choice = payload.get("tool_choice")
    if kept:
        payload["tools"] = kept
        if isinstance(choice, dict) and _names_remote_tool(choice):
            del payload["tool_choice"]
    else:
        # A tool_choice naming a removed tool would make the request invalid upstream.
        del payload["tools"]
        payload.pop("tool_choice", None)
    return True


def _names_remote_tool(choice: dict[str, Any]) -> bool:
    listed = choice.get("tools")
    return _is_remote_tool(choice) or (
        isinstance(listed, list) and any(isinstance(t, dict) and _is_remote_tool(t) for t in listed)
    )


def _drop_fields(payload: dict[str, Any]) -> bool:
    doomed = [
        name
        for name in payload
        if (folded := _fold(name)) in _DROPPED_FIELDS
        or (folded == "draftmodel" and name != DRAFT_MODEL)
    ]
    for name in doomed:
        del payload[name]
    return bool(doomed)


def _model_name(payload: dict[str, Any], param: str) -> str:
    value = payload[param]
    if not isinstance(value, str) or not value.strip():
        raise errors.model_name_empty(param)
    if len(value) > MAX_MODEL_NAME:
        raise errors.model_name_too_long(param, MAX_MODEL_NAME)
    return value


def check_models(prepared: PreparedBody, principal: Principal) -> None:
    """Asks the access policy about every model the request names (the model, and the draft
    model for speculative decoding, which LM Studio loads too); raises 403
    ``model_not_allowed`` naming the offending parameter."""
    refused = refused_model(principal, {"model": prepared.model, DRAFT_MODEL: prepared.draft_model})
    if refused is not None:
        param, name = refused
        raise errors.model_not_allowed(name, param)


def prepare_body(route: Route, raw: bytes) -> PreparedBody:
    """Validate and clean a POST body for ``route``; raises :class:`ApiError` (400)."""
    payload = parse_json_object(raw)
    changed = _drop_fields(payload)
    if _strip_remote_tools(payload):
        changed = True

    model = payload.get("model")
    if route.needs_model:
        if model is None:
            raise errors.model_missing()
        model = _model_name(payload, "model")
    elif model is not None and not isinstance(model, str):
        raise errors.model_not_a_string()
    draft_model = _model_name(payload, DRAFT_MODEL) if DRAFT_MODEL in payload else None

    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise errors.stream_not_a_boolean()

    body = _encode(payload) if changed else raw
    return PreparedBody(
        payload=payload, raw=body, model=model, stream=stream, draft_model=draft_model
    )


def _encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


# ---- the caller's own limits -----------------------------------------------------------------

# Endpoints whose streams accept stream_options.include_usage (OpenAI chat and completions).
USAGE_OPTION_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
# The output-length fields of each endpoint, for a token's max_tokens cap. Chat has two
# (the older name and OpenAI's newer one) and LM Studio honours either, so both are capped.
# Fields that ask for several generations in one request.
CHOICE_FIELDS = ("n", "best_of")
LENGTH_FIELDS = {
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
    "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",),
    "/v1/messages": ("max_tokens",),
}


_ALL_LENGTH_FIELDS = frozenset(f for fields in LENGTH_FIELDS.values() for f in fields)


# Put first in a body that has no stream_options member.
_USAGE_MEMBER = b'"stream_options":{"include_usage":true}'


@dataclass(frozen=True, slots=True)
class Adjusted:
    body: PreparedBody
    hide_usage: bool  # the client did not ask for the usage chunk we asked LM Studio for


def _within(value: object, cap: int) -> bool:
    # type() rather than isinstance(): True is an int to Python, not a length to anyone.
    return type(value) is int and 0 < value <= cap


def _cap_output(payload: dict[str, Any], route: Route, cap: int) -> tuple[list[str], bool]:
    """Every length field of the route ends up a positive integer <= ``cap``. LM Studio reads
    0, -1 and other non-lengths as "no limit", so anything else is replaced, and a missing
    field is added: by the client's own smaller limit from a sibling field if it gave one,
    else by the cap. Returns the fields added (absent before) and whether any member the
    client sent was replaced: added ones alone can go in front of the client's own bytes."""
    fields = LENGTH_FIELDS.get(route.path, ())
    valid = [payload[f] for f in fields if _within(payload.get(f), cap)]
    limit: int = min(valid, default=cap)
    added: list[str] = []
    replaced = False
    for name in fields:
        if not _within(payload.get(name), cap):
            if name in payload:
                replaced = True
            else:
                added.append(name)
            payload[name] = limit
    # Another route's length field, should LM Studio read it here too: capped where present.
    for name in _ALL_LENGTH_FIELDS.difference(fields):
        if name in payload and not _within(payload[name], cap):
            payload[name] = limit
            replaced = True
    # The cap bounds what one request may generate: n choices (or best_of candidates) of
    # `cap` tokens each would multiply it.
    for name in CHOICE_FIELDS:
        if name in payload and payload[name] != 1:
            payload[name] = 1
            replaced = True
    return added, replaced


def apply_principal_rules(
    prepared: PreparedBody, route: Route, *, max_tokens: int | None, want_usage: bool
) -> Adjusted:
    """Cap output length for a capped token; ask for usage on streams so it can be counted."""
    payload = prepared.payload
    # Members only added (the common case: a budget's cap on a body that named no length, a
    # stream not asking for usage) go in front of the client's own bytes, which are kept:
    # encoding the whole body again costs more than the rest of the gate. Only into an object
    # that has members already ("{" + added + "," + the rest), and never a name the body has:
    # a second member of the same name would be read instead of it.
    has_members = bool(payload)
    added, replaced = ([], False) if max_tokens is None else _cap_output(payload, route, max_tokens)
    members = [b'"%s":%d' % (name.encode(), payload[name]) for name in added]
    hide_usage = False
    if want_usage and prepared.stream and route.path in USAGE_OPTION_ROUTES:
        options = payload.get("stream_options")
        if not isinstance(options, dict):
            options = {}
        if options.get("include_usage") is not True:
            if "stream_options" in payload:
                replaced = True
            else:
                members.append(_USAGE_MEMBER)
            payload["stream_options"] = {**options, "include_usage": True}
            hide_usage = True
    if not members and not replaced:
        return Adjusted(prepared, hide_usage=False)
    if replaced or not has_members:
        raw = _encode(payload)
    else:
        raw = b"{" + b",".join(members) + b"," + prepared.raw.lstrip()[1:]
    return Adjusted(
        PreparedBody(
            payload=payload,
            raw=raw,
            model=prepared.model,
            stream=prepared.stream,
            draft_model=prepared.draft_model,
        ),
        hide_usage=hide_usage,
    )
