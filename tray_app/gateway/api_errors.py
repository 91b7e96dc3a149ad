"""Errors as clients see them: OpenAI's JSON shape, with the request ID.

``{"error": {"message", "type", "param", "code", "request_id"}}`` — the official SDKs read
``message`` and ``code``; the request ID lets a user match a failure to the gateway's log line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

REQUEST_ID_HEADER = "X-Request-ID"


class ApiError(Exception):
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
        return error_payload(
            self.message, type=self.type, code=self.code, param=self.param, request_id=request_id
        )

    def to_response(self, request_id: str) -> web.Response:
        headers = {REQUEST_ID_HEADER: request_id, **self.headers}
        return web.Response(
            status=self.status,
            body=json.dumps(self.payload(request_id)).encode(),
            content_type="application/json",
            headers=headers,
        )


def error_payload(
    message: str, *, type: str, code: str, param: str | None = None, request_id: str
) -> dict[str, object]:
    return {
        "error": {
            "message": message,
            "type": type,
            "param": param,
            "code": code,
            "request_id": request_id,
        }
    }


def sse_error_event(message: str, *, type: str, code: str, request_id: str) -> bytes:
    """An error as one SSE event: the OpenAI SDK raises it as ``APIError`` mid-stream."""
    body = json.dumps(error_payload(message, type=type, code=code, request_id=request_id))
    return f"data: {body}\n\n".encode()
