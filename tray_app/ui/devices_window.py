"""Devices & tokens: every credential with last seen, usage and expiry; what it used today and
this month against its budget, and a chart of its last days; revoke one (after a non-modal
confirmation), hide the revoked ones, create an API key."""

from __future__ import annotations

import html
from datetime import datetime

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QFont, QGuiApplication
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from tray_app.control.controller import Credential
from tray_app.control.credential_usage import CHART_DAYS
from tray_app.ui.bridge import UiBridge
from tray_app.ui.port import ControllerPort
from tray_app.ui.usage_chart import OVER, WARNING, UsageChart, near_budget

COLUMNS = (
    "Kind",
    "Name",
    "Scopes",
    "Last seen",
    "Requests",
    "Tokens",
    "Status",
    "Expires",
    "Tokens today",
    "Tokens this month",
    f"Last {CHART_DAYS} days",
)
NAME_COLUMN = 1
TODAY_COLUMN = 8
MONTH_COLUMN = 9
CHART_COLUMN = 10
APP_KEY_SCOPES = frozenset({"chat", "models", "embeddings"})


def _when(epoch: float | None) -> str:
    return "never" if epoch is None else datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M")


def _expiry(row: Credential) -> str:
    return "—" if row.expires is None else _when(row.expires)


def budget_words(used: int, limit: int | None) -> tuple[str, QColor | None]:
    """``used`` tokens against ``limit`` in words, and the colour to warn in (None: no need)."""
    if limit is None:
        return f"{used:,} · no budget", None
    if used >= limit:
        return f"{used:,} of {limit:,} · used up", OVER
    if near_budget(used, limit):
        return f"{used:,} of {limit:,} · {used * 100 // limit} %", WARNING
    return f"{used:,} of {limit:,}", None


def _day_limit(row: Credential) -> int | None:
    return None if row.budget is None else row.budget.tokens_per_day


def _month_limit(row: Credential) -> int | None:
    return None if row.budget is None else row.budget.tokens_per_month


def usage_summary(row: Credential) -> str:
    """The selected credential's usage in a sentence (days and months are UTC, as budgets)."""
    recent = row.recent
    today, _ = budget_words(recent.tokens_today, _day_limit(row))
    month, _ = budget_words(recent.tokens_month, _month_limit(row))
    return (
        f"{row.name}: {today} tokens today ({_requests(recent.requests_today)}); "
        f"{month} tokens this month ({_requests(recent.requests_month)}). "
        "Days and months are UTC."
    )


def _requests(count: int) -> str:
    return "1 request" if count == 1 else f"{count:,} requests"


def literal_tooltip(text: str) -> str:
    """``text`` as a tooltip that shows it literally. Qt takes a tooltip that looks like HTML
    for HTML, so a device that named itself ``<font size=7>…`` would be drawn as markup; and
    an escaped plain tooltip would show its ``&lt;``. So: escaped, inside markup Qt
    recognises, not wrapped (``pre``), as a plain tooltip would not be."""
    return f"<p style='white-space:pre'>{html.escape(text)}</p>"


def _plain_label(text: str = "") -> QLabel:
    """A label for text that holds names chosen by others (devices name themselves)."""
    label = QLabel(text)
    label.setTextFormat(Qt.TextFormat.PlainText)
    return label


