"""The QR window: a fresh one-time pairing code for a phone, with a live countdown that renews
the code when it runs out; and a tab with an OpenAI base URL and key for apps."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from tray_app.control.controller import PairingLink
from tray_app.ui.bridge import UiBridge
from tray_app.ui.port import ControllerPort
from tray_app.ui.qr import MAX_PAYLOAD, qr_pixmap


def _copy_row(field: QLineEdit, label: str) -> QHBoxLayout:
    row = QHBoxLayout()
    row.addWidget(field, 1)
    button = QPushButton(label)
    button.clicked.connect(lambda: QGuiApplication.clipboard().setText(field.text()))
    row.addWidget(button)
    return row


class QrWindow(QWidget):
    def __init__(
        self, controller: ControllerPort, bridge: UiBridge, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__()
        self.setWindowTitle("LM Gate — connect a phone")
        self._controller = controller
        self._bridge = bridge
        self._clock = clock
        self.link: PairingLink | None = None
        self._renewed_expired = False
        self.tabs = QTabWidget()

        phone = QWidget()
        self.qr_label = QLabel("Making a pairing code…")
        self.qr_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.qr_label.setMinimumSize(300, 300)
        self.countdown = QLabel("")
        self.countdown.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.url_field = QLineEdit()
        self.url_field.setReadOnly(True)
        hint = QLabel("Scan with the phone's camera. The code works once, for one device.")
        hint.setWordWrap(True)
        renew = QPushButton("New code")
        renew.clicked.connect(self.refresh)
        layout = QVBoxLayout(phone)
        layout.addWidget(hint)
        layout.addWidget(self.qr_label)
        layout.addWidget(self.countdown)
        layout.addLayout(_copy_row(self.url_field, "Copy link"))
        layout.addWidget(renew)
        self.tabs.addTab(phone, "Phone")

        apps = QWidget()
        self.apps_qr = QLabel("Open this tab to make a key for an app.")
        self.apps_qr.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.base_url_field = QLineEdit()
        self.base_url_field.setReadOnly(True)
        self.key_field = QLineEdit()
        self.key_field.setReadOnly(True)
        note = QLabel(
            "OpenAI-compatible settings for apps and SDKs. The key is new and shown "
            "only here; revoke it in Devices & tokens."
        )
        note.setWordWrap(True)
        apps_layout = QVBoxLayout(apps)
        apps_layout.addWidget(note)
        apps_layout.addWidget(QLabel("Base URL"))
        apps_layout.addLayout(_copy_row(self.base_url_field, "Copy"))
        apps_layout.addWidget(QLabel("API key"))
        apps_layout.addLayout(_copy_row(self.key_field, "Copy"))
        apps_layout.addWidget(self.apps_qr)
        self.tabs.addTab(apps, "For apps")
        self.tabs.currentChanged.connect(self._tab_changed)

        self.error = QLabel("")
        self.error.setWordWrap(True)
        self.error.setStyleSheet("color: #b91c1c")
        outer = QVBoxLayout(self)
        outer.addWidget(self.tabs)
        outer.addWidget(self.error)

        self._timer = QTimer(self)
        self._timer.setInterval(1000)
        self._timer.timeout.connect(self._tick)

    def showEvent(self, event: object) -> None:
        super().showEvent(event)  # type: ignore[arg-type]
        if self.link is None:
            self.refresh()
        self._timer.start()

    def hideEvent(self, event: object) -> None:
        self._timer.stop()
        super().hideEvent(event)  # type: ignore[arg-type]

    def refresh(self) -> None:
        self.error.setText("")
        self._bridge.when_done(self._controller.pairing_link(), self._show_link, self._failed)

    def _show_link(self, link: PairingLink) -> None:
        self.link = link
        if len(link.url) > MAX_PAYLOAD:
            self.error.setText("This address is long; the QR code may be hard to scan.")
        self.qr_label.setPixmap(qr_pixmap(link.url, module_px=6))
        self.url_field.setText(link.url)
        self.url_field.setCursorPosition(0)  # show where the link goes, not the code's tail
        self._tick()

    def _failed(self, error: BaseException) -> None:
        self.error.setText(str(error))

    def _tick(self) -> None:
        if self.link is None:
            return
        left = int(self.link.expires_at - self._clock())
        if left <= 0:
            if self._renewed_expired:
                # A fresh code that is already expired: the clock is off, do not loop.
                self.countdown.setText(
                    "The new code is already expired: is this computer's clock right?"
                )
                return
            self.countdown.setText("Code expired: making a new one…")
            self._renewed_expired = True
            self.link = None
            self.refresh()
            return
        self._renewed_expired = False
        self.countdown.setText(f"Expires in {left // 60}:{left % 60:02d}")

    def _tab_changed(self, index: int) -> None:
        if index == 1 and not self.key_field.text():
            self._bridge.when_done(
                self._controller.openai_settings(), self._show_app_settings, self._failed
            )

    def _show_app_settings(self, settings: tuple[str, str]) -> None:
        base_url, key = settings
        self.base_url_field.setText(base_url)
        self.key_field.setText(key)
        payload = json.dumps({"base_url": base_url, "api_key": key}, separators=(",", ":"))
        self.apps_qr.setPixmap(qr_pixmap(payload, module_px=5))
