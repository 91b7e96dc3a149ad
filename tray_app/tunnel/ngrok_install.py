"""Installing the ngrok agent, only when the person has said yes (`lmgate tunnel install-agent`).

The download address for this computer comes from pyngrok (``installer.get_ngrok_cdn_url``:
its table of ngrok's stable v3 builds), and the agent lands where pyngrok puts it
(``conf.DEFAULT_NGROK_PATH``), which :func:`tray_app.tunnel.ngrok_agent.candidates` looks at.
The download and unpacking are done here rather than by ``installer.install_ngrok``, which
would need pyngrok's module state changed for a mirror's URL (there is no parameter for it)
and which saves the archive under a predictable name in the shared temporary directory,
leaves it there, unpacks every member of the archive into the agent's directory, and writes
its progress straight to ``sys.stdout`` (absent in a windowed app). Here nothing of pyngrok's
is changed, the archive goes to a private temporary directory, only the ``ngrok`` program is
taken from it, and the new program replaces an old one only after its ``--version`` proves it
(:func:`tray_app.tunnel.ngrok_agent.probe`, run with downloads blocked).

The function itself is the action: callers ask first, and say what will come from where.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from http.client import HTTPException, HTTPMessage
from pathlib import Path
from typing import IO
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import HTTPRedirectHandler, Request, build_opener

from pyngrok import conf, installer
from pyngrok.exception import PyngrokError

from tray_app.config.parsers import download_url_allowed
from tray_app.config.settings import SETTINGS_BY_KEY
from tray_app.errors import TunnelError
from tray_app.tunnel.ngrok_agent import Agent, probe

# An owner-side mirror of ngrok's download for this computer (an archive like ngrok's own).
# Named as the setting `tunnel.ngrok_download_url` would name its variable.
MIRROR_SETTING = "tunnel.ngrok_download_url"
DOWNLOAD_URL_ENV = SETTINGS_BY_KEY[MIRROR_SETTING].env_var
BY_HAND = "install it by hand from https://ngrok.com/download"
DOWNLOAD_TIMEOUT = 30.0  # seconds for connecting and for each read
_MAX_ARCHIVE = 256 * 1024 * 1024  # ngrok's archives are about 10 MB, the program about 30 MB
_MAX_PROGRAM = 512 * 1024 * 1024
_CHUNK = 256 * 1024
MAX_REDIRECTS = 5  # ngrok's CDN and a mirror need one or two


def default_target() -> Path:
    """Where the agent is installed unless told otherwise: pyngrok's own location."""
    return Path(conf.DEFAULT_NGROK_PATH)


def ngrok_download_url(mirror: str = "") -> str:
    """The archive to download: ``mirror`` (tunnel.ngrok_download_url) if set, else ngrok's
    stable v3 build for this system and processor (pyngrok's table)."""
    if mirror.strip():
        return mirror.strip()
    try:
        return installer.get_ngrok_cdn_url("3")
    except PyngrokError as exc:
        raise TunnelError(
            f"ngrok publishes no agent that LM Gate knows for this computer ({exc}): "
            f"{BY_HAND}, then put it on your PATH or set tunnel.ngrok_path."
        ) from None


