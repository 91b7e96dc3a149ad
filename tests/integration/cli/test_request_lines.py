"""What an interactive `lmgate serve` prints per request: one short line a person reads
(it printed a JSON object per request to the terminal), JSON where no one watches (a pipe,
journald, a file) or when asked with --log-format json. A client's own text (its path, a
device's name) never reaches the terminal with control characters in it."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import subprocess

import pytest

from tests.helpers import LMGATE, Env, curl, start_serve
from tests.integration.cli.test_cli_tunnel import read_terminal
from tray_app.logs import ACCESS_LOGGER, JsonFormatter, TextFormatter, configure_logging

LINE = re.compile(r"^\d\d:\d\d:\d\d 200 GET /healthz \d+\.\d\ds\r?$", re.M)


def serve_on_a_terminal_all(env: Env, *args: str) -> tuple[subprocess.Popen[bytes], int, str]:
    """serve with stdout and stderr on one pseudo-terminal, as in a terminal window."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [LMGATE, "serve", "--port", "0", *args],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env.vars,
    )
    os.close(terminal)
    return proc, controller, read_terminal(controller, until="Press Ctrl-C", timeout=30)


def finish(proc: subprocess.Popen[bytes], controller: int) -> None:
    proc.terminate()
    try:
        read_terminal(controller, until=None, timeout=30)
    finally:
        proc.wait(timeout=30)
        os.close(controller)


def url_of(text: str) -> str:
    found = re.search(r"Listening on (http://\S+)", text)
    assert found is not None, text
    return found.group(1)


def test_an_interactive_serve_prints_short_request_lines(env: Env) -> None:
    proc, controller, text = serve_on_a_terminal_all(env)
    try:
        status, _ = curl(url_of(text) + "/healthz")
        assert status == 200
        shown = read_terminal(controller, until="GET /healthz", timeout=15)
        assert LINE.search(shown), shown
        assert '"request_id"' not in shown
    finally:
        finish(proc, controller)


def test_log_format_json_keeps_json_on_a_terminal(env: Env) -> None:
    proc, controller, text = serve_on_a_terminal_all(env, "--log-format", "json")
    try:
        curl(url_of(text) + "/healthz")
        shown = read_terminal(controller, until='"/healthz"', timeout=15)
        line = next(x for x in shown.splitlines() if '"/healthz"' in x)
        fields = json.loads(line)
        assert (fields["path"], fields["status"], fields["method"]) == ("/healthz", 200, "GET")
    finally:
        finish(proc, controller)


def test_a_piped_serve_logs_json(env: Env) -> None:
    proc, url = start_serve(env.vars)
    try:
        curl(url + "/healthz")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    line = next(x for x in err.splitlines() if '"/healthz"' in x)
    assert json.loads(line)["status"] == 200


def access_record(**fields: object) -> logging.LogRecord:
    record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, __file__, 1, "request", (), None)
    record.access = fields
    return record


def test_a_request_line_holds_what_a_person_looks_for() -> None:
    record = access_record(
        method="POST",
        path="/v1/chat/completions",
        status=200,
        model="qwen2.5-7b-instruct",
        latency_ms=1234.5,
        prompt_tokens=7,
        completion_tokens=20,
        principal="owner",
        request_id="abc",
        client="127.0.0.1",
    )
    line = TextFormatter().format(record)
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d 200 POST /v1/chat/completions qwen2\.5-7b-instruct 1\.23s "
        r"7\+20 tok owner",
        line,
    ), line
    refused = TextFormatter().format(
        access_record(method="GET", path="/x", status=404, latency_ms=0.4, error="unknown_path")
    )
    assert refused.endswith(" 404 GET /x 0.00s (unknown_path)"), refused


def test_a_clients_text_reaches_the_terminal_without_control_characters() -> None:
    evil = "/v1/\x1b]0;pwned\x07\u009b31m\u2028x"
    line = TextFormatter().format(
        access_record(method="GET", path=evil, status=404, principal="ph\x1b[2Jone")
    )
    assert not any(not ch.isprintable() for ch in line), repr(line)
    assert "/v1/?]0;pwned??31m?x" in line and "ph?[2Jone" in line
    message = logging.LogRecord(
        "lmgate.x", logging.WARNING, __file__, 1, "bad %s", ("\x1b[1m",), None
    )
    assert TextFormatter().format(message).endswith(" WARNING bad ?[1m")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stream", "fmt", "kind"),
    [
        (Terminal, "auto", TextFormatter),
        (io.StringIO, "auto", JsonFormatter),
        (Terminal, "json", JsonFormatter),
        (io.StringIO, "text", TextFormatter),
        (Terminal, "text", TextFormatter),
    ],
)
def test_the_format_follows_the_setting_and_the_stream(
    stream: type[io.StringIO], fmt: str, kind: type[logging.Formatter]
) -> None:
    handler = configure_logging("info", stream(), format=fmt)
    try:
        assert type(handler.formatter) is kind
    finally:
        configure_logging("info", io.StringIO())
