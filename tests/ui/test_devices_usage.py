"""Usage you can see (issue 17, point 4): the Devices window shows, per credential, the tokens
of today and of this month against its budget ("12,345 of 50,000"; "no budget" without one;
a warning from 90 % on) and a small chart of its last days. A real Controller on a real
database in tmp; usage is written the way the gateway's flush writes it (Database.add_usage),
budgets as rows of the budgets table. Screenshot: docs/screenshots/devices-usage.png
(LMGATE_UPDATE_DOCS=1)."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import QPoint
from PySide6.QtGui import QColor, QImage

from tests.conftest import LMSTUDIO_TOKEN
from tests.fake_controller import FakeController
from tests.fake_lmstudio import FakeLMStudio
from tests.helpers import REPO_ROOT, publish_screenshot
from tray_app.config.settings import Config
from tray_app.control.assembly import Identity
from tray_app.control.controller import Controller, Credential, ThreadedController
from tray_app.control.credential_usage import CHART_DAYS, RecentUsage
from tray_app.identity.principal import Budget
from tray_app.secret_store.base import LMSTUDIO_API_TOKEN, MemorySecretStore
from tray_app.storage.database import DAY, HOUR, UsageRow
from tray_app.storage.usage_history import day_start, month_start
from tray_app.ui.bridge import UiBridge
from tray_app.ui.devices_window import (
    CHART_COLUMN,
    COLUMNS,
    MONTH_COLUMN,
    TODAY_COLUMN,
    DevicesWindow,
    budget_words,
)
from tray_app.ui.usage_chart import BAR, GROUND, OVER, TODAY, WARNING, UsageChart

ARTIFACTS = REPO_ROOT / "test-artifacts"
SCOPES = frozenset({"chat", "models"})


@pytest.fixture
def core(tmp_path: Path, lmstudio_thread: FakeLMStudio) -> Iterator[ThreadedController]:
    config = Config(
        upstream_url=lmstudio_thread.url, server_port=0, storage_data_dir=str(tmp_path / "data")
    )
    store = MemorySecretStore({LMSTUDIO_API_TOKEN: LMSTUDIO_TOKEN})
    controller = ThreadedController(
        Controller(config, config_path=tmp_path / "config.toml", store=store, environ={})
    )
    controller.start().result(20)
    yield controller
    controller.shutdown()


def _identity(core: ThreadedController) -> Identity:
    return core.controller.identity


def _key(core: ThreadedController, name: str) -> str:
    """A new API key's principal, the name its usage is counted under."""
    core.create_key(name, SCOPES).result(5)
    return next(k.principal_name for k in _identity(core).api_keys.list() if k.name == name)


def _device(core: ThreadedController, name: str) -> str:
    pairing = _identity(core).pairing
    code, _ = pairing.create_code()
    pairing.exchange(code, name)
    return next(d.principal_name for d in pairing.devices() if d.name == name)


def _use(
    core: ThreadedController, principal: str, when: float, prompt: int, completion: int
) -> None:
    """One request's usage, flushed as the gateway flushes it."""
    hour = int(when) // HOUR * HOUR
    kind, _, ident = principal.partition(":")
    _identity(core).db.add_usage(
        [UsageRow(principal, 1, prompt, completion, when, hour)],
        key_last_used={ident: when} if kind == "key" else None,
        device_last_seen={ident: when} if kind == "device" else None,
    )


def _budget(core: ThreadedController, principal: str, day: int | None, month: int | None) -> None:
    with _identity(core).db.transaction() as conn:
        conn.execute(
            "INSERT INTO budgets (principal, tokens_per_day, tokens_per_month, updated) "
            "VALUES (?, ?, ?, ?)",
            (principal, day, month, time.time()),
        )


@pytest.fixture
def window(qtbot, core: ThreadedController) -> Callable[[], DevicesWindow]:  # type: ignore[no-untyped-def]
    def opened() -> DevicesWindow:
        shown = DevicesWindow(core, UiBridge())
        qtbot.addWidget(shown)
        qtbot.waitUntil(lambda: len(shown.rows) == len(core.credentials().result(5)))
        return shown

    return opened


def _row(window: DevicesWindow, name: str) -> int:
    return next(i for i, r in enumerate(window.rows) if r.name == name)


def _cell(window: DevicesWindow, name: str, column: int) -> str:
    item = window.table.item(_row(window, name), column)
    assert item is not None
    return item.text()


def _chart(window: DevicesWindow, name: str) -> UsageChart:
    chart = window.table.cellWidget(_row(window, name), CHART_COLUMN)
    assert isinstance(chart, UsageChart)
    return chart


