"""Every error a client of the gateway can receive, in one catalogue, and its wire shape.

``{"error": {"message", "type", "param", "code", "request_id"}}`` — OpenAI's shape: the official
SDKs read ``message`` and ``code``; the request ID lets a user match a failure to the gateway's
log line. Each factory below is one entry (its status, type, code and param fixed here, the
values its message embeds as arguments), so a code or a message is never written at the place
that raises it. Messages are built only when an error is raised: most of them never are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from http import HTTPStatus

from aiohttp import web

from tray_app.config.settings import SETTINGS_BY_KEY
from tray_app.errors import AuthError, LMGateError
from tray_app.gateway.limits import retry_after_header

REQUEST_ID_HEADER = "X-Request-ID"

INVALID = "invalid_request_error"
AUTHENTICATION = "authentication_error"
PERMISSION = "permission_error"
RATE_LIMIT = "rate_limit_error"
UPSTREAM = "upstream_error"
SERVER = "server_error"
# A body that never came, or must not be read: the connection closes instead of draining it.
CLOSE = {"Connection": "close"}


class ApiError(LMGateError):
    """A request the gateway answers with an error; carries everything the response needs."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        code: str,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def payload(self, request_id: str) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
                "request_id": request_id,
            }
        }

    def to_response(self, request_id: str) -> web.Response:
        headers = {REQUEST_ID_HEADER: request_id, **self.headers}
        return web.Response(
            status=self.status,
            body=json.dumps(self.payload(request_id)).encode(),
            content_type="application/json",
            headers=headers,
        )

    def sse_event(self, request_id: str) -> bytes:
        """This error as one SSE event: the OpenAI SDK raises it as ``APIError`` mid-stream."""
        return f"data: {json.dumps(self.payload(request_id))}\n\n".encode()

    def raw_response(self, request_id: str) -> bytes:
        """This error as bytes for a bare socket (no aiohttp request to answer), always with
        ``Connection: close``."""
        body = json.dumps(self.payload(request_id))
        lines = [
            f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Connection: close",
            f"{REQUEST_ID_HEADER}: {request_id}",
            *(f"{name}: {value}" for name, value in self.headers.items()),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("ascii")


def _invalid_body(
    message: str, *, code: str = "invalid_body", param: str | None = None
) -> ApiError:
    return ApiError(400, message, type=INVALID, code=code, param=param)


def _upstream(message: str, code: str, status: int = 502) -> ApiError:
    return ApiError(status, message, type=UPSTREAM, code=code)


def _too_many(message: str, code: str, retry_after: float) -> ApiError:
    return ApiError(
        429, message, type=RATE_LIMIT, code=code, headers=retry_after_header(retry_after)
    )


# ---- the connection and the request head ----------------------------------------------------


def too_many_connections(from_one_address: bool, retry_after: int) -> ApiError:
    message = (
        "Too many open connections from your address; close some and retry."
        if from_one_address
        else "LM Gate has as many open connections as it can hold; retry shortly."
    )
    return ApiError(
        503,
        message,
        type=SERVER,
        code="too_many_connections",
        headers={"Retry-After": str(retry_after)},
    )


def header_timeout() -> ApiError:
    return ApiError(
        408,
        "The request head did not arrive in time (server.header_timeout).",
        type=INVALID,
        code="header_timeout",
    )


def headers_too_large() -> ApiError:
    return ApiError(
        431,
        "The request line or a header field is too long, or there are too many headers.",
        type=INVALID,
        code="headers_too_large",
    )


def bad_http() -> ApiError:
    return ApiError(400, "The request is not valid HTTP/1.1.", type=INVALID, code="bad_request")


def unparsed_internal_error() -> ApiError:
    """An unparsable request aiohttp failed on for a reason of its own (no request ID yet)."""
    return ApiError(
        500,
        "LM Gate hit an internal error; details are in its log.",
        type=SERVER,
        code="internal_error",
    )


def internal_error(request_id: str) -> ApiError:
    return ApiError(
        500,
        f"LM Gate hit an internal error (request {request_id}); details are in its log.",
        type=SERVER,
        code="internal_error",
    )


def shutting_down() -> ApiError:
    return ApiError(
        503, "LM Gate is shutting down; try again in a moment.", type=SERVER, code="shutting_down"
    )


# ---- what every request is checked for first ------------------------------------------------


def upgrade_not_allowed() -> ApiError:
    return ApiError(
        404,
        "WebSocket and other protocol upgrades are not available through LM Gate.",
        type=INVALID,
        code="upgrade_not_allowed",
    )


def body_compressed(encoding: str) -> ApiError:
    return ApiError(
        415,
        f"Request bodies must not be compressed (Content-Encoding: {encoding[:40]}); send "
        "plain JSON.",
        type=INVALID,
        code="unsupported_content_encoding",
        headers=CLOSE,
    )


def expectation_failed() -> ApiError:
    return ApiError(
        417,
        "LM Gate understands only 'Expect: 100-continue'.",
        type=INVALID,
        code="expectation_failed",
    )


def host_not_allowed() -> ApiError:
    return ApiError(
        421,
        "This request is addressed to a host name LM Gate does not serve; if it should, add "
        "the name to server.allowed_hosts.",
        type=INVALID,
        code="host_not_allowed",
    )


def origin_not_allowed() -> ApiError:
    return ApiError(
        403,
        "This web origin may not call LM Gate; add it to cors.allowed_origins if it should.",
        type=PERMISSION,
        code="origin_not_allowed",
    )


# ---- routing (from the endpoint table) ------------------------------------------------------


def path_not_allowed() -> ApiError:
    """A target that does not normalise cleanly (encoded slashes, ``..`` above the root)."""
    return ApiError(
        404, "This path is not allowed by LM Gate.", type=INVALID, code="path_not_allowed"
    )


def native_api_refused(forwarded: str) -> ApiError:
    return ApiError(
        404,
        "LM Studio's native /api endpoints (model download, load, unload) are never "
        f"exposed by LM Gate. Forwarded: {forwarded}.",
        type=INVALID,
        code="path_not_allowed",
    )


def route_disabled(path: str, option: str) -> ApiError:
    # The flag too: a `serve` user turns it on there, not in a file.
    setting = SETTINGS_BY_KEY.get(option)
    flag = setting.flag.name if setting is not None and setting.flag is not None else None
    how = f"the setting {option} or the flag {flag}" if flag else f"the setting {option}"
    return ApiError(
        404,
        f"{path} is turned off in LM Gate; enable it with {how}.",
        type=INVALID,
        code="route_disabled",
    )


def unknown_path(path: str, forwarded: str) -> ApiError:
    return ApiError(
        404,
        f"Unknown path {path[:100]}. LM Gate forwards only: {forwarded}.",
        type=INVALID,
        code="unknown_path",
    )


def no_such_endpoint() -> ApiError:
    """A CORS preflight for a path nothing is served at."""
    return ApiError(404, "No such endpoint.", type=INVALID, code="unknown_path")


def method_not_allowed(method: str, path: str, allow: str) -> ApiError:
    return ApiError(
        405,
        f"Method {method} is not allowed on {path}; use {allow}.",
        type=INVALID,
        code="method_not_allowed",
        headers={"Allow": allow},
    )


# ---- who calls ------------------------------------------------------------------------------


def not_authenticated(exc: AuthError) -> ApiError:
    """The authenticator refused the credential (401) or its holder (403)."""
    if exc.status == 401:
        return ApiError(
            401,
            str(exc),
            type=AUTHENTICATION,
            code=exc.code,
            headers={"WWW-Authenticate": 'Bearer realm="lmgate"'},
        )
    return ApiError(exc.status, str(exc), type=PERMISSION, code=exc.code)


def pairing_refused(exc: AuthError) -> ApiError:
    return ApiError(401, str(exc), type=AUTHENTICATION, code=exc.code)


def credential_revoked() -> ApiError:
    return ApiError(
        401,
        "The credential this request was made with has been revoked.",
        type=AUTHENTICATION,
        code="credential_revoked",
    )


def missing_scope(path: str, scope: str) -> ApiError:
    return ApiError(
        403,
        f"This key may not use {path} (it lacks the '{scope}' scope).",
        type=PERMISSION,
        code="insufficient_scope",
    )


def conversations_need_chat_scope() -> ApiError:
    return ApiError(
        403,
        "Conversations need a key with the 'chat' scope.",
        type=PERMISSION,
        code="insufficient_scope",
    )


def metrics_need_metrics_scope() -> ApiError:
    return ApiError(
        403,
        "Metrics need a key with the 'metrics' scope.",
        type=PERMISSION,
        code="insufficient_scope",
    )


def model_not_allowed(model: str, param: str) -> ApiError:
    return ApiError(
        403,
        f"This key may not use the model {model!r}.",
        type=PERMISSION,
        code="model_not_allowed",
        param=param,
    )


def model_not_found(model: str) -> ApiError:
    """OpenAI's own answer for a model that is not listed: also for one that exists but the
    caller may not use, so that nobody learns which hidden models there are."""
    return ApiError(
        404,
        f"The model {model[:256]!r} does not exist or you do not have access to it.",
        type=INVALID,
        code="model_not_found",
        param="model",
    )


# ---- throttles and limits -------------------------------------------------------------------


def too_many_auth_failures(retry_after: float) -> ApiError:
    return _too_many(
        "Too many failed authentication attempts from your address; wait "
        "and try again with a valid key.",
        "too_many_auth_failures",
        retry_after,
    )


def too_many_pairing_attempts(retry_after: float) -> ApiError:
    return _too_many(
        "Too many wrong pairing codes from your address; wait a minute and scan a fresh QR code.",
        "too_many_pairing_attempts",
        retry_after,
    )


def rate_limit_exceeded(retry_after: float) -> ApiError:
    return _too_many(
        "Rate limit reached (limits.requests_per_minute); slow down.",
        "rate_limit_exceeded",
        retry_after,
    )


def too_many_concurrent_requests(limit: int) -> ApiError:
    return _too_many(
        f"Too many requests at once: at most {limit} "
        "(limits.concurrent_requests). Wait for one to finish.",
        "too_many_concurrent_requests",
        1.0,
    )


def shared_limits_unavailable(retry_after: float) -> ApiError:
    # Several replicas count their limits in Redis: without it no replica can tell whether a
    # request is within them, and counting alone would multiply every limit by the replicas.
    return ApiError(
        503,
        "LM Gate cannot reach the store its replicas share their limits in (Redis), so it "
        "cannot check this request's limits; try again shortly "
        "(state.when_redis_is_down = closed).",
        type=SERVER,
        code="shared_limits_unavailable",
        headers=retry_after_header(retry_after),
    )


def state_unavailable(retry_after: float) -> ApiError:
    # A credential that cannot be checked is not trusted: it may have been revoked meanwhile.
    return ApiError(
        503,
        "LM Gate cannot read its database, so it cannot check credentials; nothing was "
        "forwarded. Try again shortly.",
        type=SERVER,
        code="state_unavailable",
        headers=retry_after_header(retry_after),
    )


# ---- sharing one GPU: budgets, the queue, the model guard -------------------------------------


def budget_exceeded(
    period: str,
    limit: int,
    remaining: int,
    needed: int,
    resets: str,
    retry_after: float,
    *,
    fits_output: int | None = None,
) -> ApiError:
    """``period`` is "day" or "month"; ``resets`` the reset time in words (UTC);
    ``fits_output`` the largest output cap that would fit now, when a smaller one would."""
    if remaining <= 0:
        said = f"Your token budget for this {period} ({limit:,} tokens) is used up"
    else:
        said = (
            f"This request could use about {needed:,} tokens, and {remaining:,} of your "
            f"{limit:,} for this {period} are left"
        )
    if fits_output is not None:
        said += f": lower max_tokens (or max_output_tokens) to {fits_output:,} or less"
    return _too_many(
        f"{said}; it resets at {resets}. Ask the owner for a larger budget.",
        "budget_exceeded",
        retry_after,
    )


def queue_full(from_one_address: bool, retry_after: float) -> ApiError:
    if from_one_address:
        return _too_many(
            "Too many requests from your address are already waiting for their turn "
            "(queue.max_waiting_per_client); wait for some to finish.",
            "queue_full",
            retry_after,
        )
    return ApiError(
        503,
        "LM Gate's queue is full (queue.max_waiting): everyone else is waiting too; retry shortly.",
        type=SERVER,
        code="queue_full",
        headers=retry_after_header(retry_after),
    )


def queue_full_for_caller(retry_after: float) -> ApiError:
    return _too_many(
        "Too many of your requests are already waiting for their turn "
        "(queue.max_waiting_per_caller); wait for some to finish.",
        "queue_full",
        retry_after,
    )


def queue_wait_timeout(seconds: float, retry_after: float) -> ApiError:
    return ApiError(
        503,
        f"LM Studio stayed busy: waited {seconds:g} s for a turn (queue.max_wait, or "
        "queue.max_stream_wait for a stream); retry later.",
        type=SERVER,
        code="queue_timeout",
        headers=retry_after_header(retry_after),
    )


def model_switch_refused(model: str, retry_after: float) -> ApiError:
    return ApiError(
        503,
        f"{model!r} is not loaded, and loading it now would cut off answers others are "
        "receiving from another model (models.switch = refuse); retry when they finish.",
        type=SERVER,
        code="model_busy",
        headers=retry_after_header(retry_after),
    )


def draft_model_not_loaded(model: str, retry_after: float) -> ApiError:
    return ApiError(
        503,
        f"The draft model {model!r} is not loaded, and loading it beside the model could cut off "
        "answers others are receiving; ask the owner to warm it up (lmgate warm-up), or leave "
        "draft_model out.",
        type=SERVER,
        code="model_busy",
        param="draft_model",
        headers=retry_after_header(retry_after),
    )


def model_switch_timeout(model: str, seconds: float, retry_after: float) -> ApiError:
    return ApiError(
        503,
        f"{model!r} is not loaded, and others kept receiving answers from another model for "
        f"{seconds:g} s; retry later.",
        type=SERVER,
        code="model_busy",
        headers=retry_after_header(retry_after),
    )


def model_load_failed(model: str, detail: str) -> ApiError:
    return _upstream(f"LM Studio could not load {model!r}: {detail[:200]}", "model_load_failed")


def model_load_timeout(model: str, seconds: float) -> ApiError:
    return _upstream(
        f"LM Studio did not finish loading {model!r} within {seconds:g} s (models.load_timeout).",
        "model_load_timeout",
        504,
    )


# ---- reading the body -----------------------------------------------------------------------


def body_too_large(limit: int, setting: str) -> ApiError:
    return ApiError(
        413,
        f"The request body is larger than {limit} bytes ({setting}).",
        type=INVALID,
        code="body_too_large",
    )


def body_broken() -> ApiError:
    return ApiError(
        400,
        "The request body could not be read (its framing is broken).",
        type=INVALID,
        code="invalid_body",
        headers=CLOSE,
    )


def body_too_slow(seconds: float) -> ApiError:
    return ApiError(
        408,
        f"The request body did not arrive within {seconds:g} s (server.body_timeout).",
        type=INVALID,
        code="body_timeout",
        headers=CLOSE,
    )


# ---- the body as JSON -----------------------------------------------------------------------


def body_empty() -> ApiError:
    return _invalid_body("The request body is empty; send a JSON object.")


def body_too_many_containers(limit: int) -> ApiError:
    return _invalid_body(f"The request body has more than {limit} JSON objects and arrays.")


def body_not_utf8() -> ApiError:
    return _invalid_body("The request body is not UTF-8 text; send a JSON object.")


def body_not_json(problem: str, position: int) -> ApiError:
    return _invalid_body(f"The request body is not valid JSON: {problem} at {position}.")


def body_too_deep(limit: int) -> ApiError:
    return _invalid_body(f"The request body is nested deeper than {limit} levels.")


def body_refused(reason: str) -> ApiError:
    return _invalid_body(f"The request body is refused: {reason}.")


def body_not_object(kind: str) -> ApiError:
    return _invalid_body(f"The request body must be a JSON object, not a JSON {kind}.")


def tools_not_a_list() -> ApiError:
    return _invalid_body("The tools parameter must be a list of tools.", param="tools")


def tool_malformed() -> ApiError:
    return _invalid_body("Each tool must be a JSON object whose type is a string.", param="tools")


def model_missing() -> ApiError:
    return _invalid_body("You must provide a model parameter.", code="missing_model", param="model")


def model_name_empty(param: str) -> ApiError:
    return _invalid_body(
        f"The {param} parameter must be a non-empty string.", code="invalid_model", param=param
    )


def model_name_too_long(param: str, limit: int) -> ApiError:
    return _invalid_body(
        f"The {param} parameter is longer than {limit} characters.",
        code="invalid_model",
        param=param,
    )


def model_not_a_string() -> ApiError:
    return _invalid_body(
        "The model parameter must be a string.", code="invalid_model", param="model"
    )


def count_tokens_messages_invalid() -> ApiError:
    return _invalid_body(
        "The messages parameter must be a list of messages.",
        code="invalid_messages",
        param="messages",
    )


def stream_not_a_boolean() -> ApiError:
    return _invalid_body(
        "The stream parameter must be true or false.", code="invalid_stream", param="stream"
    )


def pairing_body_invalid() -> ApiError:
    return _invalid_body('Send {"code": "<pairing code>", "device_name": "..."}.', param="code")


# ---- the conversation API -------------------------------------------------------------------


def chat_message_missing() -> ApiError:
    return _invalid_body('Send a non-empty "message".', param="message")


def chat_message_too_long(limit: int) -> ApiError:
    return _invalid_body(f"The message is longer than {limit} characters.", param="message")


def chat_stream_not_a_boolean() -> ApiError:
    return _invalid_body('"stream" must be true or false.', param="stream")


def chat_retry_not_a_boolean() -> ApiError:
    return _invalid_body('"retry" must be true or false.', param="retry")


def chat_edit_not_a_boolean() -> ApiError:
    return _invalid_body('"edit" must be true or false.', param="edit")


def chat_conversation_id_not_a_string() -> ApiError:
    return _invalid_body('"conversation_id" must be a string.', param="conversation_id")


def chat_system_not_a_string() -> ApiError:
    return _invalid_body('"system" must be a string ("" for none).', param="system")


def chat_system_too_long(limit: int) -> ApiError:
    return _invalid_body(f"The system prompt is longer than {limit} characters.", param="system")


def chat_image_not_a_string() -> ApiError:
    return _invalid_body(
        '"image" must be a data URL string (data:image/jpeg;base64,...).', param="image"
    )


def chat_image_not_a_data_url() -> ApiError:
    return _invalid_body(
        '"image" must be a base64 data URL: data:image/jpeg;base64,... (or image/png, image/webp).',
        code="invalid_image",
        param="image",
    )


def chat_image_type_not_allowed() -> ApiError:
    return _invalid_body(
        "Only JPEG, PNG and WebP photos are accepted (image/jpeg, image/png, image/webp).",
        code="image_type_not_allowed",
        param="image",
    )


def chat_image_base64_invalid() -> ApiError:
    return _invalid_body(
        "The photo's base64 data is not valid.", code="invalid_image", param="image"
    )


def chat_image_not_its_type() -> ApiError:
    return _invalid_body(
        "The photo's data is not the image type its data URL names.",
        code="invalid_image",
        param="image",
    )


def chat_image_too_large(limit: int) -> ApiError:
    return _invalid_body(
        f"The photo is larger than {limit} bytes; send it smaller.",
        code="image_too_large",
        param="image",
    )


def chat_too_many_images(limit: int) -> ApiError:
    return _invalid_body(
        f"This conversation already holds {limit} photos, as many as it may; "
        "start a new conversation to send another.",
        code="too_many_images",
        param="image",
    )


def chat_model_invalid() -> ApiError:
    return _invalid_body('"model" must be a model name.', param="model")


def no_default_model() -> ApiError:
    return _invalid_body(
        "No model given, and LM Studio offers none this key may use; send a model.",
        code="missing_model",
        param="model",
    )


def conversation_not_found() -> ApiError:
    return ApiError(404, "No such conversation.", type=INVALID, code="conversation_not_found")


# ---- LM Studio ------------------------------------------------------------------------------


def upstream_unreachable() -> ApiError:
    """What a caller is told when the one upstream cannot be reached: never its address (the
    owner's LAN is not the caller's business; LM Gate's log and the tray name it)."""
    return _upstream(
        "LM Studio is not reachable. Start its server (LM Studio → Developer → Start Server, "
        "or `lms server start`) and check that LM Gate's upstream.url matches (LM Gate's log "
        "names the address it tried).",
        "upstream_unreachable",
    )


def upstream_unreachable_at(upstream_url: str) -> ApiError:
    """The owner's own commands' wording (warm-up), with the address: a caller is never
    given it (the forwarder answers upstream_unreachable or no_upstream instead)."""
    return _upstream(
        f"LM Studio is not reachable at {upstream_url}. Start its server (LM Studio → Developer → "
        "Start Server, or `lms server start`) and check that LM Gate's upstream.url matches.",
        "upstream_unreachable",
    )


def no_upstream_enabled() -> ApiError:
    """Every configured upstream is switched off (``enabled = false``): nothing is sent
    anywhere, and waiting does not help until the owner switches one on."""
    return ApiError(
        503,
        "LM Gate's owner has switched off every model server it sends requests to; tell the owner.",
        type=UPSTREAM,
        code="upstream_disabled",
    )


# A down upstream is probed again within a minute (the pool's longest backoff).
NO_UPSTREAM_RETRY_AFTER = 60.0


def no_upstream(model: str | None) -> ApiError:
    """Several upstreams, and none that offers ``model`` is up (the names and addresses of
    the owner's machines are not the caller's business: /readyz and the tray show them)."""
    what = "any model" if model is None else repr(model[:256])
    return ApiError(
        503,
        f"None of LM Gate's model servers that serve {what} is reachable now; "
        "retry in a minute, or tell the owner.",
        type=UPSTREAM,
        code="upstream_unreachable",
        headers=retry_after_header(NO_UPSTREAM_RETRY_AFTER),
    )


def upstream_timeout(seconds: float) -> ApiError:
    return _upstream(
        f"LM Studio did not answer within {seconds:g} s "
        "(upstream.idle_timeout). A large prompt may need a longer idle timeout.",
        "upstream_timeout",
        504,
    )


def upstream_failed(failure: str) -> ApiError:
    return _upstream(
        f"The connection to LM Studio failed: {failure}. Check that LM Studio's "
        "server is running and healthy.",
        "upstream_failed",
    )


def upstream_auth_failed(status: int) -> ApiError:
    return _upstream(
        f"LM Studio refused LM Gate's request ({status}): it requires authentication. Create an "
        "API token in LM Studio's server settings and give it to LM Gate as the LM Studio token.",
        "upstream_auth_failed",
    )


def upstream_redirect(status: int) -> ApiError:
    return _upstream(
        f"LM Studio answered with a redirect ({status}); LM Gate does not "
        "follow redirects. Check that upstream.url points at LM Studio's server.",
        "upstream_bad_response",
    )


def upstream_status(status: int, snippet: str) -> ApiError:
    """LM Studio's own error status, passed through, when its body is not an OpenAI error."""
    return _upstream(
        f"LM Studio answered {status}: {snippet or '(no body)'}", "upstream_error", status
    )


def upstream_not_json(status: int, snippet: str) -> ApiError:
    return _upstream(
        f"LM Studio answered {status} with a body that is not JSON: {snippet or '(empty)'}",
        "upstream_bad_response",
    )


def upstream_undecodable(encoding: str) -> ApiError:
    return _upstream(
        f"LM Studio sent an undecodable body (Content-Encoding: {encoding}).",
        "upstream_bad_response",
    )


def upstream_response_too_large(limit: int) -> ApiError:
    return _upstream(
        f"LM Studio's response was larger than {limit} bytes (limits.max_response_bytes).",
        "upstream_response_too_large",
    )


def model_list_too_large(size: int) -> ApiError:
    return _upstream(
        f"LM Studio's model list is larger than LM Gate reads ({size} bytes).",
        "upstream_response_too_large",
    )


def model_list_malformed() -> ApiError:
    return _upstream(
        "LM Studio's model list was not in the expected format.", "upstream_bad_response"
    )


def chat_answer_too_large() -> ApiError:
    return _upstream(
        "LM Studio's answer is larger than LM Gate keeps in a conversation.",
        "upstream_response_too_large",
    )


def chat_answer_malformed() -> ApiError:
    return _upstream("LM Studio's answer was not in the expected format.", "upstream_bad_response")


# ---- a stream already under way (sent as an SSE error event; the status is not sent) ----------


def stream_cut_by_shutdown() -> ApiError:
    return ApiError(
        503,
        "LM Gate is shutting down; the answer was cut short.",
        type=SERVER,
        code="shutting_down",
    )


def stream_idle(seconds: float) -> ApiError:
    return _upstream(
        f"LM Studio sent nothing for {seconds:g} s "
        "(upstream.idle_timeout); the answer was cut short.",
        "upstream_timeout",
        504,
    )


def stream_broke(failure: str) -> ApiError:
    return _upstream(
        f"LM Studio's stream broke off ({failure}); the answer is incomplete.",
        "upstream_stream_failed",
    )


def stream_event_too_large(limit: int) -> ApiError:
    return _upstream(
        f"LM Studio sent an SSE event larger than {limit} bytes "
        "(limits.max_event_bytes); the answer was cut short.",
        "upstream_event_too_large",
    )


def stream_upstream_error(text: str) -> ApiError:
    """LM Studio answered an error after the stream's headers were sent (heartbeats)."""
    return _upstream(text[:500], "upstream_error")
