"""Error answers written straight to a socket, where there is no aiohttp request to answer:
a connection refused as it opens, or one whose request head never arrived. Same JSON shape as
:class:`tray_app.gateway.api_errors.ApiError`, always with ``Connection: close``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from http import HTTPStatus

from tray_app.gateway.api_errors import REQUEST_ID_HEADER, error_payload
from tray_app.logs import new_request_id


def raw_error_response(
    status: int,
    message: str,
    *,
    type: str,
    code: str,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    request_id = new_request_id()
    body = json.dumps(error_payload(message, type=type, code=code, request_id=request_id))
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        f"{REQUEST_ID_HEADER}: {request_id}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("ascii")
