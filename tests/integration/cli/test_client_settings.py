"""The settings `lmgate key create` prints for apps: OpenAI's and Claude Code's, with the new
key and the address the gateway listens on, and the setting Claude Code needs when it is off."""

from __future__ import annotations

import re

from tests.helpers import Env
from tray_app.cli.client_settings import (
    claude_code_settings,
    client_settings,
    loopback_host,
    openai_settings,
)


def test_key_create_prints_claude_code_settings(env: Env) -> None:
    settings = {"LMGATE_SERVER_PORT": "9123", "LMGATE_ROUTES_ENABLE_MESSAGES": "true"}
    created = env.run("key", "create", "claude", extra=settings)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert re.fullmatch(r"lmg_[A-Za-z0-9_-]{43}", key), "stdout stays the key alone"
    assert "export ANTHROPIC_BASE_URL=http://127.0.0.1:9123\n" in created.stderr
    assert f"export ANTHROPIC_AUTH_TOKEN={key}\n" in created.stderr
    assert "OPENAI_BASE_URL=http://127.0.0.1:9123/v1\n" in created.stderr
    assert f"OPENAI_API_KEY={key}\n" in created.stderr
    assert "--enable-messages" not in created.stderr


def test_key_create_says_how_to_turn_messages_on(env: Env) -> None:
    created = env.run("key", "create", "claude")
    assert created.returncode == 0, created.stderr
    assert "start LM Gate with --enable-messages" in created.stderr
    assert "routes.enable_messages = true" in created.stderr


def test_the_snippets_themselves() -> None:
    assert openai_settings("https://x.example/", "k") == (
        "OPENAI_BASE_URL=https://x.example/v1\nOPENAI_API_KEY=k\n"
    )
    assert claude_code_settings("https://x.example/", "k", model="qwen/qwen3-4b") == (
        "export ANTHROPIC_BASE_URL=https://x.example\n"
        "export ANTHROPIC_AUTH_TOKEN=k\n"
        "export ANTHROPIC_MODEL=qwen/qwen3-4b\n"
    )
    both = client_settings("http://h:1", "k", messages_on=True)
    assert both.startswith("OpenAI-compatible apps:\nOPENAI_BASE_URL=http://h:1/v1\n")
    assert "\nClaude Code:\nexport ANTHROPIC_BASE_URL=http://h:1\n" in both
    assert "ANTHROPIC_MODEL=<a model LM Studio serves>" in both


def test_a_wildcard_listener_is_reached_on_loopback() -> None:
    assert [loopback_host(h) for h in ("0.0.0.0", "::", "", "127.0.0.1", "::1", "box")] == [
        "127.0.0.1",
        "127.0.0.1",
        "127.0.0.1",
        "127.0.0.1",
        "[::1]",
        "box",
    ]
