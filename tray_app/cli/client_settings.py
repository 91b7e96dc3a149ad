"""What a person pastes into an app to use LM Gate: the settings printed with a new key.

OpenAI-compatible apps read ``OPENAI_BASE_URL`` (with ``/v1``) and ``OPENAI_API_KEY``. Claude
Code and other Anthropic-API clients read ``ANTHROPIC_BASE_URL`` (without ``/v1``: they add
``/v1/messages`` themselves) and ``ANTHROPIC_AUTH_TOKEN``, which they send as ``Authorization:
Bearer``; they need ``routes.enable_messages`` on.
"""

from __future__ import annotations


def loopback_host(host: str) -> str:
    """Where a client on this computer reaches a server listening on ``host`` (for a URL)."""
    if host in {"", "0.0.0.0", "::"}:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def openai_settings(base_url: str, key: str) -> str:
    return f"OPENAI_BASE_URL={base_url.rstrip('/')}/v1\nOPENAI_API_KEY={key}\n"


def claude_code_settings(base_url: str, key: str, *, model: str | None = None) -> str:
    """Shell lines for Claude Code; ``model`` (one LM Studio serves) when known, because its
    default model is a Claude one that LM Studio does not have."""
    lines = [
        f"export ANTHROPIC_BASE_URL={base_url.rstrip('/')}",
        f"export ANTHROPIC_AUTH_TOKEN={key}",
        f"export ANTHROPIC_MODEL={model or '<a model LM Studio serves>'}",
    ]
    return "\n".join(lines) + "\n"


def client_settings(base_url: str, key: str, *, messages_on: bool, model: str | None = None) -> str:
    """Both snippets, and how to turn on what Claude Code needs when it is off."""
    claude = claude_code_settings(base_url, key, model=model)
    if not messages_on:
        claude += (
            "# Claude Code needs POST /v1/messages: start LM Gate with --enable-messages\n"
            "# (or routes.enable_messages = true in the config file).\n"
        )
    return f"OpenAI-compatible apps:\n{openai_settings(base_url, key)}\nClaude Code:\n{claude}"
