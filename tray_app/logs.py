"""Structured logs: one JSON object per line, one access line per request.

Only fields the gateway chose go into a line — never headers, bodies or query strings — so no
credential can leak into a log by accident.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import IO, Any

from aiohttp.http_exceptions import HttpProcessingError

ACCESS_LOGGER = "lmgate.access"


def new_request_id() -> str:
    # 128 random bits as 32 hex digits, like uuid4().hex without building a UUID per request.
    return os.urandom(16).hex()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            fields.update(access)
        else:
            fields["message"] = record.getMessage()
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        # ASCII only: a client-chosen path with U+2028 or similar must not split a log line.
        return json.dumps(fields, ensure_ascii=True, default=str)


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse with a traceback that quotes the offending bytes —
    which may be an Authorization header. Keep one line, and none of the request's bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg = "refused a malformed HTTP request (%s %s)"
            record.args = (error.code, type(error).__name__)
            record.exc_info = None
            record.exc_text = None
            record.levelno = logging.WARNING
            record.levelname = "WARNING"
        return True


def route_library_logs(handler: logging.Handler) -> None:
    """aiohttp's own messages go through the same JSON handler, malformed requests redacted."""
    for name in ("aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.client"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(logging.WARNING)
        if not any(isinstance(f, MalformedRequestFilter) for f in logger.filters):
            logger.addFilter(MalformedRequestFilter())


def printable(value: object, limit: int = 200) -> str:
    """Others' text for a terminal or a window: a path, a device name, a model id another
    machine listed. Its escape codes must not run (move the cursor, fake a line), so every
    character that is not printable shows as "?"."""
    text = str(value)
    return "".join(ch if ch.isprintable() else "?" for ch in text[:limit])


def printable_list(items: Iterable[object], shown: int = 20) -> str:
    """Up to ``shown`` of ``items``, each :func:`printable`, then how many more there are."""
    listed = list(items)
    text = ", ".join(printable(item) for item in listed[:shown])
    return text + (f" and {len(listed) - shown} more" if len(listed) > shown else "")


class TextFormatter(logging.Formatter):
    """One short line per request for a person watching a terminal; other records as
    ``time LEVEL message``. Everything a client chose is shown without control characters."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            return f"{when} {self._request(access)}"
        line = f"{when} {record.levelname} {printable(record.getMessage(), 2000)}"
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            line += "\n" + "\n".join(printable(part, 2000) for part in trace.splitlines())
        return line

    @staticmethod
    def _request(fields: dict[str, Any]) -> str:
        parts = [str(fields.get("status")), f"{fields.get('method')} {fields.get('path')}"]
        if fields.get("model"):
            parts.append(str(fields["model"]))
        if fields.get("upstream"):
            parts.append(f"on {fields['upstream']}")
        parts.append(f"{float(fields.get('latency_ms') or 0) / 1000:.2f}s")
        if "prompt_tokens" in fields:
            parts.append(f"{fields['prompt_tokens']}+{fields.get('completion_tokens')} tok")
        if fields.get("principal"):
            parts.append(str(fields["principal"]))
        if fields.get("error"):
            parts.append(f"({fields['error']})")
        return printable(" ".join(parts), 300)


def skip_unused_record_fields() -> None:
    """Neither formatter prints where a line was logged from, nor its thread or process: not
    gathering them is the logging HOWTO's "Optimization" advice, and saves a walk up the stack
    and several system calls on every access line (one per request). So ``stack_info=True``
    adds nothing to a line either: log an exception's traceback with ``exc_info`` instead."""
    logging._srcfile = None  # the HOWTO's documented switch
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def configure_logging(
    level: str = "info", stream: IO[str] | None = None, *, format: str = "json"
) -> logging.Handler:
    """Send every ``lmgate`` log line to ``stream`` (stderr): as JSON, as short text
    (``format="text"``), or ``"auto"``: text when the stream is a terminal, else JSON."""
    skip_unused_record_fields()
    target = stream or sys.stderr
    handler = logging.StreamHandler(target)
    text = format == "text" or (format == "auto" and _is_terminal(target))
    handler.setFormatter(TextFormatter() if text else JsonFormatter())
    root = logging.getLogger("lmgate")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    route_library_logs(handler)
    return handler
