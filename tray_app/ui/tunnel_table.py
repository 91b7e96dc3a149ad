"""The ways to go public side by side, as the first-run guide and Settings show them: the one
declaration's columns and cells, each cell plain text (no markup can slip in)."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QHeaderView, QTableWidget, QTableWidgetItem

from tray_app.control.tunnel_setup import CHOICE_COLUMNS, ChoiceRow, choice_cells


class ChoiceTable(QTableWidget):
    def __init__(self, minimum_height: int = 340) -> None:
        super().__init__(0, len(CHOICE_COLUMNS))
        self.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.setWordWrap(True)
        self.verticalHeader().setVisible(False)
        self.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.setMinimumSize(820, minimum_height)
        self.setTextElideMode(Qt.TextElideMode.ElideNone)
        self.setSelectionMode(QTableWidget.SelectionMode.NoSelection)
        self.setFocusPolicy(Qt.FocusPolicy.NoFocus)

    def fill(self, rows: tuple[ChoiceRow, ...]) -> None:
        self.clear()
        self.setColumnCount(len(CHOICE_COLUMNS))
        self.setHorizontalHeaderLabels(list(CHOICE_COLUMNS))
        self.setRowCount(len(rows))
        for index, row in enumerate(rows):
            c = row.choice
            title, *rest = choice_cells(c)
            title += "" if row.program_found else f"\n({c.program} not installed)"
            for column, value in enumerate((title, *rest)):
                self.setItem(index, column, QTableWidgetItem(value))
        self.resizeRowsToContents()

    def text(self) -> str:
        """Every cell's text, row by row (what the table says, for tests and screen readers)."""
        return "\n".join(
            " | ".join(
                item.text() if (item := self.item(r, c)) is not None else ""
                for c in range(self.columnCount())
            )
            for r in range(self.rowCount())
        )
