"""The QR window: a fresh one-time pairing code for a phone, with a live countdown that renews
the code when it runs out; and a tab with an OpenAI base URL and key for apps.

The apps' key lasts 30 days and is not single-use, unlike a pairing code: whoever reads it off
the screen (over a shoulder, in a screenshot, on a shared screen) can use it until it expires.
So the tab keeps it masked, and draws its QR code only when asked and only for a minute."""

from __future__ import annotations

import time
from collections.abc import Callable

from PySide6.QtCore import QEvent, Qt, QTimer
from PySide6.QtGui import QGuiApplication, QPixmap
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from tray_app.control.controller import (
    FOR_APPS,
    AppSettings,
    Credential,
    PairingLink,
    chatbox_import_link,
)
from tray_app.qr_codes import qr_matrix
from tray_app.ui.bridge import UiBridge, ignore
from tray_app.ui.port import ControllerPort
from tray_app.ui.qr import MAX_PAYLOAD, qr_pixmap

APPS_QR_PX = 320  # the apps' code carries a whole provider config: denser than a pairing link
APPS_QR_SECONDS = 60  # long enough to open a camera app and scan, short enough not to be left up
PAIRING_CHECK_TICKS = 2  # look for a newly paired phone every this many seconds
APPS_QR_HIDDEN = "The code is hidden: it holds the key.\nShow it when the phone is ready."


def _copy_row(field: QLineEdit, label: str, copied: Callable[[str], None]) -> QHBoxLayout:
    row = QHBoxLayout()
    row.addWidget(field, 1)
    button = QPushButton(label)
    button.clicked.connect(lambda: copied(field.text()))
    row.addWidget(button)
    return row


def _set_masked(field: QLineEdit, toggle: QPushButton, masked: bool) -> None:
    field.setEchoMode(QLineEdit.EchoMode.Password if masked else QLineEdit.EchoMode.Normal)
    toggle.setText("Show" if masked else "Hide")
    if toggle.isChecked() == masked:
        toggle.setChecked(not masked)


def _secret_row(field: QLineEdit, copied: Callable[[str], None]) -> tuple[QHBoxLayout, QPushButton]:
    """A masked field with a Show toggle; Copy still copies the real text (``text()`` is the
    value whatever the echo mode shows)."""
    row = _copy_row(field, "Copy", copied)
    toggle = QPushButton("Show")
    toggle.setCheckable(True)
    toggle.toggled.connect(lambda shown: _set_masked(field, toggle, not shown))
    row.insertWidget(1, toggle)
    _set_masked(field, toggle, True)
    return row, toggle


