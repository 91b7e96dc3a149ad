"""The README stays true: its quick start is the two commands, .ci/run runs the test command,
and its configuration table matches the settings the code knows."""

from __future__ import annotations

import re

from tests.helpers import REPO_ROOT
from tray_app.config.reference import markdown_table
from tray_app.config.settings import SETTINGS_BY_KEY, describe_settings, format_default
from tray_app.tunnel.choices import CHOICES
from tray_app.tunnel.choices import markdown_table as tunnel_table

ROOT = REPO_ROOT
README = (ROOT / "README.md").read_text(encoding="utf-8")


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section)


def test_quick_start_is_two_commands() -> None:
    commands = quick_start_commands()
    assert len(commands) == 2
    assert commands[0].endswith(".venv/bin/lmgate")
    assert commands[1] == "bash tests/run.sh"


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash tests/run.sh" in ci


def test_configuration_table_matches_the_code() -> None:
    rows = re.findall(
        r"^\| `([a-z_.]+)` \| `(LMGATE_[A-Z_]+)` \| (?:`--[a-z-]+`)? \| `([^`]*)` \|", README, re.M
    )
    documented = {key: (env, default) for key, env, default in rows}
    for key, env, default, _help in describe_settings():
        assert key in documented, f"{key} is missing from the README"
        assert documented[key][0] == env
        assert documented[key][1] == format_default(default)
    assert len(documented) == len(describe_settings())


def test_configuration_table_is_the_generated_one() -> None:
    # Regenerate with `lmgate config keys --markdown`.
    assert markdown_table() in README


def test_going_public_compares_the_options_with_the_declared_table() -> None:
    section = README.split("## Going public", 1)[1].split("\n## ", 1)[0]
    assert tunnel_table() in section
    # Every way to go public that the setting accepts is in the table, and none that it does not.
    offered = {c.provider.value for c in CHOICES}
    accepted = set(SETTINGS_BY_KEY["tunnel.provider"].choices or ()) - {"none"}
    assert offered == accepted


def test_screenshots_in_the_readme_exist() -> None:
    images = re.findall(r"\]\((docs/[^)]+\.png)\)", README)
    assert len(images) >= 3
    for image in images:
        assert (ROOT / image).stat().st_size > 2000, image


def test_readme_names_every_cli_command() -> None:
    for command in (
        "lmgate serve",
        "lmgate doctor",
        "lmgate check",
        "lmgate deploy nginx",
        "lmgate deploy compose",
        "lmgate key create",
        "lmgate token create",
        "lmgate pair",
        "lmgate tunnel set-token",
        "lmgate usage",
        "lmgate keys rotate",
    ):
        assert command in README, command


def test_the_request_line_example_is_what_serve_prints() -> None:
    import logging

    from tray_app.logs import ACCESS_LOGGER, TextFormatter

    found = re.search(r"one short line per\s+request \(`(\d\d:\d\d:\d\d) ([^`]+)`", README)
    assert found is not None, "the README shows a request line"
    record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, __file__, 1, "request", (), None)
    # What the gateway logs for a chat by an API key: its principal is key:<id>.
    record.access = {
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 200,
        "model": "qwen2.5-7b-instruct",
        "latency_ms": 1240.0,
        "prompt_tokens": 7,
        "completion_tokens": 20,
        "principal": "key:f9ad1a8bbd35",
    }
    printed = TextFormatter().format(record)
    assert printed.split(" ", 1)[1] == found.group(2)


def test_troubleshooting_names_the_codes_a_new_user_meets() -> None:
    section = README.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    assert "`401 invalid_token`" in section
    assert "--enable-messages" in section and "route_disabled" in section
