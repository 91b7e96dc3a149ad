"""Installing the ngrok agent on request, from a local aiohttp server standing in for ngrok's
download site: what comes out is proven by its --version before it replaces anything, and
pyngrok's own module state is left as it was."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import stat
import sys
import tarfile
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from http.client import HTTPMessage
from pathlib import Path
from typing import Any
from urllib.request import Request

import pytest
from aiohttp import web
from pyngrok import conf, installer

from tests.helpers import FAKE_NGROK_AGENT
from tray_app.errors import TunnelError
from tray_app.tunnel.ngrok_agent import Agent, find_agent
from tray_app.tunnel.ngrok_install import (
    DOWNLOAD_URL_ENV,
    MAX_REDIRECTS,
    MIRROR_SETTING,
    _check_url,
    _CheckedRedirects,
    default_target,
    install_ngrok_agent,
    ngrok_download_url,
)

NOT_AN_AGENT = b"#!/bin/sh\necho hello\n"


def tgz(members: dict[str, bytes], *, links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            bundle.addfile(info, io.BytesIO(data))
        for name, points_to in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = points_to
            bundle.addfile(info)
    return buffer.getvalue()


def zipped(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | 0o755) << 16
            bundle.writestr(info, data)
    return buffer.getvalue()


AGENT_BYTES = FAKE_NGROK_AGENT.read_bytes()


class DownloadSite:
    """Serves the archives put in ``files``, redirects the paths in ``redirects`` (to the
    address given) and records every path asked for."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.requests: list[str] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{name:.*}", self._serve)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _serve(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        if request.path in self.redirects:
            raise web.HTTPFound(self.redirects[request.path])
        body = self.files.get(request.path)
        if body is None:
            raise web.HTTPNotFound()
        return web.Response(body=body, content_type="application/octet-stream")

    def offer(self, path: str, body: bytes) -> str:
        self.files[path] = body
        return self.url + path


@pytest.fixture
async def site() -> AsyncIterator[DownloadSite]:
    served = DownloadSite()
    await served.start()
    yield served
    await served.stop()


@pytest.fixture
def pyngrok_state() -> Iterator[Callable[[], None]]:
    """A check that pyngrok's download table and switches are what they were."""
    before = (dict(installer.PLATFORMS), installer.CDN_URL_PREFIX, conf.DEFAULT_NGROK_PATH)
    progress = installer._print_progress_enabled

    def unchanged() -> None:
        after = (dict(installer.PLATFORMS), installer.CDN_URL_PREFIX, conf.DEFAULT_NGROK_PATH)
        assert (after, installer._print_progress_enabled) == (before, progress)

    yield unchanged
    unchanged()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pyngrok's agent location moved into tmp_path, and a PATH holding only python3 (which the
    fake agent's #! line needs), so find_agent() can look only where the install put it."""
    target = tmp_path / "ngrok-home" / "ngrok"
    monkeypatch.setattr(conf, "DEFAULT_NGROK_PATH", str(target))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(os.path.realpath(sys.executable))
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv(DOWNLOAD_URL_ENV, raising=False)
    for proxy in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(proxy.upper(), raising=False)
        monkeypatch.delenv(proxy, raising=False)  # the download site is on this machine
    return target


async def install(url: str, target: Path | None = None) -> tuple[Agent, list[str]]:
    lines: list[str] = []
    agent = await asyncio.to_thread(
        install_ngrok_agent, target, download_url=url, on_progress=lines.append
    )
    return agent, lines


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


@pytest.mark.parametrize(
    ("name", "archive"),
    [
        ("ngrok-v3-stable-linux-amd64.tgz", tgz({"ngrok": AGENT_BYTES})),
        ("ngrok-v3-stable-darwin-arm64.zip", zipped({"ngrok": AGENT_BYTES})),
    ],
)
async def test_installs_proves_and_is_then_found(
    name: str,
    archive: bytes,
    site: DownloadSite,
    home: Path,
    pyngrok_state: Callable[[], None],
) -> None:
    assert default_target() == home
    url = site.offer(f"/c/{name}", archive)
    agent, lines = await install(url)
    assert (agent.path, agent.version) == (home, "3.19.1")
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert home.read_bytes() == AGENT_BYTES
    assert leftovers(home.parent) == ["ngrok"]  # nothing else unpacked or left behind
    assert lines[0] == f"Downloading {url} ..."
    assert any(line.startswith("Downloaded 100% of") for line in lines), lines
    assert find_agent() == agent
    assert site.requests == [f"/c/{name}"]
    pyngrok_state()


async def test_only_the_program_is_taken_from_the_archive(site: DownloadSite, home: Path) -> None:
    archive = tgz({"../escaped": b"x", "LICENSE": b"text", "ngrok": AGENT_BYTES})
    agent, _ = await install(site.offer("/ngrok.tgz", archive))
    assert agent.path == home
    assert leftovers(home.parent) == ["ngrok"]
    assert not (home.parent.parent / "escaped").exists()


async def test_a_missing_download_is_one_sentence_with_the_fix(
    site: DownloadSite, home: Path, pyngrok_state: Callable[[], None]
) -> None:
    url = site.url + "/gone/ngrok-v3-stable-linux-amd64.tgz"
    with pytest.raises(TunnelError) as raised:
        await install(url)
    assert str(raised.value) == (
        f"The ngrok agent could not be downloaded from {url} (the server answered 404 Not "
        "Found): check the connection and try again, or install it by hand from "
        "https://ngrok.com/download."
    )
    assert not home.exists()
    pyngrok_state()


async def test_no_server_is_one_sentence(home: Path, unused_tcp_port: int) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}/ngrok.tgz"
    with pytest.raises(TunnelError) as raised:
        await install(url)
    message = str(raised.value)
    assert message.startswith(f"The ngrok agent could not be downloaded from {url} (it could")
    assert message.endswith("install it by hand from https://ngrok.com/download.")
    assert "refused" in message.lower()


