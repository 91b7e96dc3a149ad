"""Error answers written straight to a socket, where there is no aiohttp request to answer:
a connection refused as it opens, or one whose request head never arrived. The errors are the
catalogue's (:mod:`tray_app.gateway.api_errors`), in the same JSON shape, always with
``Connection: close``."""

from __future__ import annotations

from tray_app.gateway.api_errors import ApiError
from tray_app.logs import new_request_id


def raw_error_response(error: ApiError) -> bytes:
    return error.raw_response(new_request_id())