def _devices(rows: list[Credential]) -> dict[str, str]:
    """Active paired devices: id -> name."""
    return {r.id: r.name for r in rows if r.kind == "device" and r.active}


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
        # The devices paired before the code on screen was shown; one more means it was used.
        self._devices_before: dict[str, str] | None = None
        self._ticks = 0
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
        self.paired = QLabel("")
        # A device names itself when it pairs: shown as text, never as markup it could forge.
        self.paired.setTextFormat(Qt.TextFormat.PlainText)
        self.paired.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.paired.setStyleSheet("color: #15803d; font-weight: bold")
        layout.addWidget(self.paired)
        layout.addLayout(_copy_row(self.url_field, "Copy link", self._copy))
        layout.addWidget(renew)
        self.tabs.addTab(phone, "Phone")

        apps = QWidget()
        self.apps_qr = QLabel("Open this tab to make a key for an app.")
        self.apps_qr.setAlignment(Qt.AlignmentFlag.AlignCenter)
        # Room for the code from the start: the window is laid out before the code exists.
        self.apps_qr.setMinimumSize(APPS_QR_PX, APPS_QR_PX)
        # Lines broken by hand, not wrapped: a wrapped label under-reports its height, and
        # the code would be drawn over it.
        self.apps_hint = QLabel("")
        self.apps_hint.setAlignment(Qt.AlignmentFlag.AlignCenter)
        # "&S": Alt+S, so the button can be pressed without knowing where it is drawn.
        self.show_apps_qr = QPushButton("&Show QR for an app")
        self.show_apps_qr.setEnabled(False)  # until the link it draws exists
        self.show_apps_qr.clicked.connect(self.reveal_apps_qr)
        self.apps_qr_countdown = QLabel("")
        self.apps_qr_countdown.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self._apps_qr_until: float | None = None
        self.base_url_field = QLineEdit()
        self.base_url_field.setReadOnly(True)
        self.key_field = QLineEdit()
        self.key_field.setReadOnly(True)
        self.chatbox_field = QLineEdit()
        self.chatbox_field.setReadOnly(True)
        note = QLabel(
            "OpenAI-compatible settings for apps and SDKs. This tab keeps one\n"
            "key for 30 days (chat, models, embeddings); anyone who sees it can\n"
            "use it, so it stays hidden until you ask. To revoke it: tray menu →\n"
            "Devices & tokens…, select the key named “for-apps …”, Revoke\n"
            "selected. The next time this tab opens, it makes a new one."
        )
        apps_layout = QVBoxLayout(apps)
        apps_layout.addWidget(note)
        apps_layout.addWidget(self.apps_qr)
        apps_layout.addWidget(self.apps_qr_countdown)
        apps_layout.addWidget(self.show_apps_qr)
        apps_layout.addWidget(self.apps_hint)
        apps_layout.addWidget(QLabel("Base URL"))
        apps_layout.addLayout(_copy_row(self.base_url_field, "Copy", self._copy))
        apps_layout.addWidget(QLabel("API key"))
        key_row, self.key_show = _secret_row(self.key_field, self._copy)
        apps_layout.addLayout(key_row)
        apps_layout.addWidget(QLabel("Chatbox link (it holds the key too)"))
        chatbox_row, self.chatbox_show = _secret_row(self.chatbox_field, self._copy)
        apps_layout.addLayout(chatbox_row)
        self.tabs.addTab(apps, "For apps")
        self.tabs.currentChanged.connect(self._tab_changed)

        self.error = QLabel("")
        self.error.setTextFormat(Qt.TextFormat.PlainText)
        self.error.setWordWrap(True)
        self.error.setStyleSheet("color: #b91c1c")
        self.status = QLabel("")
        outer = QVBoxLayout(self)
        outer.addWidget(self.tabs)
        outer.addWidget(self.error)
        outer.addWidget(self.status)

        self._timer = QTimer(self)
        self._timer.setInterval(1000)
        self._timer.timeout.connect(self._tick)
        self._apps_timer = QTimer(self)
        self._apps_timer.setInterval(1000)
        self._apps_timer.timeout.connect(self._apps_tick)

    def showEvent(self, event: object) -> None:
        super().showEvent(event)  # type: ignore[arg-type]
        if self.link is None:
            self.refresh()
        self._timer.start()

    def hideEvent(self, event: object) -> None:
        self._timer.stop()
        self.hide_apps_secrets()  # a window put away must not come back showing the key
        super().hideEvent(event)  # type: ignore[arg-type]

    def changeEvent(self, event: QEvent) -> None:
        if event.type() == QEvent.Type.WindowStateChange and self.isMinimized():
            self.hide_apps_secrets()
        super().changeEvent(event)

    def _copy(self, text: str) -> None:
        QGuiApplication.clipboard().setText(text)
        self.status.setText("Copied.")

    def refresh(self) -> None:
        self.error.setText("")
        self._devices_before = None
        self._bridge.when_done(self._controller.pairing_link(), self._show_link, self._failed)
        # Asked after the code: a phone that pairs with it is not yet among these.
        self._bridge.when_done(self._controller.credentials(), self._note_devices, self._failed)

    def _note_devices(self, rows: list[Credential]) -> None:
        self._devices_before = _devices(rows)

    def _check_paired(self, rows: list[Credential]) -> None:
        if self._devices_before is None:
            return
        new = [name for ident, name in _devices(rows).items() if ident not in self._devices_before]
        if new:
            self.paired.setText(f"Paired: {new[-1]} ✓")
            self.refresh()  # that code is used up: a fresh one for the next phone

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
        self._ticks += 1
        if self._devices_before is not None and self._ticks % PAIRING_CHECK_TICKS == 0:
            self._bridge.when_done(self._controller.credentials(), self._check_paired, ignore)

    def _tab_changed(self, index: int) -> None:
        if index != 1:
            self.hide_apps_secrets()
        elif not self.key_field.text():
            self._bridge.when_done(
                self._controller.openai_settings(FOR_APPS), self._show_app_settings, self._failed
            )

    def hide_apps_secrets(self) -> None:
        """Mask the key and the link again and take the code down."""
        _set_masked(self.key_field, self.key_show, True)
        _set_masked(self.chatbox_field, self.chatbox_show, True)
        self._apps_timer.stop()
        self._apps_qr_until = None
        self.apps_qr_countdown.setText("")
        if self.chatbox_field.text():
            self.apps_qr.setPixmap(QPixmap())
            self.apps_qr.setText(APPS_QR_HIDDEN)

    def reveal_apps_qr(self) -> None:
        link = self.chatbox_field.text()
        if not link:
            return
        # The largest modules that fit the room the tab keeps for the code (~100 modules).
        module_px = max(2, APPS_QR_PX // len(qr_matrix(link)))
        self.apps_qr.setPixmap(qr_pixmap(link, module_px=module_px))
        self._apps_qr_until = self._clock() + APPS_QR_SECONDS
        self._apps_tick()
        self._apps_timer.start()

    def _apps_tick(self) -> None:
        if self._apps_qr_until is None:
            return
        left = int(self._apps_qr_until - self._clock())
        if left <= 0:
            self.hide_apps_secrets()
            return
        self.apps_qr_countdown.setText(f"The code hides in {left // 60}:{left % 60:02d}")

    def _show_app_settings(self, settings: tuple[str, str]) -> None:
        base_url, key = settings
        self.base_url_field.setText(base_url)
        self.key_field.setText(key)
        self.base_url_field.setCursorPosition(0)
        self.key_field.setCursorPosition(0)
        self.apps_qr.setText("Asking LM Studio for its models…")
        # The link lists the models LM Gate offers: LM Studio's, as Settings allow them.
        self._bridge.when_done(self._controller.settings(), self._ask_models, self._no_models)

    def _ask_models(self, settings: AppSettings) -> None:
        def allowed(result: tuple[bool, list[str]]) -> None:
            ok, models = result
            only = set(settings.auth_allowed_models)
            self._show_chatbox_link([m for m in models if not only or m in only] if ok else [])

        self._bridge.when_done(
            self._controller.test_connection(settings.upstream_url), allowed, self._no_models
        )

    def _no_models(self, _error: BaseException) -> None:
        self._show_chatbox_link([])

    def _show_chatbox_link(self, models: list[str]) -> None:
        """What a phone app imports: Chatbox's provider link (a camera app opens Chatbox
        with it); other apps take the base URL and key below. Drawn as a code only on
        request (``reveal_apps_qr``)."""
        link = chatbox_import_link(self.base_url_field.text(), self.key_field.text(), models)
        self.chatbox_field.setText(link)
        self.chatbox_field.setCursorPosition(0)
        self.apps_qr.setText(APPS_QR_HIDDEN)
        self.show_apps_qr.setEnabled(True)
        self.apps_hint.setText(
            f"Show the code, then scan it with the phone's camera within {APPS_QR_SECONDS} s\n"
            "to add LM Gate to Chatbox (1.15.1+) "
            + (
                f"with {len(models)} model{'s' if len(models) != 1 else ''}."
                if models
                else "without models (LM Studio listed none):\nfetch them in Chatbox."
            )
            + "\nOther apps: copy the base URL and key."
        )
