"""`lmgate tunnel set-token|delete-token [--provider ngrok|cloudflare]` and `lmgate tunnel
install-agent [--yes]`, run in this process (a real terminal only where echo matters), the
agent's download coming from a local server standing in for ngrok's site."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import pty
import secrets
import select
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyngrok import conf, installer

from tests.helpers import LMGATE, Env
from tests.integration.cli.in_process import Run
from tests.integration.tunnel.test_ngrok_install import AGENT_BYTES, DownloadSite, tgz
from tray_app.tunnel.ngrok_install import DOWNLOAD_URL_ENV

NGROK_TOKEN = "2fakeAuthToken_" + secrets.token_hex(12)
CLOUDFLARE_TOKEN = base64.b64encode(
    json.dumps(
        {
            "a": "0123456789abcdef0123456789abcdef",
            "t": "6d2f1c3a-0b8e-4c21-9f3e-2a7c5d9e1b04",
            "s": base64.b64encode(secrets.token_bytes(32)).decode(),
        }
    ).encode()
).decode()
ANOTHER_CLOUDFLARE_TOKEN = base64.b64encode(
    json.dumps({"a": "f" * 32, "t": "0b8e4c21-6d2f-1c3a", "s": secrets.token_hex(32)}).encode()
).decode()
STORED = {"ngrok": "ngrok-authtoken", "cloudflare": "cloudflare-tunnel-token"}


class TerminalInput(io.StringIO):
    """What a person types at a terminal: stdin that says it is one."""

    def isatty(self) -> bool:
        return True


def typed(monkeypatch: pytest.MonkeyPatch, text: str, *, terminal: bool = False) -> None:
    monkeypatch.setattr(sys, "stdin", TerminalInput(text) if terminal else io.StringIO(text))


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    return tmp_path / "secrets"  # the lmgate fixture's file store


@pytest.mark.parametrize(
    ("provider", "token", "said"),
    [
        (None, NGROK_TOKEN, "Go public with `lmgate serve --tunnel ngrok`."),
        ("ngrok", NGROK_TOKEN, "Go public with `lmgate serve --tunnel ngrok`."),
        (
            "cloudflare",
            CLOUDFLARE_TOKEN,
            "Go public with `lmgate serve --tunnel cloudflare-named --cloudflare-hostname "
            "HOSTNAME`, HOSTNAME being the public hostname you routed to the tunnel (or set "
            "tunnel.cloudflare_hostname).",
        ),
    ],
    ids=["default", "ngrok", "cloudflare"],
)
def test_set_and_delete_a_token(
    provider: str | None,
    token: str,
    said: str,
    lmgate: Run,
    secrets_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flags = ["--provider", provider] if provider else []
    stored = secrets_dir / STORED[provider or "ngrok"]
    typed(monkeypatch, f"  {token}  \n")
    code, out, err = lmgate("tunnel", "set-token", *flags)
    assert (code, err) == (0, ""), err
    assert out.endswith(said + "\n"), out
    assert token not in out
    assert stored.read_text().strip() == token
    assert stored.stat().st_mode & 0o777 == 0o600
    others = set(STORED.values()) - {stored.name}
    assert not any((secrets_dir / name).exists() for name in others)
    code, out, err = lmgate("tunnel", "delete-token", *flags)
    assert (code, err) == (0, ""), err
    assert "was removed" in out
    assert not stored.exists()


def test_the_cloudflare_next_step_names_the_configured_hostname(
    lmgate: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMGATE_TUNNEL_CLOUDFLARE_HOSTNAME", "chat.example.com")
    typed(monkeypatch, CLOUDFLARE_TOKEN + "\n")
    code, out, _ = lmgate("tunnel", "set-token", "--provider", "cloudflare")
    assert code == 0
    assert out.endswith(
        "Go public with `lmgate serve --tunnel cloudflare-named` "
        "(tunnel.cloudflare_hostname is chat.example.com).\n"
    ), out


@pytest.mark.parametrize(
    "malformed",
    [
        "not a token",
        NGROK_TOKEN,  # the other provider's
        base64.b64encode(json.dumps({"a": "x" * 32, "t": "y" * 20}).encode()).decode(),
        CLOUDFLARE_TOKEN[:-12] + "!!!!",
        f"cloudflared tunnel run --token {CLOUDFLARE_TOKEN} {ANOTHER_CLOUDFLARE_TOKEN}",
        "sudo cloudflared service install",
    ],
    ids=["words", "an-ngrok-token", "no-secret", "broken", "two-tokens", "command-no-token"],
)
def test_a_malformed_cloudflare_token_is_refused_and_not_stored(
    malformed: str, lmgate: Run, secrets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    typed(monkeypatch, malformed + "\n")
    code, out, err = lmgate("tunnel", "set-token", "--provider", "cloudflare")
    assert (code, out) == (1, "")
    assert err.startswith("lmgate: That does not look like a Cloudflare tunnel token"), err
    assert err.count("\n") == 1
    assert not malformed or malformed not in err
    assert CLOUDFLARE_TOKEN[:16] not in err and ANOTHER_CLOUDFLARE_TOKEN[:16] not in err
    assert not (secrets_dir / STORED["cloudflare"]).exists()


@pytest.mark.parametrize(
    "command",
    [
        f"cloudflared tunnel run --token {CLOUDFLARE_TOKEN}",
        f"sudo cloudflared service install {CLOUDFLARE_TOKEN}",
    ],
    ids=["run", "service-install"],
)
def test_the_dashboards_install_command_pasted_stores_its_token(
    command: str, lmgate: Run, secrets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    typed(monkeypatch, f"  {command} \r\n")
    code, out, err = lmgate("tunnel", "set-token", "--provider", "cloudflare")
    assert (code, err) == (0, ""), err
    assert out.startswith("The Cloudflare tunnel token is stored (file)."), out
    assert CLOUDFLARE_TOKEN[:16] not in out
    assert (secrets_dir / STORED["cloudflare"]).read_text().strip() == CLOUDFLARE_TOKEN


@pytest.mark.parametrize("provider", ["ngrok", "cloudflare"])
@pytest.mark.parametrize("line", ["", "\n", "   \n"], ids=["end-of-input", "empty", "blank"])
def test_nothing_typed_changes_nothing(
    provider: str, line: str, lmgate: Run, secrets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = {"ngrok": NGROK_TOKEN, "cloudflare": CLOUDFLARE_TOKEN}[provider]
    typed(monkeypatch, token + "\n")
    assert lmgate("tunnel", "set-token", "--provider", provider)[0] == 0
    typed(monkeypatch, line)
    code, out, err = lmgate("tunnel", "set-token", "--provider", provider)
    assert (code, out, err) == (1, "", "lmgate: Nothing was read: the token was not changed.\n")
    assert (secrets_dir / STORED[provider]).read_text().strip() == token


@pytest.mark.parametrize("provider", ["ngrok", "cloudflare"])
def test_ctrl_d_at_the_terminal_prompt_is_a_clean_refusal(provider: str, env: Env) -> None:
    """A real pseudo-terminal: Ctrl-D at getpass's prompt raised EOFError, a traceback."""
    token = {"ngrok": NGROK_TOKEN, "cloudflare": CLOUDFLARE_TOKEN}[provider]
    stored = env.data.parent / "secrets" / STORED[provider]
    piped = env.run("tunnel", "set-token", "--provider", provider, stdin=token + "\n")
    assert piped.returncode == 0, piped.stderr
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [LMGATE, "tunnel", "set-token", "--provider", provider],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env.vars,
        start_new_session=True,  # the pty becomes its controlling terminal: /dev/tty is it
    )
    os.close(terminal)
    seen = b""
    try:
        seen += read_until(controller, b"token: ")
        os.write(controller, b"\x04")  # Ctrl-D on an empty line: end of input
        seen += read_until(controller, None)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
    text = seen.decode(errors="replace")
    assert (code, "Traceback" in text) == (1, False), text
    assert text.rstrip().endswith("lmgate: Nothing was read: the token was not changed."), text
    assert stored.read_text().strip() == token, "nothing stored, nothing deleted"