async def test_plain_http_to_another_machine_is_refused_before_connecting(home: Path) -> None:
    url = "http://downloads.example.invalid/ngrok.tgz"
    with pytest.raises(TunnelError) as raised:
        await install(url)
    assert "downloaded only over https" in str(raised.value)
    assert MIRROR_SETTING in str(raised.value)


@pytest.mark.parametrize(
    ("archive", "why"),
    [
        (tgz({"ngrok": NOT_AN_AGENT}), "did not print an ngrok version"),
        (tgz({"README": b"no agent here"}), "it holds no `ngrok`"),
        (tgz({}, links={"ngrok": "/bin/sh"}), "its `ngrok` is not a program file"),
        (b"not an archive at all", "it cannot be unpacked"),
    ],
    ids=["not-an-agent", "no-program", "a-symlink", "garbage"],
)
async def test_an_archive_without_a_working_agent_is_refused_and_removed(
    archive: bytes,
    why: str,
    site: DownloadSite,
    home: Path,
    pyngrok_state: Callable[[], None],
) -> None:
    # An agent already installed stays as it was.
    await install(site.offer("/good/ngrok.tgz", tgz({"ngrok": AGENT_BYTES})))
    url = site.offer("/bad/ngrok.tgz", archive)
    with pytest.raises(TunnelError) as raised:
        await install(url)
    message = str(raised.value)
    assert why in message, message
    assert message.endswith("install it by hand from https://ngrok.com/download.")
    assert message.count(". ") == 0  # one sentence
    assert leftovers(home.parent) == ["ngrok"]
    assert home.read_bytes() == AGENT_BYTES
    pyngrok_state()


async def test_an_explicit_target_and_the_mirror_variable(
    site: DownloadSite, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = site.offer("/mirror/ngrok.zip", zipped({"ngrok": AGENT_BYTES}))
    assert ngrok_download_url(f"  {url} ") == url
    target = tmp_path / "tools" / "ngrok"
    agent = await asyncio.to_thread(install_ngrok_agent, target, download_url=url)
    assert agent == Agent(target, "3.19.1")
    assert site.requests == ["/mirror/ngrok.zip"]
    assert not home.exists()


def test_the_default_url_is_pyngrok_s_for_this_computer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DOWNLOAD_URL_ENV, "https://mirror.example/ngrok.tgz")  # read by config only
    assert ngrok_download_url() == installer.get_ngrok_cdn_url("3")
    assert ngrok_download_url().startswith("https://")


# ---- where a download may go, at its start and at every redirect ---------------------------

REFUSED_HOP = (
    "The ngrok agent download from {first} was redirected to {new!r}, which LM Gate does not "
    "follow ({why}): fix tunnel.ngrok_download_url or install it by hand from "
    "https://ngrok.com/download."
)
ELSEWHERE = "only https, or plain http on this computer, with no user name or spaces"


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every (host, port) the download connects to (http.client's socket.create_connection)."""
    made: list[tuple[str, int]] = []
    real = socket.create_connection

    def recording(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        made.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", recording)
    return made


@pytest.mark.parametrize(
    "url",
    [
        "https://cdn.example/ngrok.tgz",
        "http://127.0.0.1:8/ngrok.tgz",
        "http://[::1]:8/ngrok.zip",
        "http://localhost/ngrok.tgz",
    ],
)
def test_a_download_address_that_is_allowed(url: str) -> None:
    _check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.com@127.0.0.1/a.zip",  # urlsplit: 127.0.0.1; urllib: "evil.com@127.0.0.1"
        "https://user:pw@cdn.example/ngrok.tgz",
        "http://127.0.0.1.evil.com/ngrok.tgz",
        "https://cdn.example/a b.tgz",
        "https://cdn.example/a\tb.tgz",
        "https://cdn.example/\x00.tgz",
        "ftp://cdn.example/ngrok.tgz",
        "http://10.0.0.1/ngrok.tgz",
    ],
)
async def test_a_download_address_that_is_refused_before_connecting(
    url: str, home: Path, connections: list[tuple[str, int]]
) -> None:
    with pytest.raises(TunnelError) as raised:
        await install(url)
    assert (str(raised.value), connections) == (
        "The ngrok agent is downloaded only over https (or from this computer), from an "
        f"address with no user name and no spaces, not from {url!r}: fix "
        "tunnel.ngrok_download_url or install it by hand from https://ngrok.com/download.",
        [],
    )
    assert not home.exists()


