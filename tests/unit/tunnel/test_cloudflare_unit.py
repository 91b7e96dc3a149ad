"""The Cloudflare provider's pure parts: the token's shape, redaction, the agent's environment
and the sentences for what cloudflared prints."""

from __future__ import annotations

import base64
import json

import pytest

from tray_app.errors import TunnelError
from tray_app.tunnel.cloudflare import (
    CLOUDFLARED,
    NOTHING_READ,
    RATE_LIMITED,
    TOKEN_HELP,
    UNREACHABLE,
    Redactor,
    agent_environment,
    check_tunnel_token_shape,
    explain,
)

SECRET = base64.b64encode(bytes(range(32))).decode()
DOCUMENT = {"a": "0123456789abcdef0123456789abcdef", "t": "6d2f1c3a-0b8e-4c21", "s": SECRET}
TOKEN = base64.b64encode(json.dumps(DOCUMENT).encode()).decode()


def encode(document: object, *, urlsafe: bool = False) -> str:
    raw = json.dumps(document).encode()
    return (base64.urlsafe_b64encode(raw) if urlsafe else base64.b64encode(raw)).decode()


def test_a_tunnel_token_is_accepted_stripped() -> None:
    assert check_tunnel_token_shape(f"  {TOKEN}\n") == TOKEN
    assert check_tunnel_token_shape(TOKEN.rstrip("=")) == TOKEN.rstrip("=")
    urlsafe = encode({**DOCUMENT, "s": "??>>" * 12}, urlsafe=True)
    assert check_tunnel_token_shape(urlsafe) == urlsafe


@pytest.mark.parametrize(
    "token",
    [
        "short",
        "not a token at all, with spaces and more than forty characters",
        encode({"a": "x", "t": "y"}) + "",  # no secret
        encode({"a": "x", "t": "y", "s": ""}),  # an empty secret
        encode({"a": "x", "t": "y", "s": 5, "pad": "p" * 30}),  # not text
        encode(["a", "t", "s", "p" * 40]),  # not an object
        base64.b64encode(b"\xff\xfe" * 30).decode(),  # not UTF-8
        TOKEN[:-8] + "!!!!!!!!",
        TOKEN + "-",  # mixed alphabets
    ],
)
def test_anything_else_is_refused_without_echoing_it(token: str) -> None:
    with pytest.raises(TunnelError) as caught:
        check_tunnel_token_shape(token)
    message = str(caught.value)
    assert "does not look like a Cloudflare tunnel token" in message and TOKEN_HELP in message
    if token.strip():
        assert token.strip() not in message


OTHER = encode({**DOCUMENT, "t": "0b8e4c21-6d2f-1c3a", "s": SECRET[::-1]})


@pytest.mark.parametrize(
    "pasted",
    [
        TOKEN,
        f"cloudflared tunnel run --token {TOKEN}",
        f"sudo cloudflared service install {TOKEN}",
        f"cloudflared.exe service install {TOKEN}\n",
        f"  cloudflared tunnel run --token {TOKEN}  \r\n",
        f"cloudflared tunnel run --token={TOKEN}",
        f"cloudflared tunnel run --token '{TOKEN}'",
        f'cloudflared tunnel run --token "{TOKEN}"\t',
        f"cloudflared tunnel run --token {TOKEN} {TOKEN}",  # the same token twice: still one
    ],
    ids=[
        "bare",
        "run-command",
        "service-install",
        "windows-newline",
        "whitespace",
        "token-equals",
        "single-quoted",
        "double-quoted",
        "repeated",
    ],
)
def test_the_dashboard_install_command_gives_its_token(pasted: str) -> None:
    assert check_tunnel_token_shape(pasted) == TOKEN


@pytest.mark.parametrize(
    "pasted",
    [
        f"cloudflared tunnel run --token {TOKEN} {OTHER}",  # which one?
        "cloudflared tunnel run --token",
        "sudo cloudflared service install",
        f"cloudflared tunnel run --token {TOKEN[:-12]}",
    ],
    ids=["two-tokens", "no-token", "install-without-token", "cut-short"],
)
def test_a_command_without_exactly_one_token_is_refused_without_echoing(pasted: str) -> None:
    with pytest.raises(TunnelError) as caught:
        check_tunnel_token_shape(pasted)
    message = str(caught.value)
    assert message.startswith("That does not look like a Cloudflare tunnel token"), message
    assert TOKEN[:16] not in message and OTHER[:16] not in message