def test_a_cloudflare_token_typed_at_a_terminal_is_not_echoed(env: Env) -> None:
    """A real pseudo-terminal: getpass turns echo off, so the token never reaches the screen."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [LMGATE, "tunnel", "set-token", "--provider", "cloudflare"],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env.vars,
        start_new_session=True,  # the pty becomes its controlling terminal: /dev/tty is it
    )
    os.close(terminal)
    seen = b""
    try:
        seen += read_until(controller, b"Cloudflare tunnel token: ")
        os.write(controller, CLOUDFLARE_TOKEN.encode() + b"\n")
        seen += read_until(controller, b"Go public with")
        seen += read_until(controller, None)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
    text = seen.decode(errors="replace")
    assert "The Cloudflare tunnel token is stored (file)" in text
    assert CLOUDFLARE_TOKEN not in text and CLOUDFLARE_TOKEN[:16] not in text
    stored = env.data.parent / "secrets" / STORED["cloudflare"]
    assert stored.read_text().strip() == CLOUDFLARE_TOKEN


def read_until(controller: int, wanted: bytes | None, timeout: float = 30) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.1)
        if not ready:
            continue
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the other end closed
            break
        if not chunk:
            break
        data += chunk
        if wanted is not None and wanted in data:
            break
    return data


# --- install-agent ------------------------------------------------------------------------


@dataclass
class Offered:
    site: DownloadSite
    target: Path


@pytest.fixture
async def offered(
    lmgate: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Offered]:
    """A download site offering a good archive through $LMGATE_TUNNEL_NGROK_DOWNLOAD_URL, and
    pyngrok's agent location (the install's target) moved into tmp_path."""
    site = DownloadSite()
    await site.start()
    archive = tgz({"ngrok": AGENT_BYTES})
    monkeypatch.setenv(DOWNLOAD_URL_ENV, site.offer("/mirror/ngrok.tgz", archive))
    target = tmp_path / "ngrok-home" / "ngrok"
    monkeypatch.setattr(conf, "DEFAULT_NGROK_PATH", str(target))
    bin_dir = tmp_path / "bin"  # only python3, for the fake agent's #! line: no other ngrok
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(os.path.realpath(sys.executable))
    monkeypatch.setenv("PATH", str(bin_dir))
    for proxy in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(proxy.upper(), raising=False)
        monkeypatch.delenv(proxy, raising=False)  # the download site is on this machine
    yield Offered(site, target)
    await site.stop()


async def in_thread(lmgate: Run, *args: str) -> tuple[int, str, str]:
    """The CLI blocks while it downloads; the download site runs on this test's loop."""
    return await asyncio.to_thread(lmgate, *args)


