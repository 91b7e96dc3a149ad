"""Request body rules for forwarded POSTs.

The body is parsed once to validate it; it is re-encoded only when a rule changed it, so the
common request is forwarded byte for byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tray_app.api_errors import ApiError
from tray_app.routes import Route

MAX_MODEL_NAME = 256

# Fields a caller must never control through the gateway.
#  ttl: LM Studio's JIT auto-unload timer; a stranger could pin or evict models with it.
_DROPPED_FIELDS = ("ttl",)
#  MCP lets the model call out to arbitrary servers from the GPU owner's machine.
_MCP_FIELDS = ("mcp_servers", "integrations")


@dataclass(frozen=True, slots=True)
class PreparedBody:
    payload: dict[str, Any]
    raw: bytes  # what is sent upstream
    model: str | None
    stream: bool


def _invalid(message: str, *, param: str | None = None, code: str = "invalid_body") -> ApiError:
    return ApiError(400, message, type="invalid_request_error", code=code, param=param)


def _strip_mcp(payload: dict[str, Any]) -> bool:
    changed = False
    for field in _MCP_FIELDS:
        if field in payload:
            del payload[field]
            changed = True
    tools = payload.get("tools")
    if isinstance(tools, list):
        kept = [
            tool
            for tool in tools
            if not (isinstance(tool, dict) and str(tool.get("type", "")).lower().startswith("mcp"))
        ]
        if len(kept) != len(tools):
            changed = True
            if kept:
                payload["tools"] = kept
            else:
                # A tool_choice naming a removed tool would make the request invalid upstream.
                del payload["tools"]
                payload.pop("tool_choice", None)
    return changed


def parse_json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise _invalid("The request body is empty; send a JSON object.")
    try:
        # Decoded explicitly: json.loads(bytes) would also accept UTF-16/32, which LM Studio
        # and RFC 8259 do not.
        payload = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _invalid("The request body is not UTF-8 text; send a JSON object.") from None
    except json.JSONDecodeError as exc:
        raise _invalid(f"The request body is not valid JSON: {exc.msg} at {exc.pos}.") from None
    if not isinstance(payload, dict):
        kind = type(payload).__name__
        raise _invalid(f"The request body must be a JSON object, not a JSON {kind}.")
    return payload


def prepare_body(route: Route, raw: bytes) -> PreparedBody:
    """Validate and clean a POST body for ``route``; raises :class:`ApiError` (400)."""
    payload = parse_json_object(raw)
    changed = False
    for field in _DROPPED_FIELDS:
        if field in payload:
            del payload[field]
            changed = True
    if route.strips_mcp_tools and _strip_mcp(payload):
        changed = True

    model = payload.get("model")
    if route.needs_model:
        if model is None:
            raise _invalid(
                "You must provide a model parameter.", param="model", code="missing_model"
            )
        if not isinstance(model, str) or not model.strip():
            raise _invalid(
                "The model parameter must be a non-empty string.",
                param="model",
                code="invalid_model",
            )
        if len(model) > MAX_MODEL_NAME:
            raise _invalid(
                f"The model parameter is longer than {MAX_MODEL_NAME} characters.",
                param="model",
                code="invalid_model",
            )
    elif model is not None and not isinstance(model, str):
        raise _invalid("The model parameter must be a string.", param="model", code="invalid_model")

    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid(
            "The stream parameter must be true or false.", param="stream", code="invalid_stream"
        )

    body = (
        json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() if changed else raw
    )
    return PreparedBody(payload=payload, raw=body, model=model, stream=stream)


# Endpoints whose streams accept stream_options.include_usage (OpenAI chat and completions).
USAGE_OPTION_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
# The output-length field of each endpoint, for a token's max_tokens cap.
_LENGTH_FIELDS = {
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
    "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",),
    "/v1/messages": ("max_tokens",),
}


# Put first in a body that has no stream_options member: "{" + this + the rest of the object.
_USAGE_MEMBER = b'{"stream_options":{"include_usage":true},'


@dataclass(frozen=True, slots=True)
class Adjusted:
    body: PreparedBody
    hide_usage: bool  # the client did not ask for the usage chunk we asked LM Studio for


def apply_principal_rules(
    prepared: PreparedBody, route: Route, *, max_tokens: int | None, want_usage: bool
) -> Adjusted:
    """Cap output length for a capped token; ask for usage on streams so it can be counted."""
    payload = prepared.payload
    changed = False
    if max_tokens is not None:
        fields = _LENGTH_FIELDS.get(route.path, ())
        present = [f for f in fields if f in payload]
        for name in present or fields[:1]:
            current = payload.get(name)
            if not isinstance(current, int) or isinstance(current, bool) or current > max_tokens:
                payload[name] = max_tokens
                changed = True
    hide_usage = False
    splice = False
    if want_usage and prepared.stream and route.path in USAGE_OPTION_ROUTES:
        options = payload.get("stream_options")
        # The common case: no stream_options at all, so the client's bytes can be kept.
        splice = options is None and bool(payload)
        if not isinstance(options, dict):
            options = {}
        if options.get("include_usage") is not True:
            payload["stream_options"] = {**options, "include_usage": True}
            hide_usage = True
    if not changed and not hide_usage:
        return Adjusted(prepared, hide_usage=False)
    if not changed and splice:
        raw = _USAGE_MEMBER + prepared.raw.lstrip()[1:]
    else:
        raw = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return Adjusted(
        PreparedBody(payload=payload, raw=raw, model=prepared.model, stream=prepared.stream),
        hide_usage=hide_usage,
    )