@pytest.mark.parametrize("pasted", ["", "\n", "   \t\r\n"])
def test_nothing_pasted_says_nothing_was_read(pasted: str) -> None:
    with pytest.raises(TunnelError) as caught:
        check_tunnel_token_shape(pasted)
    assert str(caught.value) == NOTHING_READ == "Nothing was read: the token was not changed."


def test_the_token_help_says_where_to_get_one_and_how_to_store_it() -> None:
    assert "Zero Trust" in TOKEN_HELP and "Networks → Tunnels" in TOKEN_HELP
    assert "lmgate tunnel set-token --provider cloudflare" in TOKEN_HELP


def test_redaction_hides_the_token_and_any_piece_of_it() -> None:
    redact = Redactor(TOKEN, SECRET)
    assert redact(f"token={TOKEN} ok") == "token=[token] ok"
    assert redact(f"secret {SECRET}") == "secret [token]"
    # A line read in pieces: the head and the rest of the token, each on its own.
    head, rest = TOKEN[:20], TOKEN[20:]
    assert TOKEN[:20] not in redact("x" * 40 + head) and redact("x" * 40 + head).endswith("[token]")
    assert rest[:12] not in redact(rest + " INF next")
    assert redact("nothing secret here") == "nothing secret here"
    assert Redactor()("as is") == "as is"
    assert Redactor(None, "")("as is") == "as is"


def test_the_agent_environment_has_no_inherited_tunnel_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TUNNEL_TOKEN", "someone-elses")
    monkeypatch.setenv("TUNNEL_ORIGIN_CERT", "/elsewhere/cert.pem")
    monkeypatch.setenv("tunnel_metrics", "0.0.0.0:2000")
    monkeypatch.setenv("HOME_OF_TUNNEL_X", "kept")
    quick = agent_environment(None)
    assert not [k for k in quick if k.upper().startswith("TUNNEL_")]
    assert quick["HOME_OF_TUNNEL_X"] == "kept"
    named = agent_environment(TOKEN)
    assert [k for k in named if k.upper().startswith("TUNNEL_")] == ["TUNNEL_TOKEN"]
    assert named["TUNNEL_TOKEN"] == TOKEN


@pytest.mark.parametrize(
    ("line", "sentence"),
    [
        (
            "2026-12-03T10:00:00Z ERR Error unmarshaling QuickTunnel response: error code: 1015 "
            'error="invalid character" status_code="429 Too Many Requests"',
            RATE_LIMITED,
        ),
        (
            'failed to request quick Tunnel: Post "https://api.trycloudflare.com/tunnel": '
            "context deadline exceeded",
            UNREACHABLE,
        ),
        (
            '2026-12-03T10:00:00Z ERR Failed to dial a quic connection error="failed to dial to '
            'edge with quic: timeout: no recent network activity" connIndex=0',
            UNREACHABLE,
        ),
        (
            'ERR Serve tunnel error error="DialContext error: dial tcp 198.41.192.7:7844"',
            UNREACHABLE,
        ),
    ],
)
def test_agent_lines_map_to_sentences(line: str, sentence: str) -> None:
    found = explain(line)
    assert found is not None and found[1] == sentence


def test_an_invalid_token_line_and_the_priorities() -> None:
    invalid = explain("Provided Tunnel token is not valid.")
    unauthorized = explain('ERR Register tunnel error error="Unauthorized: Invalid tunnel secret"')
    limited = explain("429 Too Many Requests")
    unreachable = explain("failed to dial to edge")
    assert invalid is not None and unauthorized is not None
    assert "refused the stored tunnel token" in invalid[1] and invalid == unauthorized
    assert limited is not None and unreachable is not None
    assert limited[0] < invalid[0] < unreachable[0]
    assert explain("INF Registered tunnel connection connIndex=0") is None


def test_the_agent_kind() -> None:
    assert CLOUDFLARED.program == "cloudflared" and CLOUDFLARED.minimum_text == "2023.2.0"
    match = CLOUDFLARED.version.search("cloudflared version 2024.12.2 (built 2024-12-19-1724 UTC)")
    assert match is not None and match.group(1) == "2024.12.2"