@pytest.mark.parametrize(
    "elsewhere",
    ["http://downloads.example.invalid/ngrok.tgz", "http://evil.com@127.0.0.1:{port}/a.tgz"],
)
async def test_a_redirect_to_plain_http_elsewhere_is_refused_before_connecting(
    elsewhere: str, site: DownloadSite, home: Path, connections: list[tuple[str, int]]
) -> None:
    port = int(site.url.rsplit(":", 1)[1])
    elsewhere = elsewhere.format(port=port)
    url = site.url + "/r/ngrok.tgz"
    site.redirects["/r/ngrok.tgz"] = elsewhere
    site.offer("/a.tgz", tgz({"ngrok": AGENT_BYTES}))
    with pytest.raises(TunnelError) as raised:
        await install(url)
    assert (str(raised.value), connections, site.requests) == (
        REFUSED_HOP.format(first=url, new=elsewhere, why=ELSEWHERE),
        [("127.0.0.1", port)],  # only the site that redirected
        ["/r/ngrok.tgz"],
    )
    assert not home.exists()


async def test_a_redirect_from_one_loopback_name_to_another_installs(
    site: DownloadSite, home: Path
) -> None:
    port = int(site.url.rsplit(":", 1)[1])
    final = site.offer("/c/ngrok.tgz", tgz({"ngrok": AGENT_BYTES}))
    site.redirects["/r/ngrok.tgz"] = final
    agent, _ = await install(f"http://localhost:{port}/r/ngrok.tgz")
    assert (agent.path, site.requests) == (home, ["/r/ngrok.tgz", "/c/ngrok.tgz"])
    assert home.read_bytes() == AGENT_BYTES


@pytest.mark.parametrize("hops", [MAX_REDIRECTS, MAX_REDIRECTS + 1])
async def test_at_most_a_few_redirects_are_followed(
    hops: int, site: DownloadSite, home: Path
) -> None:
    for hop in range(hops):
        site.redirects[f"/hop{hop}/ngrok.tgz"] = f"/hop{hop + 1}/ngrok.tgz"  # relative
    site.offer(f"/hop{hops}/ngrok.tgz", tgz({"ngrok": AGENT_BYTES}))
    url = site.url + "/hop0/ngrok.tgz"
    if hops <= MAX_REDIRECTS:
        agent, _ = await install(url)
        assert (agent.path, len(site.requests)) == (home, hops + 1)
        return
    with pytest.raises(TunnelError) as raised:
        await install(url)
    last = f"{site.url}/hop{MAX_REDIRECTS + 1}/ngrok.tgz"
    assert (str(raised.value), len(site.requests)) == (
        REFUSED_HOP.format(first=url, new=last, why=f"more than {MAX_REDIRECTS} redirects"),
        MAX_REDIRECTS + 1,
    )
    assert not home.exists()


async def test_a_redirect_loop_is_one_sentence(site: DownloadSite, home: Path) -> None:
    url = site.url + "/loop/ngrok.tgz"
    site.redirects["/loop/ngrok.tgz"] = url
    with pytest.raises(TunnelError) as raised:
        await install(url)
    assert str(raised.value) == REFUSED_HOP.format(
        first=url, new=url, why=f"more than {MAX_REDIRECTS} redirects"
    )


@pytest.mark.parametrize(
    ("new", "why"),
    [
        ("http://127.0.0.1:8/ngrok.tgz", "it drops from https to plain http"),
        ("http://mirror.example/ngrok.tgz", "it drops from https to plain http"),
        ("https://user@mirror.example/ngrok.tgz", ELSEWHERE),
        ("https://mirror.example/ngrok.tgz", ""),
    ],
)
def test_a_redirect_from_https_stays_on_https(new: str, why: str) -> None:
    # No local https server with a trusted certificate: the handler is asked directly.
    first = "https://cdn.example/ngrok.tgz"
    answer = io.BytesIO(b"redirecting")
    handler = _CheckedRedirects(first)
    if not why:
        followed = handler.redirect_request(
            Request(first), answer, 302, "Found", HTTPMessage(), new
        )
        assert (followed.full_url if followed else None, answer.closed) == (new, False)
        return
    with pytest.raises(TunnelError) as raised:
        handler.redirect_request(Request(first), answer, 302, "Found", HTTPMessage(), new)
    assert (str(raised.value), answer.closed) == (
        REFUSED_HOP.format(first=first, new=new, why=why),
        True,
    )
