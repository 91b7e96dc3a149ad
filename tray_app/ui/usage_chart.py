"""A small bar chart of tokens per day, sized for a table cell: one bar a day, today's last,
the daily budget as a dashed line, a day that came near its budget in the warning colour."""

from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtCore import QPointF, QRectF, QSize, Qt
from PySide6.QtGui import QColor, QPainter, QPaintEvent, QPen
from PySide6.QtWidgets import QWidget

BAR = QColor("#4a78c2")
TODAY = QColor("#23508f")
WARNING = QColor("#c05a00")
OVER = QColor("#c62828")
BASELINE = QColor("#9aa3ad")
# Its own light ground, so the bars read on a selected (highlighted) row too.
GROUND = QColor("#f4f6f9")


def near_budget(used: int, limit: int) -> bool:
    """From 90 % on, a day's bar and the window's words warn (in integers: no rounding)."""
    return used * 10 >= limit * 9


class UsageChart(QWidget):
    def __init__(self, values: Sequence[int], limit: int | None = None) -> None:
        super().__init__()
        self.values = tuple(values)
        self.limit = limit
        self.setMinimumSize(self.sizeHint())
        self.setAttribute(Qt.WidgetAttribute.WA_TransparentForMouseEvents)  # the row selects

    def sizeHint(self) -> QSize:
        return QSize(9 * max(len(self.values), 1) + 4, 22)

    def bar_colour(self, index: int) -> QColor:
        used = self.values[index]
        if self.limit is not None and used >= self.limit and used:
            return OVER
        if self.limit is not None and used and near_budget(used, self.limit):
            return WARNING
        return TODAY if index == len(self.values) - 1 else BAR

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        painter.fillRect(QRectF(self.rect()).adjusted(1, 1, -1, -1), GROUND)
        area = QRectF(self.rect()).adjusted(2, 3, -2, -3)
        bottom = area.bottom()
        painter.setPen(QPen(BASELINE, 1))
        painter.drawLine(QPointF(area.left(), bottom), QPointF(area.right(), bottom))
        if not self.values:
            painter.end()
            return
        top = max(max(self.values), self.limit or 0, 1)
        slot = area.width() / len(self.values)
        painter.setPen(Qt.PenStyle.NoPen)
        for i, used in enumerate(self.values):
            height = area.height() * used / top
            if used and height < 1:
                height = 1  # a little use still shows
            painter.setBrush(self.bar_colour(i))
            painter.drawRect(
                QRectF(area.left() + i * slot + 1, bottom - height, max(slot - 2, 1), height)
            )
        if self.limit:
            y = bottom - area.height() * self.limit / top
            pen = QPen(OVER, 1, Qt.PenStyle.DashLine)
            painter.setPen(pen)
            painter.drawLine(QPointF(area.left(), y), QPointF(area.right(), y))
        painter.end()