def test_today_and_this_month_against_the_budget_and_the_chart(core, window) -> None:  # type: ignore[no-untyped-def]
    now = time.time()
    today = day_start(now)
    laptop = _key(core, "laptop script")
    _budget(core, laptop, 50_000, 1_000_000)
    _use(core, laptop, now, 10_000, 2_000)
    _use(core, laptop, now, 300, 45)  # two requests today: 12,345 tokens
    _use(core, laptop, today - DAY + 60, 700, 300)  # yesterday
    _use(core, laptop, today - 30 * DAY, 5_000, 0)  # before the chart (and this month)
    month = 12_345 + (1_000 if today - DAY >= month_start(now) else 0)

    shown = window()
    assert COLUMNS[TODAY_COLUMN] == "Tokens today" and COLUMNS[MONTH_COLUMN] == "Tokens this month"
    assert _cell(shown, "laptop script", TODAY_COLUMN) == "12,345 of 50,000"
    assert _cell(shown, "laptop script", MONTH_COLUMN) == f"{month:,} of 1,000,000"
    row = shown.rows[_row(shown, "laptop script")]
    assert (row.recent.requests_today, row.recent.tokens_today) == (2, 12_345)
    assert row.budget == Budget(50_000, 1_000_000)
    chart = _chart(shown, "laptop script")
    assert chart.values == (0,) * (CHART_DAYS - 2) + (1_000, 12_345), "yesterday, then today"
    assert chart.limit == 50_000, "the daily budget is drawn as a line"
    shown.table.selectRow(_row(shown, "laptop script"))
    assert shown.usage_line.text().startswith(
        "laptop script: 12,345 of 50,000 tokens today (2 requests); "
        f"{month:,} of 1,000,000 tokens this month"
    )


def test_without_a_budget_it_says_so_and_counts_still_show(qtbot, core, window) -> None:  # type: ignore[no-untyped-def]
    free = _key(core, "free for all")
    _budget(core, "key:someone-else", 10, 10)  # a budget for another principal is not theirs
    _use(core, free, time.time(), 40_000, 2_000)
    shown = window()
    assert _cell(shown, "free for all", TODAY_COLUMN) == "42,000 · no budget"
    assert _cell(shown, "free for all", MONTH_COLUMN) == "42,000 · no budget"
    assert shown.rows[_row(shown, "free for all")].budget is None
    assert _chart(shown, "free for all").limit is None
    unused = _key(core, "never used")
    _budget(core, unused, None, 2_000_000)  # a monthly budget only
    shown.refresh()
    qtbot.waitUntil(lambda: any(r.name == "never used" for r in shown.rows))
    assert _cell(shown, "never used", TODAY_COLUMN) == "0 · no budget"
    assert _cell(shown, "never used", MONTH_COLUMN) == "0 of 2,000,000"
    assert _chart(shown, "never used").values == (0,) * CHART_DAYS


def test_a_device_near_its_budget_warns_in_colour_and_words(core, window) -> None:  # type: ignore[no-untyped-def]
    now = time.time()
    phone = _device(core, "Anna's Pixel")
    _budget(core, phone, 10_000, 100_000)
    _use(core, phone, now, 8_000, 1_000)  # 9,000 of 10,000: 90 %
    calm = _key(core, "calm")
    _budget(core, calm, 10_000, None)
    _use(core, calm, now, 8_999, 0)  # just under 90 %
    spent = _key(core, "spent")
    _budget(core, spent, 10_000, None)
    _use(core, spent, now, 10_000, 1)
    shown = window()
    phone_today = shown.table.item(_row(shown, "Anna's Pixel"), TODAY_COLUMN)
    assert phone_today.text() == "9,000 of 10,000 · 90 %"
    assert phone_today.foreground().color() == WARNING and phone_today.font().bold()
    assert _cell(shown, "Anna's Pixel", MONTH_COLUMN) == "9,000 of 100,000"
    calm_today = shown.table.item(_row(shown, "calm"), TODAY_COLUMN)
    assert calm_today.text() == "8,999 of 10,000"
    assert calm_today.foreground().color() != WARNING and not calm_today.font().bold()
    spent_today = shown.table.item(_row(shown, "spent"), TODAY_COLUMN)
    assert spent_today.text() == "10,001 of 10,000 · used up"
    assert spent_today.foreground().color() == OVER
    assert _chart(shown, "Anna's Pixel").bar_colour(CHART_DAYS - 1) == WARNING
    assert _chart(shown, "calm").bar_colour(CHART_DAYS - 1) == TODAY
    assert _chart(shown, "spent").bar_colour(CHART_DAYS - 1) == OVER


class TestBudgetWords:
    """The warning starts at 90 % exactly, "used up" at the budget exactly."""

    @pytest.mark.parametrize(
        ("used", "limit", "words", "warn"),
        [
            (0, 50_000, "0 of 50,000", None),
            (8_999, 10_000, "8,999 of 10,000", None),
            (9_000, 10_000, "9,000 of 10,000 · 90 %", WARNING),
            (9_999, 10_000, "9,999 of 10,000 · 99 %", WARNING),
            (10_000, 10_000, "10,000 of 10,000 · used up", OVER),
            (0, 0, "0 of 0 · used up", OVER),
            (12_345, None, "12,345 · no budget", None),
        ],
    )
    def test_words(self, used: int, limit: int | None, words: str, warn: QColor | None) -> None:
        assert budget_words(used, limit) == (words, warn)