async def test_without_a_terminal_or_yes_nothing_is_downloaded(
    lmgate: Run,
    offered: Offered,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    site, target = offered.site, offered.target
    typed(monkeypatch, "y\n")  # piped: not an answer to a question nobody saw
    code, out, err = await in_thread(lmgate, "tunnel", "install-agent")
    assert code == 2
    assert err == (
        "lmgate: there is no terminal to ask on, so nothing was downloaded: run `lmgate tunnel "
        "install-agent --yes` to agree, or install it by hand from https://ngrok.com/download\n"
    )
    assert f"from {site.url}/mirror/ngrok.tgz" in out
    assert site.requests == []
    assert not target.exists()


@pytest.mark.parametrize("answer", ["\n", "n\n", "no\n", "", "yes please\n"])
async def test_anything_but_yes_downloads_nothing(
    answer: str,
    lmgate: Run,
    offered: Offered,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    typed(monkeypatch, answer, terminal=True)
    code, out, _ = await in_thread(lmgate, "tunnel", "install-agent")
    last = out.splitlines()[-1]
    assert (code, last) == (1, "Download and install it? [y/N] Nothing was downloaded.")
    assert offered.site.requests == []
    assert not offered.target.exists()


@pytest.mark.parametrize("answer", ["y\n", "Y\n", " yes \n"])
async def test_yes_at_the_terminal_installs_and_proves_it(
    answer: str,
    lmgate: Run,
    offered: Offered,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    site, target = offered.site, offered.target
    platforms = dict(installer.PLATFORMS)
    typed(monkeypatch, answer, terminal=True)
    code, out, err = await in_thread(lmgate, "tunnel", "install-agent")
    assert (code, err) == (0, ""), err
    url = f"{site.url}/mirror/ngrok.tgz"
    lines = out.splitlines()
    assert lines[:2] == [
        f"This downloads the ngrok agent from {url}",
        f"and installs it as {target}.",
    ]
    assert lines[2].startswith("Download and install it? [y/N] Downloading " + url)
    assert "Unpacking the ngrok agent..." in lines
    assert f"Installed ngrok 3.19.1 at {target}." in lines
    assert lines[-1].startswith("Next: `lmgate tunnel set-token`")
    assert site.requests == ["/mirror/ngrok.tgz"]
    assert target.read_bytes() == AGENT_BYTES and os.access(target, os.X_OK)
    assert dict(installer.PLATFORMS) == platforms


async def test_yes_flag_installs_and_a_second_run_says_what_it_replaces(
    lmgate: Run, offered: Offered
) -> None:
    site, target = offered.site, offered.target
    code, out, err = await in_thread(lmgate, "tunnel", "install-agent", "--yes")
    assert (code, err) == (0, ""), err
    assert "Download and install it?" not in out
    code, out, err = await in_thread(lmgate, "tunnel", "install-agent", "--yes")
    assert (code, err) == (0, ""), err
    assert out.splitlines()[:3] == [
        f"LM Gate already finds ngrok 3.19.1 at {target}.",
        f"This downloads the ngrok agent from {site.url}/mirror/ngrok.tgz",
        f"and installs it as {target} (replacing the one there).",
    ]
    assert len(site.requests) == 2


async def test_a_configured_agent_elsewhere_is_named_after_installing(
    lmgate: Run,
    offered: Offered,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    elsewhere = tmp_path / "tools" / "ngrok"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(AGENT_BYTES)
    elsewhere.chmod(0o700)
    monkeypatch.setenv("LMGATE_TUNNEL_NGROK_PATH", str(elsewhere))
    code, out, err = await in_thread(lmgate, "tunnel", "install-agent", "--yes")
    assert (code, err) == (0, ""), err
    assert (
        f"LM Gate still uses ngrok 3.19.1 at {elsewhere} (tunnel.ngrok_path names it): set "
        f"tunnel.ngrok_path to {offered.target} to use the new one."
    ) in out


async def test_a_failed_download_is_one_line_and_installs_nothing(
    lmgate: Run,
    offered: Offered,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = offered.site.url + "/mirror/missing.tgz"
    monkeypatch.setenv(DOWNLOAD_URL_ENV, url)
    code, _, err = await in_thread(lmgate, "tunnel", "install-agent", "--yes")
    assert (code, err) == (
        1,
        f"lmgate: The ngrok agent could not be downloaded from {url} (the server answered 404 "
        "Not Found): check the connection and try again, or install it by hand from "
        "https://ngrok.com/download.\n",
    )
    assert not offered.target.parent.exists() or not any(offered.target.parent.iterdir())
