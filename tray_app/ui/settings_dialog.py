"""Settings, non-modal: LM Studio, tunnel, allowed models, token lifetime, limits, start-up.

Secret fields are write-only: they never show a stored value, only whether one is stored.
"""

from __future__ import annotations

from dataclasses import replace

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from tray_app.config.settings import parse_duration
from tray_app.control.controller import AppSettings, AppState
from tray_app.ui.bridge import UiBridge
from tray_app.ui.port import ControllerPort

PROVIDERS = (
    ("none", "None (this computer only)"),
    ("ngrok", "ngrok (encrypted, anywhere)"),
    ("lan", "LAN (this network, not encrypted)"),
)


def _duration_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}"


class SettingsDialog(QWidget):
    def __init__(self, controller: ControllerPort, bridge: UiBridge) -> None:
        super().__init__()
        self.setWindowTitle("LM Gate — settings")
        self._controller = controller
        self._bridge = bridge
        self._loaded: AppSettings | None = None

        self.upstream = QLineEdit()
        self.test_button = QPushButton("Test connection")
        self.test_button.clicked.connect(self.test_connection)
        self.test_result = QLabel("")
        self.test_result.setWordWrap(True)
        self.lmstudio_token = QLineEdit()
        self.lmstudio_token.setEchoMode(QLineEdit.EchoMode.Password)
        self.provider = QComboBox()
        for value, label in PROVIDERS:
            self.provider.addItem(label, value)
        self.ngrok_token = QLineEdit()
        self.ngrok_token.setEchoMode(QLineEdit.EchoMode.Password)
        self.domain = QLineEdit()
        self.domain.setPlaceholderText("your-name.ngrok-free.app (optional)")
        self.models = QListWidget()
        self.models.setMaximumHeight(120)
        self.token_ttl = QLineEdit()
        self.rpm = QSpinBox()
        self.rpm.setRange(1, 100_000)
        self.concurrency = QSpinBox()
        self.concurrency.setRange(1, 1000)
        self.start_at_login = QCheckBox("Start LM Gate when I log in")
        self.go_public_at_start = QCheckBox("Go public when LM Gate starts")
        self.save_button = QPushButton("Save")
        self.save_button.clicked.connect(self.save)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        upstream_row = QHBoxLayout()
        upstream_row.addWidget(self.upstream, 1)
        upstream_row.addWidget(self.test_button)
        form = QFormLayout()
        form.addRow("LM Studio URL", upstream_row)
        form.addRow("", self.test_result)
        form.addRow("LM Studio API token", self.lmstudio_token)
        form.addRow("Go public with", self.provider)
        form.addRow("ngrok authtoken", self.ngrok_token)
        form.addRow("Reserved ngrok domain", self.domain)
        form.addRow("Allowed models (none ticked = all)", self.models)
        form.addRow("Default token lifetime", self.token_ttl)
        form.addRow("Requests per minute (per caller)", self.rpm)
        form.addRow("Requests at once (per caller)", self.concurrency)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.start_at_login)
        layout.addWidget(self.go_public_at_start)
        layout.addWidget(self.save_button)
        layout.addWidget(self.status)
        bridge.when_done(controller.settings(), self.load, self._error)

    def load(self, settings: AppSettings) -> None:
        self._loaded = settings
        self.upstream.setText(settings.upstream_url)
        self.lmstudio_token.clear()
        self.lmstudio_token.setPlaceholderText(
            "stored — type to replace" if settings.lmstudio_token_set else "not set"
        )
        self.provider.setCurrentIndex(max(0, self.provider.findData(settings.tunnel_provider)))
        self.ngrok_token.clear()
        self.ngrok_token.setPlaceholderText(
            "stored in the keyring — type to replace"
            if settings.ngrok_token_set
            else "paste from dashboard.ngrok.com"
        )
        self.domain.setText(settings.ngrok_domain)
        self._set_models(list(settings.allowed_models), settings.allowed_models)
        self.token_ttl.setText(_duration_text(settings.token_ttl))
        self.rpm.setValue(settings.requests_per_minute)
        self.concurrency.setValue(settings.concurrent_requests)
        self.start_at_login.setChecked(settings.start_at_login)
        self.go_public_at_start.setChecked(settings.go_public_at_start)

    def _set_models(self, available: list[str], allowed: tuple[str, ...]) -> None:
        self.models.clear()
        for model in dict.fromkeys([*available, *allowed]):
            item = QListWidgetItem(model)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(
                Qt.CheckState.Checked if model in allowed else Qt.CheckState.Unchecked
            )
            self.models.addItem(item)

    def _checked_models(self) -> tuple[str, ...]:
        return tuple(
            self.models.item(i).text()
            for i in range(self.models.count())
            if self.models.item(i).checkState() == Qt.CheckState.Checked
        )

    def test_connection(self) -> None:
        self.test_result.setText("Testing…")
        token = self.lmstudio_token.text().strip() or None
        self._bridge.when_done(
            self._controller.test_connection(self.upstream.text(), token), self._tested, self._error
        )

    def _tested(self, result: tuple[bool, list[str]]) -> None:
        ok, details = result
        if ok:
            self.test_result.setText(f"Connected. Models: {', '.join(details) or 'none loaded'}")
            self._set_models(details, self._checked_models())
        else:
            self.test_result.setText(details[0] if details else "Failed.")

    def collect(self) -> AppSettings:
        if self._loaded is None:
            raise ValueError("the settings are still loading")
        try:
            ttl = parse_duration(self.token_ttl.text())
        except ValueError as exc:
            raise ValueError(f"Default token lifetime {exc}") from None
        return replace(
            self._loaded,
            upstream_url=self.upstream.text().strip(),
            tunnel_provider=str(self.provider.currentData()),
            ngrok_domain=self.domain.text().strip(),
            allowed_models=self._checked_models(),
            token_ttl=ttl,
            requests_per_minute=self.rpm.value(),
            concurrent_requests=self.concurrency.value(),
            go_public_at_start=self.go_public_at_start.isChecked(),
            start_at_login=self.start_at_login.isChecked(),
            new_lmstudio_token=self.lmstudio_token.text().strip() or None,
            new_ngrok_token=self.ngrok_token.text().strip() or None,
        )

    def save(self) -> None:
        try:
            new = self.collect()
        except ValueError as exc:
            self.status.setText(str(exc))
            return
        self.status.setText("Saving…")
        self.save_button.setEnabled(False)
        self._bridge.when_done(self._controller.save_settings(new), self._saved, self._error)

    def _saved(self, state: AppState) -> None:
        self.save_button.setEnabled(True)
        self.status.setText("Saved.")
        self._bridge.when_done(self._controller.settings(), self.load, self._error)

    def _error(self, error: BaseException) -> None:
        self.save_button.setEnabled(True)
        self.status.setText(str(error))
