"""Devices & tokens: every credential with last seen and usage; revoke one, create an API key."""

from __future__ import annotations

from datetime import datetime

from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from tray_app.control.controller import Credential
from tray_app.ui.bridge import UiBridge
from tray_app.ui.port import ControllerPort

COLUMNS = ("Kind", "Name", "Scopes", "Last seen", "Requests", "Tokens", "Status")
APP_KEY_SCOPES = frozenset({"chat", "models", "embeddings"})


def _when(epoch: float | None) -> str:
    return "never" if epoch is None else datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M")


class DevicesWindow(QWidget):
    def __init__(self, controller: ControllerPort, bridge: UiBridge) -> None:
        super().__init__()
        self.setWindowTitle("LM Gate — devices & tokens")
        self._controller = controller
        self._bridge = bridge
        self.rows: list[Credential] = []
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.revoke_button = QPushButton("Revoke selected")
        self.revoke_button.clicked.connect(self.revoke_selected)
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(self.refresh)
        self.new_name = QLineEdit()
        self.new_name.setPlaceholderText("name for a new API key, e.g. laptop script")
        self.create_button = QPushButton("Create API key")
        self.create_button.clicked.connect(self.create_key)
        self.new_key = QLineEdit()
        self.new_key.setReadOnly(True)
        self.new_key.setPlaceholderText("a new key is shown here once")
        copy = QPushButton("Copy key")
        copy.clicked.connect(lambda: QGuiApplication.clipboard().setText(self.new_key.text()))
        self.status = QLabel("")

        buttons = QHBoxLayout()
        buttons.addWidget(self.revoke_button)
        buttons.addWidget(refresh)
        create = QHBoxLayout()
        create.addWidget(self.new_name, 1)
        create.addWidget(self.create_button)
        shown = QHBoxLayout()
        shown.addWidget(self.new_key, 1)
        shown.addWidget(copy)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table)
        layout.addLayout(buttons)
        layout.addLayout(create)
        layout.addLayout(shown)
        layout.addWidget(self.status)
        self.resize(760, 420)
        self.refresh()

    def refresh(self) -> None:
        self._bridge.when_done(self._controller.credentials(), self._show, self._error)

    def _show(self, rows: list[Credential]) -> None:
        self.rows = rows
        self.table.setRowCount(len(rows))
        for i, row in enumerate(rows):
            values = (
                row.kind,
                row.name,
                row.detail,
                _when(row.last_seen),
                str(row.requests),
                str(row.tokens),
                "active" if row.active else "revoked",
            )
            for j, value in enumerate(values):
                self.table.setItem(i, j, QTableWidgetItem(value))

    def revoke_selected(self) -> None:
        index = self.table.currentRow()
        if not 0 <= index < len(self.rows):
            self.status.setText("Select a row to revoke.")
            return
        row = self.rows[index]
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

    def _created(self, key: str) -> None:
        self.new_key.setText(key)
        self.new_name.clear()
        self._after("Created. Copy the key now: it is not shown again.")

    def _after(self, message: str) -> None:
        self.status.setText(message)
        self.refresh()

    def _error(self, error: BaseException) -> None:
        self.status.setText(str(error))