class DevicesWindow(QWidget):
    def __init__(self, controller: ControllerPort, bridge: UiBridge) -> None:
        super().__init__()
        self.setWindowTitle("LM Gate — devices & tokens")
        self._controller = controller
        self._bridge = bridge
        self.all_rows: list[Credential] = []
        self.rows: list[Credential] = []  # as the table shows them, row by row
        self.pending: Credential | None = None  # asked to revoke, not yet confirmed
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setWordWrap(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(NAME_COLUMN, QHeaderView.ResizeMode.Stretch)
        self.revoke_button = QPushButton("Revoke selected")
        self.revoke_button.clicked.connect(self.revoke_selected)
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(self.refresh)
        self.hide_revoked = QCheckBox("Hide revoked")
        self.hide_revoked.toggled.connect(lambda _: self._fill())
        # The confirmation is a row in the window, not a modal dialog (no exec()).
        self.confirm_text = _plain_label()
        self.confirm_button = QPushButton("Revoke")
        self.confirm_button.clicked.connect(self.confirm_revoke)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel_revoke)
        self.confirm_row = QWidget()
        confirm = QHBoxLayout(self.confirm_row)
        confirm.setContentsMargins(0, 0, 0, 0)
        confirm.addWidget(self.confirm_text, 1)
        confirm.addWidget(self.confirm_button)
        confirm.addWidget(self.cancel_button)
        self.confirm_row.hide()
        self.new_name = QLineEdit()
        self.new_name.setPlaceholderText("name for a new API key, e.g. laptop script")
        self.create_button = QPushButton("Create API key")
        self.create_button.clicked.connect(self.create_key)
        self.new_key = QLineEdit()
        self.new_key.setReadOnly(True)
        self.new_key.setPlaceholderText("a new key is shown here once")
        copy = QPushButton("Copy key")
        copy.clicked.connect(self.copy_key)
        self.status = _plain_label()
        self.usage_line = _plain_label("Select a row to see its usage.")
        self.table.itemSelectionChanged.connect(self._show_usage)

        buttons = QHBoxLayout()
        buttons.addWidget(self.revoke_button)
        buttons.addWidget(refresh)
        buttons.addStretch(1)
        buttons.addWidget(self.hide_revoked)
        create = QHBoxLayout()
        create.addWidget(self.new_name, 1)
        create.addWidget(self.create_button)
        shown = QHBoxLayout()
        shown.addWidget(self.new_key, 1)
        shown.addWidget(copy)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table)
        layout.addWidget(self.usage_line)
        layout.addLayout(buttons)
        layout.addWidget(self.confirm_row)
        layout.addLayout(create)
        layout.addLayout(shown)
        layout.addWidget(self.status)
        self.resize(1240, 440)
        self.refresh()

    def refresh(self) -> None:
        self._bridge.when_done(self._controller.credentials(), self._show, self._error)

    def _show(self, rows: list[Credential]) -> None:
        self.all_rows = rows
        self._fill()

    def _fill(self) -> None:
        hide = self.hide_revoked.isChecked()
        rows = [r for r in self.all_rows if r.active or not hide]
        self.rows = rows
        self.table.setRowCount(len(rows))
        for i, row in enumerate(rows):
            values = (
                row.kind,
                row.name,
                row.detail,
                _when(row.last_seen),
                f"{row.requests:,}",
                f"{row.tokens:,}",
                "active" if row.active else "revoked",
                _expiry(row),
            )
            for j, value in enumerate(values):
                item = QTableWidgetItem(value)
                item.setToolTip(literal_tooltip(value))  # a long name is whole here
                self.table.setItem(i, j, item)
            self._fill_usage(i, row)
        self._show_usage()

    def _fill_usage(self, i: int, row: Credential) -> None:
        for column, used, limit, period in (
            (TODAY_COLUMN, row.recent.tokens_today, _day_limit(row), "today"),
            (MONTH_COLUMN, row.recent.tokens_month, _month_limit(row), "this month"),
        ):
            words, warn = budget_words(used, limit)
            item = QTableWidgetItem(words)
            item.setToolTip(literal_tooltip(f"{words} tokens {period} (UTC)"))
            if warn is not None:
                item.setForeground(warn)
                font = QFont(item.font())
                font.setBold(True)
                item.setFont(font)
            self.table.setItem(i, column, item)
        chart = UsageChart(row.recent.tokens_per_day, _day_limit(row))
        chart.setToolTip(
            literal_tooltip(
                f"Tokens per UTC day, the last {CHART_DAYS} days (today last): "
                f"peak {max(row.recent.tokens_per_day, default=0):,}"
            )
        )
        self.table.setCellWidget(i, CHART_COLUMN, chart)
        self.table.setItem(i, CHART_COLUMN, QTableWidgetItem())  # sized by the chart's hint

    def _show_usage(self) -> None:
        index = self.table.currentRow()
        if 0 <= index < len(self.rows):
            self.usage_line.setText(usage_summary(self.rows[index]))
        else:
            self.usage_line.setText("Select a row to see its usage.")

    def revoke_selected(self) -> None:
        """Asks first, in the window: revoking cannot be undone."""
        index = self.table.currentRow()
        if not 0 <= index < len(self.rows):
            self.status.setText("Select a row to revoke.")
            return
        row = self.rows[index]
        if not row.active:
            self.status.setText(f"{row.name} is already revoked.")
            return
        self.pending = row
        self.confirm_text.setText(
            f"Revoke {row.kind} “{row.name}”? It loses access at once; this cannot be undone."
        )
        self.confirm_row.show()

    def cancel_revoke(self) -> None:
        self.pending = None
        self.confirm_row.hide()

    def confirm_revoke(self) -> None:
        row, self.pending = self.pending, None
        self.confirm_row.hide()
        if row is None:
            return
        self._bridge.when_done(
            self._controller.revoke(row.kind, row.id),
            lambda _: self._after(f"Revoked {row.name}."),
            self._error,
        )

    def create_key(self) -> None:
        name = self.new_name.text().strip()
        if not name:
            self.status.setText("Give the new key a name.")
            return
        self._bridge.when_done(
            self._controller.create_key(name, APP_KEY_SCOPES), self._created, self._error
        )

    def copy_key(self) -> None:
        if not self.new_key.text():
            self.status.setText("Create a key first.")
            return
        QGuiApplication.clipboard().setText(self.new_key.text())
        self.status.setText("Copied.")

    def _created(self, key: str) -> None:
        self.new_key.setText(key)
        self.new_name.clear()
        self._after("Created. Copy the key now: it is not shown again.")

    def _after(self, message: str) -> None:
        self.status.setText(message)
        self.refresh()

    def _error(self, error: BaseException) -> None:
        self.status.setText(str(error))
