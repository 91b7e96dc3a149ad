"""`lmgate doctor` with several upstreams: one line for each besides the local one, each asked
with its own token from the secret store, a disabled one listed and not asked. Real fake LM
Studios on 127.0.0.1 port 0, a real config file and a real file secret store."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.fake_lmstudio import Behaviour, FakeLMStudio
from tray_app.cli import doctor
from tray_app.cli.doctor import Check, render, run_checks
from tray_app.config.upstreams import LOCAL_TOKEN_SECRET, token_secret_name
from tray_app.secret_store.keyring_store import FileSecretStore
from tray_app.secret_store.upstream_tokens import binding_name, fingerprint

DESK_TOKEN = "sk-desk-right"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def servers() -> AsyncIterator[dict[str, FakeLMStudio]]:
    made = {
        "local": FakeLMStudio(),
        "desk": FakeLMStudio(Behaviour(require_token=DESK_TOKEN, models=("big-1", "big-2"))),
        "attic": FakeLMStudio(Behaviour(require_token="sk-attic-other")),
        "spare": FakeLMStudio(),
        "bare": FakeLMStudio(Behaviour(models=())),
    }
    for fake in made.values():
        await fake.start()
    yield made
    for fake in made.values():
        await fake.stop()


def write_config(tmp_path: Path, local: str, tables: dict[str, str]) -> Path:
    path = tmp_path / "config.toml"
    lines = [
        "[upstream]",
        f'url = "{local}"',
        "[secrets]",
        'store = "file"',
        f'file_dir = "{tmp_path / "secrets"}"',
        "[storage]",
        f'data_dir = "{tmp_path / "data"}"',
        "[server]",
        "port = 0",
    ]
    for name, body in tables.items():
        lines += [f"[upstreams.{name}]", body]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


async def test_each_upstream_gets_its_own_line(
    servers: dict[str, FakeLMStudio], tmp_path: Path
) -> None:
    down = f"http://127.0.0.1:{closed_port()}"
    path = write_config(
        tmp_path,
        servers["local"].url,
        {
            "desk": f'url = "{servers["desk"].url}"',
            "attic": f'url = "{servers["attic"].url}"',
            "laptop": f'url = "{down}"',
            "spare": f'url = "{servers["spare"].url}"\nenabled = false',
        },
    )
    store = FileSecretStore(tmp_path / "secrets")
    store.set(token_secret_name("desk"), DESK_TOKEN)
    store.set(token_secret_name("attic"), "sk-attic-wrong")

    checks = by_name(await run_checks(path))

    assert checks["LM Studio"].ok, checks["LM Studio"]
    desk = checks["upstream desk"]
    assert desk.ok and desk.detail == f"reachable at {servers['desk'].url}, 2 models"
    assert servers["desk"].received[-1].headers["Authorization"] == f"Bearer {DESK_TOKEN}"
    attic = checks["upstream attic"]
    assert not attic.ok
    assert "the stored token was refused (401)" in attic.detail
    assert attic.detail.endswith("`lmgate secret set upstream-token-attic`")
    assert "sk-attic-wrong" not in attic.detail
    laptop = checks["upstream laptop"]
    assert not laptop.ok and laptop.detail.startswith(f"not reachable at {down} (")
    assert "upstreams.laptop.url" in laptop.detail
    spare = checks["upstream spare"]
    assert spare.ok and spare.detail == f"{servers['spare'].url}: disabled, not asked"
    assert servers["spare"].received == [], "a disabled upstream is not asked"
    # Only the local one is asked with LM Studio's token: none was stored, so none was sent.
    assert "Authorization" not in servers["local"].received[0].headers
    text = render(list(checks.values()))
    assert "2 check(s) failed." in text


async def test_one_tokenless_upstream_that_wants_one_says_so(
    servers: dict[str, FakeLMStudio], tmp_path: Path
) -> None:
    path = write_config(tmp_path, servers["local"].url, {"desk": f'url = "{servers["desk"].url}"'})
    FileSecretStore(tmp_path / "secrets").set(LOCAL_TOKEN_SECRET, DESK_TOKEN)

    desk = by_name(await run_checks(path))["upstream desk"]

    assert not desk.ok and "it requires an API token (401)" in desk.detail
    # LM Studio's token is the local one's, never handed to another machine.
    assert all("Authorization" not in r.headers for r in servers["desk"].received)


async def test_an_upstream_with_no_model_fails_its_line(
    servers: dict[str, FakeLMStudio], tmp_path: Path
) -> None:
    path = write_config(tmp_path, servers["local"].url, {"bare": f'url = "{servers["bare"].url}"'})

    bare = by_name(await run_checks(path))["upstream bare"]

    assert not bare.ok and "offers no model" in bare.detail


async def test_one_model_is_said_in_the_singular(
    servers: dict[str, FakeLMStudio], tmp_path: Path
) -> None:
    servers["spare"].behaviour.models = ("only-one",)
    path = write_config(
        tmp_path, servers["local"].url, {"spare": f'url = "{servers["spare"].url}"'}
    )

    spare = by_name(await run_checks(path))["upstream spare"]

    assert spare.ok and spare.detail.endswith(", 1 model")


async def test_a_disabled_local_upstream_is_not_asked(
    servers: dict[str, FakeLMStudio], tmp_path: Path
) -> None:
    path = write_config(
        tmp_path,
        servers["local"].url,
        {"local": "enabled = false", "desk": f'url = "{servers["spare"].url}"'},
    )

    checks = by_name(await run_checks(path))

    assert checks["LM Studio"].ok and "disabled" in checks["LM Studio"].detail
    assert servers["local"].received == []
    assert checks["upstream desk"].ok


async def test_one_upstream_adds_no_line(servers: dict[str, FakeLMStudio], tmp_path: Path) -> None:
    path = write_config(tmp_path, servers["local"].url, {})

    names = [check.name for check in await run_checks(path)]

    assert not [name for name in names if name.startswith("upstream")]
    assert "LM Studio" in names and "models" in names


async def test_an_upstream_answering_an_error_says_its_status(
    servers: dict[str, FakeLMStudio], tmp_path: Path
) -> None:
    async def broken(_: web.Request) -> web.Response:
        return web.Response(status=502, text="bad gateway")

    app = web.Application()
    app.router.add_get("/v1/models", broken)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        path = write_config(tmp_path, servers["local"].url, {"proxy": f'url = "{url}"'})
        proxy = by_name(await run_checks(path))["upstream proxy"]
    finally:
        await runner.cleanup()

    assert not proxy.ok and proxy.detail == f"{url}/v1/models answered 502"


async def test_a_token_given_for_another_server_is_not_sent_and_says_what_to_do(
    servers: dict[str, FakeLMStudio], tmp_path: Path
) -> None:
    desk = servers["desk"]
    path = write_config(tmp_path, servers["local"].url, {"desk": f'url = "{desk.url}"'})
    store = FileSecretStore(tmp_path / "secrets")
    store.set(token_secret_name("desk"), DESK_TOKEN)
    store.set(binding_name("desk"), f"http://10.9.9.9:1234 {fingerprint(DESK_TOKEN)}")

    check = by_name(await run_checks(path))["upstream desk"]

    assert not check.ok
    assert "given for http://10.9.9.9:1234" in check.detail
    assert "`lmgate secret set upstream-token-desk`" in check.detail
    assert desk.received == []


async def test_tokens_of_upstreams_no_longer_configured_are_listed(
    servers: dict[str, FakeLMStudio], tmp_path: Path
) -> None:
    path = write_config(tmp_path, servers["local"].url, {"desk": f'url = "{servers["desk"].url}"'})
    store = FileSecretStore(tmp_path / "secrets")
    store.set(token_secret_name("desk"), DESK_TOKEN)
    store.set(token_secret_name("gone"), "sk-gone")
    store.set(token_secret_name("old"), "sk-old")

    checks = by_name(await run_checks(path))

    left = checks["removed upstreams' tokens"]
    assert not left.ok
    assert left.detail == (
        "upstream-token-gone, upstream-token-old belong to no configured upstream (a table "
        "removed by hand?): `lmgate secret delete upstream-token-gone` and "
        "`lmgate secret delete upstream-token-old`"
    )
    assert "sk-" not in render(list(checks.values()))


async def test_a_keyring_that_cannot_list_is_said(
    servers: dict[str, FakeLMStudio], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Unlisted:
        def get(self, name: str) -> str | None:
            return None

        def set(self, name: str, value: str) -> None:
            raise AssertionError("doctor writes nothing")

        def delete(self, name: str) -> None:
            raise AssertionError("doctor deletes nothing")

    monkeypatch.setattr(doctor, "secret_store_for", lambda config: Unlisted())
    path = write_config(tmp_path, servers["local"].url, {})

    left = by_name(await run_checks(path))["removed upstreams' tokens"]

    assert left.ok and "cannot list its entries" in left.detail
