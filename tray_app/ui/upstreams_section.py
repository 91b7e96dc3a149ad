"""Settings' *Upstreams* section: the machines behind LM Gate, ``local`` (LM Studio's URL above)
first, with Add, Test and Remove.

Each change is written to the config file at once (as ``lmgate upstream add|remove`` writes
it), not through Save; the controller restarts the gateway to use it, and this section says
so. Errors are the config parsers' own words, shown inline. A name, URL, model id or error
text may come from another machine: everything here is plain text, never markup.
"""

from __future__ import annotations

import concurrent.futures
import html
from typing import Protocol, runtime_checkable

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from tray_app.control.upstream_status import (
    LOCAL,
    WEIGHT_MAX,
    UpstreamRow,
    UpstreamsChanged,
)
from tray_app.ui.bridge import UiBridge

COLUMNS = ("Name", "URL", "Weight", "Enabled", "Token", "Test")
NAME_COLUMN, TEST_COLUMN = 0, len(COLUMNS) - 1


@runtime_checkable
class UpstreamsPort(Protocol):
    """What the section needs from the core (ThreadedController has it)."""

    def upstream_rows(self) -> concurrent.futures.Future[tuple[UpstreamRow, ...]]: ...

    def add_upstream(
        self, name: str, url: str, weight: int = 1, token: str | None = None
    ) -> concurrent.futures.Future[UpstreamsChanged]: ...

    def remove_upstream(self, name: str) -> concurrent.futures.Future[UpstreamsChanged]: ...

    def test_upstream(self, name: str) -> concurrent.futures.Future[tuple[bool, str]]: ...


def _cell(text: str) -> QTableWidgetItem:
    item = QTableWidgetItem(text)
    item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
    return item


class UpstreamsSection(QGroupBox):
    def __init__(self, controller: UpstreamsPort, bridge: UiBridge) -> None:
        super().__init__("Upstreams: the machines LM Gate sends requests to")
        self._controller = controller
        self._bridge = bridge
        self.rows: tuple[UpstreamRow, ...] = ()

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(TEST_COLUMN, QHeaderView.ResizeMode.Stretch)
        self.table.setMaximumHeight(150)
        self.table.itemSelectionChanged.connect(self._selection_changed)
        self.test_button = QPushButton("Test")
        self.test_button.clicked.connect(self.test_selected)
        self.remove_button = QPushButton("Remove")
        self.remove_button.clicked.connect(self.remove_selected)

        self.name = QLineEdit()
        self.name.setPlaceholderText("name, like desk")
        self.url = QLineEdit()
        self.url.setPlaceholderText("http://192.168.1.20:1234")
        self.weight = QSpinBox()
        self.weight.setRange(1, WEIGHT_MAX)  # what the config accepts, no more
        self.weight.setToolTip("Preferred among equally busy machines: higher first")
        self.token = QLineEdit()
        self.token.setEchoMode(QLineEdit.EchoMode.Password)
        self.token.setPlaceholderText("API token, if it needs one")
        self.add_button = QPushButton("Add")
        self.add_button.clicked.connect(self.add)

        self.status = QLabel("")
        self.status.setTextFormat(Qt.TextFormat.PlainText)
        self.status.setWordWrap(True)
        hint = QLabel(
            "“local” is the LM Studio URL above. Add and Remove change the config file at "
            "once, without Save; a running LM Gate restarts to use the change."
        )
        hint.setWordWrap(True)

        actions = QHBoxLayout()
        actions.addStretch(1)
        actions.addWidget(self.test_button)
        actions.addWidget(self.remove_button)
        adding = QHBoxLayout()
        adding.addWidget(self.name, 1)
        adding.addWidget(self.url, 2)
        adding.addWidget(self.weight)
        adding.addWidget(self.token, 1)
        adding.addWidget(self.add_button)
        layout = QVBoxLayout(self)
        layout.addWidget(hint)
        layout.addWidget(self.table)
        layout.addLayout(actions)
        layout.addLayout(adding)
        layout.addWidget(self.status)
        self._selection_changed()

    def refresh(self) -> None:
        """Ask for the list again (the dialog does, each time it loads the settings)."""
        self._bridge.when_done(self._controller.upstream_rows(), self.show_rows, self._error)

    def show_rows(self, rows: tuple[UpstreamRow, ...]) -> None:
        self.rows = rows
        self.table.setRowCount(len(rows))
        for index, row in enumerate(rows):
            cells = (
                row.name,
                row.url,
                str(row.weight),
                "yes" if row.enabled else "no",
                "stored" if row.token_set else "none",
                "",
            )
            for column, text in enumerate(cells):
                self.table.setItem(index, column, _cell(text))
        self._selection_changed()

    def selected(self) -> UpstreamRow | None:
        chosen = self.table.selectionModel().selectedRows()
        return self.rows[chosen[0].row()] if chosen else None

    def _selection_changed(self) -> None:
        row = self.selected()
        self.test_button.setEnabled(row is not None)
        # "local" is LM Studio's URL above: it is changed there, never removed.
        self.remove_button.setEnabled(row is not None and row.name != LOCAL)

    def _result_cell(self, name: str) -> QTableWidgetItem | None:
        for index, row in enumerate(self.rows):
            if row.name == name:
                return self.table.item(index, TEST_COLUMN)
        return None  # the list changed meanwhile

    def test_selected(self) -> None:
        row = self.selected()
        if row is None:
            return
        cell = self._result_cell(row.name)
        if cell is not None:
            cell.setText("Testing…")
        name = row.name
        self._bridge.when_done(
            self._controller.test_upstream(name),
            lambda result: self._tested(name, result),
            self._error,
        )

    def _tested(self, name: str, result: tuple[bool, str]) -> None:
        ok, words = result
        cell = self._result_cell(name)
        if cell is not None:
            cell.setText(("OK: " if ok else "Failed: ") + words)
            # A tooltip takes what looks like HTML as HTML: another machine's model ids are
            # plain text.
            cell.setToolTip(f"<qt>{html.escape(words)}</qt>")
        self.status.setText(words)

    def add(self) -> None:
        self.add_button.setEnabled(False)
        self.status.setText("Adding…")
        token = self.token.text().strip() or None
        self._bridge.when_done(
            self._controller.add_upstream(
                self.name.text(), self.url.text(), self.weight.value(), token
            ),
            self._added,
            self._error,
        )

    def _added(self, changed: UpstreamsChanged) -> None:
        for field in (self.name, self.url, self.token):
            field.clear()
        self.weight.setValue(1)
        self._changed(changed)

    def remove_selected(self) -> None:
        row = self.selected()
        if row is None or row.name == LOCAL:
            return
        self.remove_button.setEnabled(False)
        self.status.setText(f"Removing {row.name}…")
        self._bridge.when_done(
            self._controller.remove_upstream(row.name), self._changed, self._error
        )

    def _changed(self, changed: UpstreamsChanged) -> None:
        self.add_button.setEnabled(True)
        self.show_rows(changed.rows)
        self.status.setText(changed.message)

    def _error(self, error: BaseException) -> None:
        self.add_button.setEnabled(True)
        self._selection_changed()
        self.status.setText(str(error))