def _pixel(image: QImage, x: int, y: int) -> QColor:
    return image.pixelColor(x, y)


class TestUsageChart:
    def test_bars_are_drawn_in_their_colours_and_the_budget_line(self, qtbot) -> None:  # type: ignore[no-untyped-def]
        chart = UsageChart([0, 10, 9, 4], limit=10)
        qtbot.addWidget(chart)
        chart.resize(84, 44)
        image = chart.grab().toImage()
        slot = (84 - 4) / 4
        centre = [int(2 + slot * i + slot / 2) for i in range(4)]
        near_bottom = 44 - 6
        assert _pixel(image, centre[1], near_bottom) == OVER, "at the budget: used up"
        assert _pixel(image, centre[2], near_bottom) == WARNING, "90 % of it"
        assert _pixel(image, centre[3], near_bottom) == TODAY, "today's bar, under budget"
        assert _pixel(image, centre[0], near_bottom) != TODAY, "nothing used: no bar"
        assert _pixel(image, centre[3], 10) != TODAY, "4 of 10 stays low"
        line = [_pixel(image, x, 3) for x in range(2, 82)]
        assert line.count(OVER) > 20, "the dashed budget line at the top"

    def test_a_tiny_day_still_shows_and_no_budget_draws_no_line(self, qtbot) -> None:  # type: ignore[no-untyped-def]
        chart = UsageChart([1_000_000, 1, 0])
        qtbot.addWidget(chart)
        chart.resize(64, 44)
        image = chart.grab().toImage()
        slot = (64 - 4) / 3
        assert _pixel(image, int(2 + slot * 1.5), 44 - 4) == BAR
        assert OVER not in [_pixel(image, x, y) for x in range(64) for y in range(44)]
        assert chart.sizeHint().width() == 9 * 3 + 4

    def test_an_empty_chart_draws_only_its_baseline(self, qtbot) -> None:  # type: ignore[no-untyped-def]
        chart = UsageChart([])
        qtbot.addWidget(chart)
        chart.resize(40, 22)
        colours = {_pixel(chart.grab().toImage(), x, 10).name() for x in range(40)}
        assert TODAY.name() not in colours and chart.sizeHint().width() == 13


def test_screenshot_at_the_default_size(core, window) -> None:  # type: ignore[no-untyped-def]
    """The README's picture of the window, with a day-to-day pattern worth reading."""
    now = time.time()
    today = day_start(now)
    phone = _device(core, "Anna's Pixel")
    _budget(core, phone, 15_000, 300_000)
    laptop = _key(core, "laptop script")
    _budget(core, laptop, 20_000, None)
    team = _key(core, "team bot")
    for day in reversed(range(CHART_DAYS)):  # oldest first, as the gateway flushes
        when = today - day * DAY + 3600 if day else now
        _use(core, phone, when, 2_000 + 900 * ((day * 7) % 11), 1_345)
        if day % 3 == 0:
            _use(core, team, when, 30_000 + 5_000 * (day % 4), 4_000)
    _use(core, laptop, today - DAY + 3600, 9_000, 900)
    _use(core, laptop, now, 17_000, 1_200)
    shown = window()
    shown.table.selectRow(_row(shown, "Anna's Pixel"))
    shown.show()
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "devices-usage.png"
    picture = shown.grab()
    assert picture.save(str(path))
    publish_screenshot(path, "devices-usage.png")
    assert shown.width() >= 1200
    chart = _chart(shown, "Anna's Pixel")
    assert chart.isVisible() and chart.width() >= chart.sizeHint().width()
    corner = chart.mapTo(shown, QPoint(2, 2))
    assert picture.toImage().pixelColor(corner) == GROUND, "bars on their ground, not the selection"


class SlowCredentials(FakeController):
    """The controller double, answering credentials() only when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: concurrent.futures.Future[list[Credential]] = concurrent.futures.Future()

    def credentials(self) -> concurrent.futures.Future[list[Credential]]:
        return self.pending


def test_the_window_does_not_wait_for_the_usage(qtbot) -> None:  # type: ignore[no-untyped-def]
    """Reading usage runs on the controller's loop; the window opens and answers meanwhile."""
    slow = SlowCredentials()
    shown = DevicesWindow(slow, UiBridge())
    qtbot.addWidget(shown)
    shown.show()
    qtbot.wait(50)
    assert shown.rows == [] and shown.isVisible()
    shown.hide_revoked.setChecked(True)  # still answers clicks
    used = RecentUsage(3, 12_345, 9, 40_000, (0,) * (CHART_DAYS - 1) + (12_345,))
    slow.pending.set_result(
        [Credential("key", "k", "late", "chat", 1e9, None, 9, 40_000, True, None, used)]
    )
    qtbot.waitUntil(lambda: len(shown.rows) == 1)
    assert _cell(shown, "late", TODAY_COLUMN) == "12,345 · no budget"
    assert _chart(shown, "late").values[-1] == 12_345
