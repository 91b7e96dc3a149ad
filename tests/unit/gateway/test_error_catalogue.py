"""The error contract: every entry of the catalogue with its status, type, code, param, extra
headers and message, and the three wire forms (a JSON answer, an SSE event, raw socket bytes).

A client (an OpenAI SDK, the phone page, a script) reads these fields; changing one is a
breaking change and must show up here. The table is checked to list every entry there is."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tray_app.errors import AuthError, LMGateError
from tray_app.gateway import api_errors
from tray_app.gateway.api_errors import ApiError
from tray_app.identity.pairing import PairingError

BAD = "invalid_request_error"
CLOSE = {"Connection": "close"}
FORWARDED = "GET /v1/models, POST /v1/chat/completions"


@dataclass(frozen=True)
class Entry:
    factory: Callable[..., ApiError]
    args: tuple[Any, ...]
    status: int
    type: str
    code: str
    param: str | None
    message: str
    headers: dict[str, str]


def entry(
    factory: Callable[..., ApiError],
    args: tuple[Any, ...],
    status: int,
    type: str,
    code: str,
    param: str | None,
    message: str,
    **headers: str,
) -> Entry:
    return Entry(
        factory,
        args,
        status,
        type,
        code,
        param,
        message,
        {k.replace("_", "-"): v for k, v in headers.items()},
    )


E = api_errors
CATALOGUE = [
    # the connection and the request head
    entry(
        E.too_many_connections,
        (True, 5),
        503,
        "server_error",
        "too_many_connections",
        None,
        "Too many open connections from your address; close some and retry.",
        Retry_After="5",
    ),
    entry(
        E.header_timeout,
        (),
        408,
        BAD,
        "header_timeout",
        None,
        "The request head did not arrive in time (server.header_timeout).",
    ),
    entry(
        E.headers_too_large,
        (),
        431,
        BAD,
        "headers_too_large",
        None,
        "The request line or a header field is too long, or there are too many headers.",
    ),
    entry(E.bad_http, (), 400, BAD, "bad_request", None, "The request is not valid HTTP/1.1."),
    entry(
        E.unparsed_internal_error,
        (),
        500,
        "server_error",
        "internal_error",
        None,
        "LM Gate hit an internal error; details are in its log.",
    ),
    entry(
        E.internal_error,
        ("req-1",),
        500,
        "server_error",
        "internal_error",
        None,
        "LM Gate hit an internal error (request req-1); details are in its log.",
    ),
    entry(
        E.shutting_down,
        (),
        503,
        "server_error",
        "shutting_down",
        None,
        "LM Gate is shutting down; try again in a moment.",
    ),
    # what every request is checked for first
    entry(
        E.upgrade_not_allowed,
        (),
        404,
        BAD,
        "upgrade_not_allowed",
        None,
        "WebSocket and other protocol upgrades are not available through LM Gate.",
    ),
    entry(
        E.body_compressed,
        ("gzip",),
        415,
        BAD,
        "unsupported_content_encoding",
        None,
        "Request bodies must not be compressed (Content-Encoding: gzip); send plain JSON.",
        **CLOSE,
    ),
    entry(
        E.expectation_failed,
        (),
        417,
        BAD,
        "expectation_failed",
        None,
        "LM Gate understands only 'Expect: 100-continue'.",
    ),
    entry(
        E.host_not_allowed,
        (),
        421,
        BAD,
        "host_not_allowed",
        None,
        "This request is addressed to a host name LM Gate does not serve; if it should, add "
        "the name to server.allowed_hosts.",
    ),
    entry(
        E.origin_not_allowed,
        (),
        403,
        "permission_error",
        "origin_not_allowed",
        None,
        "This web origin may not call LM Gate; add it to cors.allowed_origins if it should.",
    ),
    # routing
    entry(
        E.path_not_allowed,
        (),
        404,
        BAD,
        "path_not_allowed",
        None,
        "This path is not allowed by LM Gate.",
    ),
    entry(
        E.native_api_refused,
        (FORWARDED,),
        404,
        BAD,
        "path_not_allowed",
        None,
        "LM Studio's native /api endpoints (model download, load, unload) are never exposed "
        f"by LM Gate. Forwarded: {FORWARDED}.",
    ),
    entry(
        E.route_disabled,
        ("/v1/responses", "routes.enable_responses"),
        404,
        BAD,
        "route_disabled",
        None,
        "/v1/responses is turned off in LM Gate; enable it with the setting "
        "routes.enable_responses or the flag --enable-responses.",
    ),
    entry(
        E.unknown_path,
        ("/x" * 60, FORWARDED),
        404,
        BAD,
        "unknown_path",
        None,
        f"Unknown path {'/x' * 50}. LM Gate forwards only: {FORWARDED}.",
    ),
    entry(E.no_such_endpoint, (), 404, BAD, "unknown_path", None, "No such endpoint."),
    entry(
        E.method_not_allowed,
        ("PUT", "/api/conversations/{id}", "GET, DELETE"),
        405,
        BAD,
        "method_not_allowed",
        None,
        "Method PUT is not allowed on /api/conversations/{id}; use GET, DELETE.",
        Allow="GET, DELETE",
    ),
    # who calls
    entry(
        E.not_authenticated,
        (AuthError("Invalid API key.", code="invalid_api_key"),),
        401,
        "authentication_error",
        "invalid_api_key",
        None,
        "Invalid API key.",
        WWW_Authenticate='Bearer realm="lmgate"',
    ),
    entry(
        E.pairing_refused,
        (PairingError("This pairing code has expired.", "pairing_code_expired"),),
        401,
        "authentication_error",
        "pairing_code_expired",
        None,
        "This pairing code has expired.",
    ),
    entry(
        E.credential_revoked,
        (),
        401,
        "authentication_error",
        "credential_revoked",
        None,
        "The credential this request was made with has been revoked.",
    ),
    entry(
        E.missing_scope,
        ("/v1/embeddings", "embeddings"),
        403,
        "permission_error",
        "insufficient_scope",
        None,
        "This key may not use /v1/embeddings (it lacks the 'embeddings' scope).",
    ),
    entry(
        E.conversations_need_chat_scope,
        (),
        403,
        "permission_error",
        "insufficient_scope",
        None,
        "Conversations need a key with the 'chat' scope.",
    ),
    entry(
        E.metrics_need_metrics_scope,
        (),
        403,
        "permission_error",
        "insufficient_scope",
        None,
        "Metrics need a key with the 'metrics' scope.",
    ),
    entry(
        E.model_not_allowed,
        ("big-model", "draft_model"),
        403,
        "permission_error",
        "model_not_allowed",
        "draft_model",
        "This key may not use the model 'big-model'.",
    ),
    entry(
        E.model_not_found,
        ("qwen/hidden",),
        404,
        BAD,
        "model_not_found",
        "model",
        "The model 'qwen/hidden' does not exist or you do not have access to it.",
    ),
    entry(
        E.count_tokens_messages_invalid,
        (),
        400,
        BAD,
        "invalid_messages",
        "messages",
        "The messages parameter must be a list of messages.",
    ),
    # throttles and limits
    entry(
        E.too_many_auth_failures,
        (2.2,),
        429,
        "rate_limit_error",
        "too_many_auth_failures",
        None,
        "Too many failed authentication attempts from your address; wait and try again with "
        "a valid key.",
        Retry_After="3",
    ),
    entry(
        E.too_many_pairing_attempts,
        (0.1,),
        429,
        "rate_limit_error",
        "too_many_pairing_attempts",
        None,
        "Too many wrong pairing codes from your address; wait a minute and scan a fresh QR code.",
        Retry_After="1",
    ),
    entry(
        E.rate_limit_exceeded,
        (10.0,),
        429,
        "rate_limit_error",
        "rate_limit_exceeded",
        None,
        "Rate limit reached (limits.requests_per_minute); slow down.",
        Retry_After="10",
    ),
    entry(
        E.too_many_concurrent_requests,
        (4,),
        429,
        "rate_limit_error",
        "too_many_concurrent_requests",
        None,
        "Too many requests at once: at most 4 (limits.concurrent_requests). Wait for one to "
        "finish.",
        Retry_After="1",
    ),
    entry(
        E.state_unavailable,
        (1.0,),
        503,
        "server_error",
        "state_unavailable",
        None,
        "LM Gate cannot read its database, so it cannot check credentials; nothing was "
        "forwarded. Try again shortly.",
        Retry_After="1",
    ),
    entry(
        E.shared_limits_unavailable,
        (0.4,),
        503,
        "server_error",
        "shared_limits_unavailable",
        None,
        "LM Gate cannot reach the store its replicas share their limits in (Redis), so it "
        "cannot check this request's limits; try again shortly "
        "(state.when_redis_is_down = closed).",
        Retry_After="1",
    ),
    # sharing one GPU: budgets, the queue, the model guard
    entry(
        E.budget_exceeded,
        ("day", 50000, 0, 120, "2026-12-02 00:00 UTC", 3600.0),
        429,
        "rate_limit_error",
        "budget_exceeded",
        None,
        "Your token budget for this day (50,000 tokens) is used up; it resets at 2026-12-02 "
        "00:00 UTC. Ask the owner for a larger budget.",
        Retry_After="3600",
    ),
    entry(
        E.queue_full,
        (True, 2.0),
        429,
        "rate_limit_error",
        "queue_full",
        None,
        "Too many requests from your address are already waiting for their turn "
        "(queue.max_waiting_per_client); wait for some to finish.",
        Retry_After="2",
    ),
    entry(
        E.queue_full_for_caller,
        (3.0,),
        429,
        "rate_limit_error",
        "queue_full",
        None,
        "Too many of your requests are already waiting for their turn "
        "(queue.max_waiting_per_caller); wait for some to finish.",
        Retry_After="3",
    ),
    entry(
        E.queue_wait_timeout,
        (60.0, 5.0),
        503,
        "server_error",
        "queue_timeout",
        None,
        "LM Studio stayed busy: waited 60 s for a turn (queue.max_wait, or queue.max_stream_wait "
        "for a stream); retry later.",
        Retry_After="5",
    ),
    entry(
        E.model_switch_refused,
        ("llama-3.2-1b-instruct", 10.0),
        503,
        "server_error",
        "model_busy",
        None,
        "'llama-3.2-1b-instruct' is not loaded, and loading it now would cut off answers others "
        "are receiving from another model (models.switch = refuse); retry when they finish.",
        Retry_After="10",
    ),
    entry(
        E.draft_model_not_loaded,
        ("qwen-0.5b-draft", 10.0),
        503,
        "server_error",
        "model_busy",
        "draft_model",
        "The draft model 'qwen-0.5b-draft' is not loaded, and loading it beside the model could "
        "cut off answers others are receiving; ask the owner to warm it up (lmgate warm-up), or "
        "leave draft_model out.",
        Retry_After="10",
    ),
    entry(
        E.model_switch_timeout,
        ("llama-3.2-1b-instruct", 600.0, 10.0),
        503,
        "server_error",
        "model_busy",
        None,
        "'llama-3.2-1b-instruct' is not loaded, and others kept receiving answers from another "
        "model for 600 s; retry later.",
        Retry_After="10",
    ),
    entry(
        E.model_load_failed,
        ("llama-3.2-1b-instruct", "not enough memory"),
        502,
        "upstream_error",
        "model_load_failed",
        None,
        "LM Studio could not load 'llama-3.2-1b-instruct': not enough memory",
    ),
    entry(
        E.model_load_timeout,
        ("llama-3.2-1b-instruct", 300.0),
        504,
        "upstream_error",
        "model_load_timeout",
        None,
        "LM Studio did not finish loading 'llama-3.2-1b-instruct' within 300 s "
        "(models.load_timeout).",
    ),
    # reading the body
    entry(
        E.body_too_large,
        (4096, "limits.max_body_bytes"),
        413,
        BAD,
        "body_too_large",
        None,
        "The request body is larger than 4096 bytes (limits.max_body_bytes).",
    ),
    entry(
        E.body_broken,
        (),
        400,
        BAD,
        "invalid_body",
        None,
        "The request body could not be read (its framing is broken).",
        **CLOSE,
    ),
    entry(
        E.body_too_slow,
        (2.5,),
        408,
        BAD,
        "body_timeout",
        None,
        "The request body did not arrive within 2.5 s (server.body_timeout).",
        **CLOSE,
    ),
    # the body as JSON
    entry(
        E.body_empty,
        (),
        400,
        BAD,
        "invalid_body",
        None,
        "The request body is empty; send a JSON object.",
    ),
    entry(
        E.body_too_many_containers,
        (50_000,),
        400,
        BAD,
        "invalid_body",
        None,
        "The request body has more than 50000 JSON objects and arrays.",
    ),
    entry(
        E.body_not_utf8,
        (),
        400,
        BAD,
        "invalid_body",
        None,
        "The request body is not UTF-8 text; send a JSON object.",
    ),
    entry(
        E.body_not_json,
        ("Expecting value", 7),
        400,
        BAD,
        "invalid_body",
        None,
        "The request body is not valid JSON: Expecting value at 7.",
    ),
    entry(
        E.body_too_deep,
        (100,),
        400,
        BAD,
        "invalid_body",
        None,
        "The request body is nested deeper than 100 levels.",
    ),
    entry(
        E.body_refused,
        ("a name appears twice",),
        400,
        BAD,
        "invalid_body",
        None,
        "The request body is refused: a name appears twice.",
    ),
    entry(
        E.body_not_object,
        ("array",),
        400,
        BAD,
        "invalid_body",
        None,
        "The request body must be a JSON object, not a JSON array.",
    ),
    entry(
        E.tools_not_a_list,
        (),
        400,
        BAD,
        "invalid_body",
        "tools",
        "The tools parameter must be a list of tools.",
    ),
    entry(
        E.tool_malformed,
        (),
        400,
        BAD,
        "invalid_body",
        "tools",
        "Each tool must be a JSON object whose type is a string.",
    ),
    entry(
        E.model_missing,
        (),
        400,
        BAD,
        "missing_model",
        "model",
        "You must provide a model parameter.",
    ),
    entry(
        E.model_name_empty,
        ("draft_model",),
        400,
        BAD,
        "invalid_model",
        "draft_model",
        "The draft_model parameter must be a non-empty string.",
    ),
    entry(
        E.model_name_too_long,
        ("model", 256),
        400,
        BAD,
        "invalid_model",
        "model",
        "The model parameter is longer than 256 characters.",
    ),
    entry(
        E.model_not_a_string,
        (),
        400,
        BAD,
        "invalid_model",
        "model",
        "The model parameter must be a string.",
    ),
    entry(
        E.stream_not_a_boolean,
        (),
        400,
        BAD,
        "invalid_stream",
        "stream",
        "The stream parameter must be true or false.",
    ),
    entry(
        E.pairing_body_invalid,
        (),
        400,
        BAD,
        "invalid_body",
        "code",
        'Send {"code": "<pairing code>", "device_name": "..."}.',
    ),
    # the conversation API
    entry(
        E.chat_message_missing,
        (),
        400,
        BAD,
        "invalid_body",
        "message",
        'Send a non-empty "message".',
    ),
    entry(
        E.chat_message_too_long,
        (100_000,),
        400,
        BAD,
        "invalid_body",
        "message",
        "The message is longer than 100000 characters.",
    ),
    entry(
        E.chat_stream_not_a_boolean,
        (),
        400,
        BAD,
        "invalid_body",
        "stream",
        '"stream" must be true or false.',
    ),
    entry(
        E.chat_conversation_id_not_a_string,
        (),
        400,
        BAD,
        "invalid_body",
        "conversation_id",
        '"conversation_id" must be a string.',
    ),
    entry(
        E.chat_retry_not_a_boolean,
        (),
        400,
        BAD,
        "invalid_body",
        "retry",
        '"retry" must be true or false.',
    ),
    entry(
        E.chat_edit_not_a_boolean,
        (),
        400,
        BAD,
        "invalid_body",
        "edit",
        '"edit" must be true or false.',
    ),
    entry(
        E.chat_system_not_a_string,
        (),
        400,
        BAD,
        "invalid_body",
        "system",
        '"system" must be a string ("" for none).',
    ),
    entry(
        E.chat_system_too_long,
        (10_000,),
        400,
        BAD,
        "invalid_body",
        "system",
        "The system prompt is longer than 10000 characters.",
    ),
    entry(
        E.chat_image_not_a_string,
        (),
        400,
        BAD,
        "invalid_body",
        "image",
        '"image" must be a data URL string (data:image/jpeg;base64,...).',
    ),
    entry(
        E.chat_image_not_a_data_url,
        (),
        400,
        BAD,
        "invalid_image",
        "image",
        '"image" must be a base64 data URL: data:image/jpeg;base64,... (or image/png, image/webp).',
    ),
    entry(
        E.chat_image_type_not_allowed,
        (),
        400,
        BAD,
        "image_type_not_allowed",
        "image",
        "Only JPEG, PNG and WebP photos are accepted (image/jpeg, image/png, image/webp).",
    ),
    entry(
        E.chat_image_base64_invalid,
        (),
        400,
        BAD,
        "invalid_image",
        "image",
        "The photo's base64 data is not valid.",
    ),
    entry(
        E.chat_image_not_its_type,
        (),
        400,
        BAD,
        "invalid_image",
        "image",
        "The photo's data is not the image type its data URL names.",
    ),
    entry(
        E.chat_image_too_large,
        (8_388_608,),
        400,
        BAD,
        "image_too_large",
        "image",
        "The photo is larger than 8388608 bytes; send it smaller.",
    ),
    entry(
        E.chat_too_many_images,
        (10,),
        400,
        BAD,
        "too_many_images",
        "image",
        "This conversation already holds 10 photos, as many as it may; "
        "start a new conversation to send another.",
    ),
    entry(
        E.chat_model_invalid,
        (),
        400,
        BAD,
        "invalid_body",
        "model",
        '"model" must be a model name.',
    ),
    entry(
        E.no_default_model,
        (),
        400,
        BAD,
        "missing_model",
        "model",
        "No model given, and LM Studio offers none this key may use; send a model.",
    ),
    entry(
        E.conversation_not_found,
        (),
        404,
        BAD,
        "conversation_not_found",
        None,
        "No such conversation.",
    ),
    # LM Studio
    entry(
        E.upstream_unreachable,
        (),
        502,
        "upstream_error",
        "upstream_unreachable",
        None,
        "LM Studio is not reachable. Start its server (LM Studio → Developer → Start Server, "
        "or `lms server start`) and check that LM Gate's upstream.url matches (LM Gate's log "
        "names the address it tried).",
    ),
    entry(
        E.upstream_unreachable_at,
        ("http://127.0.0.1:1234",),
        502,
        "upstream_error",
        "upstream_unreachable",
        None,
        "LM Studio is not reachable at http://127.0.0.1:1234. Start its server (LM Studio → "
        "Developer → Start Server, or `lms server start`) and check that LM Gate's "
        "upstream.url matches.",
    ),
    entry(
        E.no_upstream_enabled,
        (),
        503,
        "upstream_error",
        "upstream_disabled",
        None,
        "LM Gate's owner has switched off every model server it sends requests to; tell the owner.",
    ),
    entry(
        E.no_upstream,
        ("qwen2.5-7b-instruct",),
        503,
        "upstream_error",
        "upstream_unreachable",
        None,
        "None of LM Gate's model servers that serve 'qwen2.5-7b-instruct' is reachable now; "
        "retry in a minute, or tell the owner.",
        Retry_After="60",
    ),
    entry(
        E.upstream_timeout,
        (300.0,),
        504,
        "upstream_error",
        "upstream_timeout",
        None,
        "LM Studio did not answer within 300 s (upstream.idle_timeout). A large prompt may "
        "need a longer idle timeout.",
    ),
    entry(
        E.upstream_failed,
        ("it closed the connection without answering",),
        502,
        "upstream_error",
        "upstream_failed",
        None,
        "The connection to LM Studio failed: it closed the connection without answering. Check "
        "that LM Studio's "
        "server is running and healthy.",
    ),
    entry(
        E.upstream_auth_failed,
        (401,),
        502,
        "upstream_error",
        "upstream_auth_failed",
        None,
        "LM Studio refused LM Gate's request (401): it requires authentication. Create an API "
        "token in LM Studio's server settings and give it to LM Gate as the LM Studio token.",
    ),
    entry(
        E.upstream_redirect,
        (302,),
        502,
        "upstream_error",
        "upstream_bad_response",
        None,
        "LM Studio answered with a redirect (302); LM Gate does not follow redirects. Check "
        "that upstream.url points at LM Studio's server.",
    ),
    entry(
        E.upstream_status,
        (503, ""),
        503,
        "upstream_error",
        "upstream_error",
        None,
        "LM Studio answered 503: (no body)",
    ),
    entry(
        E.upstream_not_json,
        (200, "<html>"),
        502,
        "upstream_error",
        "upstream_bad_response",
        None,
        "LM Studio answered 200 with a body that is not JSON: <html>",
    ),
    entry(
        E.upstream_undecodable,
        ("br",),
        502,
        "upstream_error",
        "upstream_bad_response",
        None,
        "LM Studio sent an undecodable body (Content-Encoding: br).",
    ),
    entry(
        E.upstream_response_too_large,
        (1024,),
        502,
        "upstream_error",
        "upstream_response_too_large",
        None,
        "LM Studio's response was larger than 1024 bytes (limits.max_response_bytes).",
    ),
    entry(
        E.model_list_too_large,
        (99,),
        502,
        "upstream_error",
        "upstream_response_too_large",
        None,
        "LM Studio's model list is larger than LM Gate reads (99 bytes).",
    ),
    entry(
        E.model_list_malformed,
        (),
        502,
        "upstream_error",
        "upstream_bad_response",
        None,
        "LM Studio's model list was not in the expected format.",
    ),
    entry(
        E.chat_answer_too_large,
        (),
        502,
        "upstream_error",
        "upstream_response_too_large",
        None,
        "LM Studio's answer is larger than LM Gate keeps in a conversation.",
    ),
    entry(
        E.chat_answer_malformed,
        (),
        502,
        "upstream_error",
        "upstream_bad_response",
        None,
        "LM Studio's answer was not in the expected format.",
    ),
    # a stream already under way
    entry(
        E.stream_cut_by_shutdown,
        (),
        503,
        "server_error",
        "shutting_down",
        None,
        "LM Gate is shutting down; the answer was cut short.",
    ),
    entry(
        E.stream_idle,
        (0.5,),
        504,
        "upstream_error",
        "upstream_timeout",
        None,
        "LM Studio sent nothing for 0.5 s (upstream.idle_timeout); the answer was cut short.",
    ),
    entry(
        E.stream_broke,
        ("its answer arrived broken",),
        502,
        "upstream_error",
        "upstream_stream_failed",
        None,
        "LM Studio's stream broke off (its answer arrived broken); the answer is incomplete.",
    ),
    entry(
        E.stream_event_too_large,
        (65536,),
        502,
        "upstream_error",
        "upstream_event_too_large",
        None,
        "LM Studio sent an SSE event larger than 65536 bytes (limits.max_event_bytes); the "
        "answer was cut short.",
    ),
    entry(
        E.stream_upstream_error,
        ("x" * 600,),
        502,
        "upstream_error",
        "upstream_error",
        None,
        "x" * 500,
    ),
]


def catalogue_factories() -> set[str]:
    """Every public function of the catalogue module that builds an ApiError."""
    return {
        name
        for name, value in vars(api_errors).items()
        if inspect.isfunction(value)
        and not name.startswith("_")
        and value.__module__ == api_errors.__name__
        and inspect.signature(value).return_annotation in {"ApiError", ApiError}
    }


class TestTheCatalogue:
    def test_a_budget_with_tokens_left_says_how_many(self) -> None:
        error = E.budget_exceeded("month", 1000000, 300, 4200, "2027-01-01 00:00 UTC", 86400.5)
        assert (error.status, error.code, error.headers) == (
            429,
            "budget_exceeded",
            {"Retry-After": "86401"},
        )
        assert error.message == (
            "This request could use about 4,200 tokens, and 300 of your 1,000,000 for this "
            "month are left; it resets at 2027-01-01 00:00 UTC. Ask the owner for a larger budget."
        )

    def test_a_budget_a_smaller_cap_fits_in_says_which(self) -> None:
        error = E.budget_exceeded(
            "day", 1000000, 3000, 4200, "2027-01-01 00:00 UTC", 60.0, fits_output=2500
        )
        assert (error.status, error.code, error.headers) == (
            429,
            "budget_exceeded",
            {"Retry-After": "60"},
        )
        assert error.message == (
            "This request could use about 4,200 tokens, and 3,000 of your 1,000,000 for this "
            "day are left: lower max_tokens (or max_output_tokens) to 2,500 or less; it resets "
            "at 2027-01-01 00:00 UTC. Ask the owner for a larger budget."
        )
        unsaid = E.budget_exceeded("day", 10, 3, 42, "2027-01-01 00:00 UTC", 60.0, fits_output=None)
        assert "lower" not in unsaid.message

    def test_a_full_queue_in_total_is_the_gateway_s_503(self) -> None:
        error = E.queue_full(False, 5.0)
        assert (error.status, error.type, error.code, error.headers) == (
            503,
            "server_error",
            "queue_full",
            {"Retry-After": "5"},
        )
        assert "queue.max_waiting)" in error.message

    def test_the_table_lists_every_entry_once(self) -> None:
        listed = [e.factory.__name__ for e in CATALOGUE]
        assert len(listed) == len(set(listed)), "an entry is listed twice"
        assert set(listed) == catalogue_factories()

    @pytest.mark.parametrize("case", CATALOGUE, ids=lambda e: e.factory.__name__)
    def test_each_entry(self, case: Entry) -> None:
        error = case.factory(*case.args)
        assert isinstance(error, ApiError) and isinstance(error, LMGateError)
        assert (error.status, error.type, error.code, error.param) == (
            case.status,
            case.type,
            case.code,
            case.param,
        )
        assert error.message == case.message == str(error)
        assert error.headers == case.headers

    @pytest.mark.parametrize("case", CATALOGUE, ids=lambda e: e.factory.__name__)
    def test_each_entry_as_a_json_answer(self, case: Entry) -> None:
        response = case.factory(*case.args).to_response("req-42")
        assert response.status == case.status
        assert response.headers["X-Request-ID"] == "req-42"
        assert response.content_type == "application/json"
        for name, value in case.headers.items():
            assert response.headers[name] == value
        assert isinstance(response.body, bytes)
        assert json.loads(response.body) == {
            "error": {
                "message": case.message,
                "type": case.type,
                "param": case.param,
                "code": case.code,
                "request_id": "req-42",
            }
        }


def test_a_403_from_the_authenticator_is_a_permission_error_without_a_challenge() -> None:
    error = api_errors.not_authenticated(
        AuthError("This key may not be used from here.", status=403, code="ip_not_allowed")
    )
    assert (error.status, error.type, error.code, error.param) == (
        403,
        "permission_error",
        "ip_not_allowed",
        None,
    )
    assert error.headers == {}


def test_an_error_as_an_sse_event_keeps_type_and_code() -> None:
    event = api_errors.stream_idle(2.0).sse_event("req-7")
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:]) == {
        "error": {
            "message": "LM Studio sent nothing for 2 s (upstream.idle_timeout); the answer was "
            "cut short.",
            "type": "upstream_error",
            "param": None,
            "code": "upstream_timeout",
            "request_id": "req-7",
        }
    }


def test_an_error_as_raw_socket_bytes_closes_and_carries_its_headers() -> None:
    raw = api_errors.too_many_connections(False, 5).raw_response("req-9")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers == {
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Connection": "close",
        "X-Request-ID": "req-9",
        "Retry-After": "5",
    }
    assert json.loads(body)["error"] == {
        "message": "LM Gate has as many open connections as it can hold; retry shortly.",
        "type": "server_error",
        "param": None,
        "code": "too_many_connections",
        "request_id": "req-9",
    }
