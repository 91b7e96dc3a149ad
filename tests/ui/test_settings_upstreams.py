"""Settings' Upstreams section (issue 18, point 4), offscreen, on a real Controller: a real
config file in tmp, the tests' in-memory secret store and real fake LM Studios on 127.0.0.1.
Add writes the table (the token goes to the store), a bad URL is refused inline in the parser's
words, Test shows its answer in the row, Remove takes the table away; "local" is never
removable. Screenshot: test-artifacts/settings-upstreams.png."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("PySide6")

from pytestqt.qtbot import QtBot

from tests.conftest import LMSTUDIO_TOKEN
from tests.fake_controller import FakeController
from tests.fake_lmstudio import Behaviour, FakeLMStudio, fake_on_a_thread
from tests.helpers import REPO_ROOT, publish_screenshot
from tray_app.config.files import read_config_file
from tray_app.config.settings import Config
from tray_app.config.upstreams import token_secret_name
from tray_app.control.controller import Controller, ThreadedController
from tray_app.control.loop_thread import LoopThread
from tray_app.secret_store.base import LMSTUDIO_API_TOKEN, MemorySecretStore
from tray_app.ui.bridge import UiBridge
from tray_app.ui.settings_dialog import SettingsDialog
from tray_app.ui.upstreams_section import TEST_COLUMN, UpstreamsSection

ARTIFACTS = REPO_ROOT / "test-artifacts"
DESK_TOKEN = "sk-desk-" + "y" * 20


@pytest.fixture
def desk() -> Iterator[FakeLMStudio]:
    yield from fake_on_a_thread(Behaviour(require_token=DESK_TOKEN, models=("big-1", "big-2")))


@pytest.fixture
def attic() -> Iterator[FakeLMStudio]:
    """A third machine, wanting the desk's token too (so a wrong one is refused there)."""
    yield from fake_on_a_thread(Behaviour(require_token=DESK_TOKEN, models=("big-1", "big-2")))


@pytest.fixture
def store() -> MemorySecretStore:
    return MemorySecretStore({LMSTUDIO_API_TOKEN: LMSTUDIO_TOKEN})


@pytest.fixture
def core(
    tmp_path: Path, lmstudio_thread: FakeLMStudio, store: MemorySecretStore
) -> Iterator[ThreadedController]:
    """Not started: Settings edits upstreams whether or not the gateway runs. The file holds
    LM Studio's URL, as a tray's file does: a change reloads the config from it."""
    (tmp_path / "config.toml").write_text(f'[upstream]\nurl = "{lmstudio_thread.url}"\n')
    config = Config(
        upstream_url=lmstudio_thread.url, server_port=0, storage_data_dir=str(tmp_path / "data")
    )
    loop = LoopThread()
    loop.start()
    controller = ThreadedController(
        Controller(config, config_path=tmp_path / "config.toml", store=store, environ={}), loop
    )
    yield controller
    controller.shutdown()
    loop.stop()


@pytest.fixture
def section(qtbot: QtBot, core: ThreadedController) -> Iterator[UpstreamsSection]:
    dialog = SettingsDialog(core, UiBridge())  # held here: the section lives inside it
    qtbot.addWidget(dialog)
    assert dialog.upstreams is not None
    found = dialog.upstreams
    qtbot.waitUntil(lambda: len(found.rows) == 1)
    yield found
    dialog.close()


def tables(tmp_path: Path) -> dict[str, object]:
    flat = read_config_file(tmp_path / "config.toml")
    return {key: value for key, value in flat.items() if key.startswith("upstreams.")}


def cell(section: UpstreamsSection, row: int, column: int) -> str:
    item = section.table.item(row, column)
    assert item is not None, (row, column)
    return item.text()


def names(section: UpstreamsSection) -> list[str]:
    return [cell(section, i, 0) for i in range(section.table.rowCount())]


def select(section: UpstreamsSection, name: str) -> None:
    section.table.selectRow(names(section).index(name))


def result_of(section: UpstreamsSection, name: str) -> str:
    return cell(section, names(section).index(name), TEST_COLUMN)


def add(qtbot: QtBot, section: UpstreamsSection, name: str, url: str, token: str = "") -> None:
    section.name.setText(name)
    section.url.setText(url)
    section.token.setText(token)
    before = section.status.text()
    section.add_button.click()
    qtbot.waitUntil(lambda: section.status.text() not in {before, "Adding…"})


def test_local_comes_first_and_cannot_be_removed(section: UpstreamsSection) -> None:
    assert names(section) == ["local"]
    assert cell(section, 0, 4) == "stored", "LM Studio's token is local's"
    assert not section.test_button.isEnabled() and not section.remove_button.isEnabled()
    select(section, "local")
    assert section.test_button.isEnabled()
    assert not section.remove_button.isEnabled()