def install_ngrok_agent(
    target: Path | None = None,
    *,
    download_url: str | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> Agent:
    """Download the ngrok agent, install it at ``target`` (default: pyngrok's location) and
    prove it runs; TunnelError (one sentence with the fix) if any step fails, leaving no
    partial file and an agent already at ``target`` untouched."""
    target = (target or default_target()).expanduser()
    url = download_url or ngrok_download_url()
    say = on_progress or (lambda _line: None)
    archive_kind = _archive_kind(url)
    _check_url(url)
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise TunnelError(
            f"The ngrok agent could not be installed in {target.parent} "
            f"({exc.strerror or exc}): choose a writable place or {BY_HAND}."
        ) from None
    try:
        scratch = tempfile.TemporaryDirectory(prefix="lmgate-ngrok-")
    except OSError as exc:
        raise TunnelError(
            f"The ngrok agent could not be downloaded: no temporary directory could be made "
            f"({exc.strerror or exc}); free some space or {BY_HAND}."
        ) from None
    with scratch as private:
        archive = Path(private) / f"ngrok.{archive_kind}"
        _download(url, archive, say)
        say("Unpacking the ngrok agent...")
        staged = _stage(archive, archive_kind, target, url)
    try:
        say(f"Checking it: {target.name} --version ...")
        found = probe(staged)
        if isinstance(found, str):
            raise TunnelError(
                f"The archive from {url} does not contain a working ngrok agent "
                f"({found.replace(str(staged), installer.get_ngrok_bin())}), so it was not "
                f"installed: {BY_HAND}."
            )
        try:
            staged.replace(target)
        except OSError as exc:
            raise TunnelError(
                f"The ngrok agent could not be put at {target} ({exc.strerror or exc}): "
                f"stop any ngrok running from there and try again, or {BY_HAND}."
            ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
    return Agent(target, found.version)


def _archive_kind(url: str) -> str:
    path = urlsplit(url).path.lower()
    if path.endswith(".zip"):
        return "zip"
    if path.endswith((".tgz", ".tar.gz")):
        return "tgz"
    raise TunnelError(
        f"{url} is not an ngrok archive (its name ends neither in .zip nor in .tgz): use "
        f"ngrok's own download or {BY_HAND}."
    )


def _check_url(url: str) -> None:
    # https to a named host, plain http only to this computer (nothing crosses a network
    # unencrypted), no user name in the address and no spaces or control characters in it.
    if download_url_allowed(url):
        return
    raise TunnelError(
        f"The ngrok agent is downloaded only over https (or from this computer), from an "
        f"address with no user name and no spaces, not from {url!r}: fix {MIRROR_SETTING} "
        f"or {BY_HAND}."
    )


class _CheckedRedirects(HTTPRedirectHandler):
    """Follows a redirect only where the download itself could go (:func:`_check_url`'s rule,
    applied to every hop before it is contacted), never from https down to plain http, and
    at most :data:`MAX_REDIRECTS` times."""

    # urllib's own limits (a loop, too many) would answer first with a multi-line HTTPError.
    max_repeats = max_redirections = MAX_REDIRECTS + 1

    def __init__(self, url: str) -> None:
        super().__init__()
        self._first = url
        self._hops = 0

    def redirect_request(
        self, req: Request, fp: IO[bytes], code: int, msg: str, headers: HTTPMessage, newurl: str
    ) -> Request | None:
        self._hops += 1
        why = _refused_hop(req.full_url, newurl, self._hops)
        if why:
            fp.close()  # the redirect's answer and its connection
            raise TunnelError(
                f"The ngrok agent download from {self._first} was redirected to {newurl!r}, "
                f"which LM Gate does not follow ({why}): fix {MIRROR_SETTING} or {BY_HAND}."
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _refused_hop(old: str, new: str, hops: int) -> str:
    """Why the redirect from ``old`` to ``new`` (the ``hops``-th) is not followed, or ""."""
    if hops > MAX_REDIRECTS:
        return f"more than {MAX_REDIRECTS} redirects"
    if urlsplit(old).scheme == "https" and urlsplit(new).scheme == "http":
        return "it drops from https to plain http"
    if not download_url_allowed(new):
        return "only https, or plain http on this computer, with no user name or spaces"
    return ""


def _download(url: str, archive: Path, say: Callable[[str], None]) -> None:
    def failed(why: str, fix: str = "check the connection and try again") -> TunnelError:
        return TunnelError(
            f"The ngrok agent could not be downloaded from {url} ({why}): {fix}, or {BY_HAND}."
        )

    say(f"Downloading {url} ...")
    try:
        # https (or loopback http), checked above and at every redirect (_CheckedRedirects);
        # the URL is ngrok's or the owner's mirror.
        request = Request(url, headers={"User-Agent": "lmgate"})  # noqa: S310
        opener = build_opener(_CheckedRedirects(url))
        with opener.open(request, timeout=DOWNLOAD_TIMEOUT) as answer:
            final = answer.geturl()
            if final != url:
                _check_url(final)  # checked at every hop already; the last once more
            length = _length(answer.headers.get("Content-Length"))
            if length is not None and length > _MAX_ARCHIVE:
                raise failed(f"it is {length} bytes, far more than an ngrok archive")
            _copy(answer, archive, length, say, failed)
    except TunnelError:
        raise
    except HTTPError as exc:
        exc.close()  # it holds the answer and its connection
        raise failed(f"the server answered {exc.code} {exc.reason}") from None
    except URLError as exc:
        raise failed(f"it could not be reached: {_reason(exc.reason)}") from None
    except TimeoutError:
        raise failed(f"no answer within {DOWNLOAD_TIMEOUT:g} s") from None
    except (HTTPException, ValueError) as exc:
        raise failed(f"the download broke off: {exc or type(exc).__name__}") from None
    except OSError as exc:  # the connection broke (writing errors are caught in _copy)
        raise failed(_reason(exc)) from None


def _length(header: str | None) -> int | None:
    try:
        return int(header) if header else None
    except ValueError:
        return None


def _reason(reason: object) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason)


def _copy(
    answer: IO[bytes],
    archive: Path,
    length: int | None,
    say: Callable[[str], None],
    failed: Callable[..., TunnelError],
) -> None:
    size = 0
    shown = 0
    with archive.open("wb") as handle:
        while chunk := answer.read(_CHUNK):
            size += len(chunk)
            if size > _MAX_ARCHIVE:
                raise failed("it is far larger than an ngrok archive")
            try:
                handle.write(chunk)
            except OSError as exc:
                raise failed(_reason(exc), "free some space and try again") from None
            if length:
                percent = min(100, size * 100 // length)
                if percent >= shown + 10:
                    shown = percent - percent % 10
                    say(f"Downloaded {shown}% of {_megabytes(length)}")
    if length is not None and size != length:
        raise failed(f"it ended after {size} of {length} bytes")
    if not length:
        say(f"Downloaded {_megabytes(size)}")


def _megabytes(size: int) -> str:
    if size < 100_000:
        return f"{max(1, round(size / 1000))} kB"
    return f"{size / 1_000_000:.1f} MB"


def _stage(archive: Path, kind: str, target: Path, url: str) -> Path:
    """The archive's ngrok program, copied next to ``target`` (mode 0700) under a temporary
    name; TunnelError if the archive holds none."""
    program = installer.get_ngrok_bin()

    def refused(why: str) -> TunnelError:
        return TunnelError(
            f"The download from {url} is not an ngrok agent archive ({why}), so nothing was "
            f"installed: {BY_HAND}."
        )

    try:
        fd, name = tempfile.mkstemp(prefix=f".{program}-", suffix=".new", dir=target.parent)
    except OSError as exc:
        raise TunnelError(
            f"The ngrok agent could not be written to {target.parent} "
            f"({exc.strerror or exc}): choose a writable place or {BY_HAND}."
        ) from None
    staged = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            staged.chmod(0o700)
            try:
                if kind == "zip":
                    _copy_from_zip(archive, program, out, refused)
                else:
                    _copy_from_tar(archive, program, out, refused)
            except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
                raise refused(f"it cannot be unpacked: {exc}") from None
            except OSError as exc:
                raise TunnelError(
                    f"The ngrok agent could not be written to {target.parent} "
                    f"({exc.strerror or exc}): free some space or {BY_HAND}."
                ) from None
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged


def _copy_from_zip(
    archive: Path, program: str, out: IO[bytes], refused: Callable[[str], TunnelError]
) -> None:
    with zipfile.ZipFile(archive) as bundle:
        try:
            member = bundle.getinfo(program)
        except KeyError:
            raise refused(f"it holds no `{program}`") from None
        if member.is_dir() or stat.S_ISLNK(member.external_attr >> 16):
            raise refused(f"its `{program}` is not a program file")
        if member.file_size > _MAX_PROGRAM:
            raise refused(f"its `{program}` is far too large")
        with bundle.open(member) as source:
            _bounded_copy(source, out, refused)


def _copy_from_tar(
    archive: Path, program: str, out: IO[bytes], refused: Callable[[str], TunnelError]
) -> None:
    with tarfile.open(archive, "r:gz") as bundle:
        try:
            member = bundle.getmember(program)
        except KeyError:
            raise refused(f"it holds no `{program}`") from None
        if not member.isreg():
            raise refused(f"its `{program}` is not a program file")
        if member.size > _MAX_PROGRAM:
            raise refused(f"its `{program}` is far too large")
        source = bundle.extractfile(member)
        if source is None:
            raise refused(f"its `{program}` cannot be read")
        with source:
            _bounded_copy(source, out, refused)


def _bounded_copy(source: IO[bytes], out: IO[bytes], refused: Callable[[str], TunnelError]) -> None:
    copied = 0
    while chunk := source.read(_CHUNK):
        copied += len(chunk)
        if copied > _MAX_PROGRAM:
            raise refused("its program is far too large")
        out.write(chunk)
    if copied == 0:
        raise refused("its program is empty")
