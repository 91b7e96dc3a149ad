"""Attacks the security suite names that other files do not yet cover — request smuggling,
oversized headers — and faults: a corrupt or locked database, and a process killed mid-write."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import GatewayFactory, IdentityFactory, auth_headers
from tests.fake_lmstudio import FakeLMStudio
from tests.helpers import LMGATE, REPO_ROOT, Env, start_serve
from tray_app.errors import StorageError
from tray_app.gateway.server.runner import GatewayServer
from tray_app.storage.database import Database


async def send_raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()
        await writer.wait_closed()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# ---- request smuggling ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "framing",
    [
        # Content-Length and Transfer-Encoding together: the classic CL.TE / TE.CL desync.
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 60\r\n",
        # Two different Content-Lengths.
        b"Content-Length: 13\r\nContent-Length: 60\r\n",
        # An obfuscated Transfer-Encoding.
        b"Transfer-Encoding: xchunked\r\n",
        b"Transfer-Encoding : chunked\r\n",
    ],
)
async def test_conflicting_framing_is_refused_and_nothing_is_smuggled(
    gateway: GatewayServer, fake_lmstudio: FakeLMStudio, framing: bytes
) -> None:
    hidden = b"POST /api/v1/models/load HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    body = b"0\r\n\r\n" + hidden
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {auth_headers()['Authorization'][7:]}\r\n".encode()
        + framing
        + b"\r\n"
        + body
    )
    answer = await send_raw(gateway.port or 0, request)
    assert status_of(answer) in {400, 404, 413, 501}
    assert all("/api/" not in r.path for r in fake_lmstudio.received), "a request was smuggled"
    assert all(r.path == "/v1/chat/completions" for r in fake_lmstudio.received)


async def test_oversized_headers_are_refused(
    gateway: GatewayServer, fake_lmstudio: FakeLMStudio
) -> None:
    huge = b"X-Big: " + b"a" * 70_000 + b"\r\n"
    answer = await send_raw(
        gateway.port or 0, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + huge + b"\r\n"
    )
    assert status_of(answer) in {400, 431}
    many = b"".join(f"X-H{i}: v\r\n".encode() for i in range(2000))
    answer = await send_raw(
        gateway.port or 0, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n"
    )
    assert status_of(answer) in {200, 400, 401, 431}
    assert fake_lmstudio.received == [] or all(
        r.path == "/v1/models" for r in fake_lmstudio.received
    )


async def test_gateway_keeps_serving_after_attacks(start_gateway: GatewayFactory) -> None:
    server = await start_gateway()
    for _ in range(3):
        await send_raw(server.port or 0, b"GARBAGE\r\n\r\n")
        await send_raw(
            server.port or 0,
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n",
        )
    answer = await send_raw(server.port or 0, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(answer) == 200


# ---- the database ---------------------------------------------------------------------------


def test_a_corrupt_database_is_reported_clearly(tmp_path: Path) -> None:
    path = tmp_path / "lmgate.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match="move it aside"):
        Database(path)


def test_cli_with_a_corrupt_database_says_what_to_do(env: Env) -> None:
    env.data.mkdir(parents=True)
    (env.data / "lmgate.db").write_bytes(b"\x00garbage" * 512)
    result = env.run("key", "list")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "move it aside" in lines[0]
    assert "Traceback" not in result.stderr


def test_a_locked_database_gives_a_clear_error(tmp_path: Path) -> None:
    db = Database(tmp_path / "lmgate.db")
    blocker = sqlite3.connect(tmp_path / "lmgate.db", timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        db._conn.execute("PRAGMA busy_timeout = 200")
        with pytest.raises(StorageError, match="could not be written"), db.transaction() as conn:
            conn.execute("INSERT INTO meta VALUES ('x', 'y')")
    finally:
        blocker.rollback()
        blocker.close()
        db.close()


def test_a_transaction_sqlite_already_ended_keeps_its_real_error(tmp_path: Path) -> None:
    # After some I/O errors SQLite rolls back by itself; our ROLLBACK must then not replace
    # the real error with "no transaction is active", and the next write must work.
    db = Database(tmp_path / "lmgate.db")
    try:
        with pytest.raises(ValueError, match="the real error"), db.transaction() as conn:
            conn.execute("ROLLBACK")
            raise ValueError("the real error")
        with db.transaction() as conn:
            conn.execute("INSERT INTO meta VALUES ('x', 'y')")
        assert db.query("SELECT value FROM meta WHERE key = 'x'")[0][0] == "y"
    finally:
        db.close()


def test_kill_9_while_writing_loses_nothing_already_recorded(tmp_path: Path) -> None:
    """A writer commits usage rows as fast as it can; it is killed with SIGKILL mid-stream.
    Every row it reported as committed must be there on reopening, and the file must be sound."""
    db_dir = tmp_path / "data"
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from tray_app.storage.database import Database, UsageRow
        db = Database.in_directory(Path({str(db_dir)!r}))
        i = 0
        while True:
            db.add_usage([UsageRow(f"p{{i % 7}}", 1, 10, 20, float(i))])
            i += 1
            print(i, flush=True)  # printed only after the commit returned
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    assert proc.stdout is not None
    committed = 0
    for line in proc.stdout:
        committed = int(line)
        if committed >= 400:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    db = Database.in_directory(db_dir)
    try:
        assert db.query("PRAGMA integrity_check")[0][0] == "ok"
        total = sum(row.requests for row in db.usage())
        assert total >= committed, (total, committed)
    finally:
        db.close()


async def test_usage_written_before_a_crash_is_there_after(
    start_identity_gateway: IdentityFactory,
    fake_lmstudio: FakeLMStudio,
) -> None:
    rig = await start_identity_gateway()
    key = rig.identity.api_keys.create("k", scopes=frozenset({"models"}))[0]
    import aiohttp

    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            async with s.get(
                rig.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}
            ) as r:
                await r.read()
    assert rig.identity.recorder.flush()
    again = Database(rig.identity.db.path)  # a second process's view of the same file
    try:
        assert sum(u.requests for u in again.usage()) == 5
    finally:
        again.close()


class LockedKeyring:
    """A keyring backend that is present but locked, as a desktop keyring is before login."""

    priority = 5

    def get_password(self, service: str, name: str) -> str:
        import keyring.errors

        raise keyring.errors.KeyringLocked("the collection is locked")

    def set_password(self, service: str, name: str, value: str) -> None:
        import keyring.errors

        raise keyring.errors.KeyringLocked("the collection is locked")

    def delete_password(self, service: str, name: str) -> None:
        import keyring.errors

        raise keyring.errors.KeyringLocked("the collection is locked")


def test_a_locked_keyring_is_a_clear_error_not_a_crash() -> None:
    from tray_app.control.assembly import signing_key_or_ephemeral
    from tray_app.errors import SecretStoreError
    from tray_app.secret_store.keyring_store import KeyringSecretStore

    store = KeyringSecretStore(LockedKeyring())  # type: ignore[arg-type]
    with pytest.raises(SecretStoreError, match="locked"):
        store.get("jwt-signing-key")
    with pytest.raises(SecretStoreError, match="Unlock it"):
        store.set("lmstudio-api-token", "x")
    # serve keeps going, fail-closed, with a key for this run only — and says why.
    key, warning = signing_key_or_ephemeral(store)
    assert len(key) == 32 and warning is not None and "locked" in warning


def test_kill_9_of_a_running_server_keeps_the_usage_it_wrote(env: Env, tmp_path: Path) -> None:
    import time
    import urllib.request

    key = env.run("key", "create", "counted").stdout.strip()
    proc, url = start_serve(env.vars, stderr=subprocess.DEVNULL)
    request = urllib.request.Request(url + "/healthz")
    sent = 0
    for _ in range(30):
        try:
            urllib.request.urlopen(
                urllib.request.Request(
                    url + "/v1/models", headers={"Authorization": f"Bearer {key}"}
                ),
                timeout=5,
            )
        except urllib.error.HTTPError as exc:  # 502: LM Studio is not running; still counted
            exc.close()
        sent += 1
    time.sleep(2.5)  # one flush interval: these are now recorded
    recorded_before_kill = sent
    for _ in range(10):  # and some that may be in flight when the process dies
        with contextlib.suppress(OSError):
            urllib.request.urlopen(request, timeout=5).close()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert proc.stdout is not None  # start_serve reads the address from it
    proc.stdout.close()
    db = Database.in_directory(env.data)
    try:
        assert db.query("PRAGMA integrity_check")[0][0] == "ok"
        (row,) = [u for u in db.usage() if u.principal.startswith("key:")]
        assert row.requests >= recorded_before_kill
    finally:
        db.close()
    listed = env.run("usage")
    assert listed.returncode == 0 and "counted" in listed.stdout


# ---- a really full disk ---------------------------------------------------------------------

_DISK_SCRIPT = """
mount -t tmpfs -o size=1m lmgate-small-disk "$DISK" || exit 97
"$LMGATE" key create counted || exit 98
"$LMGATE" serve --port 0 &
echo "SERVER $!"
wait $!
cp -a "$DISK/." "$SAVED/"
"""


def _can_mount_privately() -> bool:
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "t", "/mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


def _requests_recorded(pid: int, database: str) -> int:
    """Read the usage total inside the server's mount namespace, read-only."""
    query = (
        "import sqlite3, sys; c = sqlite3.connect(f'file:{sys.argv[1]}?mode=ro', uri=True); "
        "print(c.execute('SELECT COALESCE(SUM(requests), 0) FROM usage').fetchone()[0])"
    )
    done = subprocess.run(
        ["nsenter", "--target", str(pid), "--mount", "--", sys.executable, "-c", query, database],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_a_full_disk_while_writing_usage_is_reported_and_loses_nothing(
    env: Env, tmp_path: Path
) -> None:
    """The data directory is a 1 MiB tmpfs in a private mount namespace; it is filled up for
    real while `lmgate serve` is counting requests, then space is freed again."""
    import re
    import time
    import urllib.error
    import urllib.request

    if not _can_mount_privately():
        if os.environ.get("LMGATE_REQUIRE_NAMESPACES") == "1":
            pytest.fail("this test needs `unshare --mount` and tmpfs (root in CI)")
        pytest.skip("needs permission to mount a tmpfs in a private mount namespace")
    disk, saved = tmp_path / "small-disk", tmp_path / "saved"
    disk.mkdir()
    saved.mkdir()
    database = str(disk / "lmgate.db")
    log = tmp_path / "serve.log"
    variables = {
        **env.vars,
        "LMGATE_STORAGE_DATA_DIR": str(disk),
        "LMGATE_LOG_LEVEL": "info",
        "LMGATE": LMGATE,
        "DISK": str(disk),
        "SAVED": str(saved),
    }
    with log.open("w") as sink:
        shell = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", _DISK_SCRIPT],
            env=variables,
            stdout=subprocess.PIPE,
            stderr=sink,
            text=True,
        )
    assert shell.stdout is not None
    try:
        key = shell.stdout.readline().strip()
        assert key.startswith("lmg_"), key
        server = url = None
        while server is None or url is None:
            line = shell.stdout.readline()
            assert line, f"lmgate serve did not start: {log.read_text()[-2000:]}"
            if found := re.search(r"SERVER (\d+)", line):
                server = int(found.group(1))
            if found := re.search(r"Listening on (http://\S+)", line):
                url = found.group(1)

        def call(path: str, authorised: bool = True) -> int:
            headers = {"Authorization": f"Bearer {key}"} if authorised else {}
            request = urllib.request.Request(url + path, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    return int(answer.status)
            except urllib.error.HTTPError as exc:  # 502: no LM Studio here; still counted
                exc.close()
                return exc.code

        def wait_for(condition: Callable[[], bool], what: str) -> None:
            deadline = time.monotonic() + 15
            while not condition():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                time.sleep(0.2)

        assert {call("/v1/models") for _ in range(20)} == {502}
        wait_for(lambda: _requests_recorded(server, database) == 20, "the first 20 to be saved")

        filler = subprocess.run(
            [
                "nsenter",
                "--target",
                str(server),
                "--mount",
                "--",
                "dd",
                "if=/dev/zero",
                f"of={disk}/filler",
                "bs=4k",
            ],
            capture_output=True,
            text=True,
        )
        assert "No space left on device" in filler.stderr
        # Still serving, with nothing to spare on the disk.
        assert {call("/v1/models") for _ in range(15)} == {502}
        assert call("/healthz", authorised=False) == 200
        wait_for(lambda: "usage could not be saved" in log.read_text(), "the error in the log")
        failure = next(
            line for line in log.read_text().splitlines() if "usage could not be saved" in line
        )
        assert "disk is full" in failure and "Free some disk space" in failure
        assert _requests_recorded(server, database) == 20  # what was saved is still there

        subprocess.run(
            ["nsenter", "--target", str(server), "--mount", "--", "rm", f"{disk}/filler"],
            check=True,
        )
        wait_for(lambda: _requests_recorded(server, database) == 35, "the retry after freeing")
        os.kill(server, signal.SIGTERM)
        assert shell.wait(30) == 0
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait()
        shell.stdout.close()
    db = Database(saved / "lmgate.db")
    try:
        assert db.query("PRAGMA integrity_check")[0][0] == "ok"
        (row,) = db.usage()
        assert row.requests == 35  # nothing lost, nothing counted twice
    finally:
        db.close()