def test_add_writes_the_table_and_the_token_goes_to_the_store(
    qtbot: QtBot,
    section: UpstreamsSection,
    desk: FakeLMStudio,
    lmstudio_thread: FakeLMStudio,
    tmp_path: Path,
    store: MemorySecretStore,
) -> None:
    assert section.token.echoMode() == section.token.EchoMode.Password
    section.weight.setValue(4)
    add(qtbot, section, "desk", desk.url, DESK_TOKEN)
    assert section.status.text() == f"Added desk at {desk.url}; LM Gate uses it when it starts."
    assert tables(tmp_path) == {"upstreams.desk.url": desk.url, "upstreams.desk.weight": 4}
    assert store.get(token_secret_name("desk")) == DESK_TOKEN
    assert names(section) == ["local", "desk"]
    assert cell(section, 0, 1) == lmstudio_thread.url, "local is upstream.url"
    assert [cell(section, 1, c) for c in range(5)] == [
        "desk",
        desk.url,
        "4",
        "yes",
        "stored",
    ]
    assert section.name.text() == section.url.text() == section.token.text() == ""
    assert section.weight.value() == 1


def test_a_bad_url_is_refused_inline(
    qtbot: QtBot,
    section: UpstreamsSection,
    tmp_path: Path,
    store: MemorySecretStore,
) -> None:
    add(qtbot, section, "desk", "ftp://10.0.0.5", "sk-kept")
    assert "http" in section.status.text()
    assert tables(tmp_path) == {}
    assert store.get(token_secret_name("desk")) is None
    assert section.token.text() == "sk-kept", "kept for the corrected try"
    assert section.add_button.isEnabled()
    add(qtbot, section, "Desk!", "http://10.0.0.5:1234")
    assert "lower-case letters" in section.status.text()
    add(qtbot, section, "desk", "http://10.0.0.5:1234")
    add(qtbot, section, "desk", "http://10.0.0.6:1234")
    assert section.status.text() == "an upstream is named 'desk' already: remove it first"


def test_test_shows_the_answer_in_the_row(
    qtbot: QtBot,
    section: UpstreamsSection,
    desk: FakeLMStudio,
    attic: FakeLMStudio,
) -> None:
    add(qtbot, section, "desk", desk.url, DESK_TOKEN)
    add(qtbot, section, "attic", attic.url, "sk-wrong")
    assert names(section) == ["local", "attic", "desk"], "local first, then by name"
    select(section, "desk")
    section.test_button.click()
    qtbot.waitUntil(lambda: result_of(section, "desk").startswith("OK"))
    assert result_of(section, "desk") == f"OK: desk answers at {desk.url}. Models: big-1, big-2"
    assert result_of(section, "attic") == "", "only the one tested"
    select(section, "attic")
    section.test_button.click()
    qtbot.waitUntil(lambda: result_of(section, "attic").startswith("Failed"))
    assert result_of(section, "attic") == (
        f"Failed: attic at {attic.url} refused the stored token (401)."
    )
    assert section.status.text() == f"attic at {attic.url} refused the stored token (401)."


def test_remove_takes_the_table_and_its_token_away(
    qtbot: QtBot,
    section: UpstreamsSection,
    tmp_path: Path,
    store: MemorySecretStore,
) -> None:
    add(qtbot, section, "desk", "http://10.0.0.5:1234", DESK_TOKEN)
    select(section, "desk")
    assert section.remove_button.isEnabled()
    section.remove_button.click()
    qtbot.waitUntil(lambda: names(section) == ["local"])
    assert section.status.text() == "Removed desk; LM Gate uses it when it starts."
    assert tables(tmp_path) == {}
    assert store.get(token_secret_name("desk")) is None


def test_a_controller_without_upstreams_gets_the_form_alone(qtbot: QtBot) -> None:
    dialog = SettingsDialog(FakeController(), UiBridge())
    qtbot.addWidget(dialog)
    assert dialog.upstreams is None


def test_screenshot_of_the_section(
    qtbot: QtBot,
    section: UpstreamsSection,
    desk: FakeLMStudio,
) -> None:
    add(qtbot, section, "desk", desk.url, DESK_TOKEN)
    add(qtbot, section, "laptop", "http://192.168.1.31:1234")
    select(section, "desk")
    section.test_button.click()
    qtbot.waitUntil(lambda: result_of(section, "desk").startswith("OK"))
    dialog = section.window()
    dialog.resize(900, dialog.sizeHint().height())
    dialog.show()
    qtbot.waitExposed(dialog)
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "settings-upstreams.png"
    assert dialog.grab().save(str(path))
    publish_screenshot(path, "settings-upstreams.png")
