"""Settings, non-modal: LM Studio, the other machines behind it, tunnel, allowed models, token
lifetime, limits, start-up.

Secret fields are write-only: they never show a stored value, only whether one is stored.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, TypeVar

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

from tray_app.control.controller import AppSettings, AppState
from tray_app.control.settings_form import FORM_FIELDS, FormInput, FormKind
from tray_app.control.tunnel_setup import ChoiceRow
from tray_app.ui.bridge import UiBridge
from tray_app.ui.port import ControllerPort
from tray_app.ui.tunnel_table import ChoiceTable
from tray_app.ui.upstreams_section import UpstreamsPort, UpstreamsSection

W = TypeVar("W", bound=QWidget)

# Each provider's own fields (attributes of the dialog) show only while it is chosen.
PROVIDER_FIELDS: dict[str, tuple[str, ...]] = {
    "ngrok": ("ngrok_token", "domain"),
    "cloudflare-named": ("cloudflare_token", "cloudflare_hostname"),
}


def _input_for(field: FormInput) -> QWidget:
    """The widget for one declared form field."""
    if field.kind is FormKind.CHOICE:
        combo = QComboBox()
        for value, label in field.choices:
            combo.addItem(label, value)
        return combo
    if field.kind is FormKind.NUMBER:
        spin = QSpinBox()
        low, high = field.bounds or (0, 2**31 - 1)
        spin.setRange(low, min(high, 2**31 - 1))  # QSpinBox holds a C int
        return spin
    if field.kind is FormKind.MODELS:
        models = QListWidget()
        models.setMaximumHeight(120)
        return models
    if field.kind is FormKind.CHECKBOX:
        return QCheckBox(field.label)
    line = QLineEdit()
    line.setPlaceholderText(field.placeholder)
    return line


class SettingsDialog(QWidget):
    def __init__(self, controller: ControllerPort, bridge: UiBridge) -> None:
        super().__init__()
        self.setWindowTitle("LM Gate — settings")
        self._controller = controller
        self._bridge = bridge
        self._loaded: AppSettings | None = None

        self.inputs: dict[str, QWidget] = {f.key: _input_for(f) for f in FORM_FIELDS}
        self.upstream = self._input("upstream.url", QLineEdit)
        self.test_button = QPushButton("Test connection")
        self.test_button.clicked.connect(self.test_connection)
        self.test_result = QLabel("")
        # Model ids and errors come from LM Studio, which may be hostile: text, never markup.
        self.test_result.setTextFormat(Qt.TextFormat.PlainText)
        self.test_result.setWordWrap(True)
        self.lmstudio_token = QLineEdit()
        self.lmstudio_token.setEchoMode(QLineEdit.EchoMode.Password)
        self.provider = self._input("tunnel.provider", QComboBox)
        self.ngrok_token = QLineEdit()
        self.ngrok_token.setEchoMode(QLineEdit.EchoMode.Password)
        self.cloudflare_token = QLineEdit()
        self.cloudflare_token.setEchoMode(QLineEdit.EchoMode.Password)
        # The chosen way of going public, side by side with what it needs (from the one
        # declaration of the choices); plain text: it names paths and settings.
        self.provider_info = QLabel("")
        self.provider_info.setTextFormat(Qt.TextFormat.PlainText)
        self.provider_info.setWordWrap(True)
        self._choices: dict[str, ChoiceRow] = {}
        # All of them side by side, on request (the guide's table).
        self.compare_button = QPushButton("Compare the ways to go public…")
        self.compare_button.setCheckable(True)
        self.compare_table = ChoiceTable(minimum_height=380)
        self.compare_table.setVisible(False)
        self.compare_button.toggled.connect(self.compare_table.setVisible)
        self.provider.currentIndexChanged.connect(self._describe_provider)
        # "Install the ngrok agent": says what comes from where, and only a second click,
        # on the confirmation, downloads anything.
        self.install_button = QPushButton("Install the ngrok agent…")
        self.install_button.clicked.connect(self.ask_to_install)
        self.install_confirm = QPushButton("Download and install")
        self.install_confirm.clicked.connect(self.install_agent)
        self.install_cancel = QPushButton("Cancel")
        self.install_cancel.clicked.connect(self._hide_install_question)
        self.install_question = QLabel("")
        self.install_question.setTextFormat(Qt.TextFormat.PlainText)
        self.install_question.setWordWrap(True)
        self.install_row = QWidget()
        install_layout = QHBoxLayout(self.install_row)
        install_layout.setContentsMargins(0, 0, 0, 0)
        for button in (self.install_button, self.install_confirm, self.install_cancel):
            install_layout.addWidget(button)
        install_layout.addStretch(1)
        self.domain = self._input("tunnel.ngrok_domain", QLineEdit)
        self.cloudflare_hostname = self._input("tunnel.cloudflare_hostname", QLineEdit)
        self.models = self._input("auth.allowed_models", QListWidget)
        self.token_ttl = self._input("auth.token_ttl", QLineEdit)
        self.rpm = self._input("limits.requests_per_minute", QSpinBox)
        self.concurrency = self._input("limits.concurrent_requests", QSpinBox)
        self.start_at_login = QCheckBox("Start LM Gate when I log in")
        self.go_public_at_start = self._input("tunnel.go_public_at_start", QCheckBox)
        self.save_button = QPushButton("Save")
        self.save_button.clicked.connect(self.save)
        self.status = QLabel("")
        self.status.setTextFormat(Qt.TextFormat.PlainText)
        self.status.setWordWrap(True)
        self.port_info = QLabel("")
        self.port_info.setWordWrap(True)
        self.overrides_note = QLabel("")
        self.overrides_note.setWordWrap(True)
        # No keyring: said here, before a token is typed in that could not be kept.
        self.store_note = QLabel("")
        self.store_note.setWordWrap(True)
        self.store_note.setStyleSheet("color: #b45309")
        self.store_note.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        # A controller without upstreams (an older double) gets the form without the section.
        self.upstreams = (
            UpstreamsSection(controller, bridge) if isinstance(controller, UpstreamsPort) else None
        )

        upstream_row = QHBoxLayout()
        upstream_row.addWidget(self.upstream, 1)
        upstream_row.addWidget(self.test_button)
        # Rows that are not settings sit next to the setting they belong to.
        extra_rows: dict[str, list[tuple[str, QWidget | QHBoxLayout]]] = {
            "upstream.url": [("", self.test_result), ("LM Studio API token", self.lmstudio_token)],
            "tunnel.provider": [
                ("", self.provider_info),
                ("", self.compare_button),
                ("", self.compare_table),
                ("", self.install_question),
                ("", self.install_row),
                ("ngrok authtoken", self.ngrok_token),
                ("Cloudflare tunnel token", self.cloudflare_token),
            ],
        }
        form = self._form = QFormLayout()
        checkboxes: list[QWidget] = [self.start_at_login]
        for field in FORM_FIELDS:
            widget = self.inputs[field.key]
            if field.kind is FormKind.CHECKBOX:
                checkboxes.append(widget)
                continue
            form.addRow(field.label, upstream_row if widget is self.upstream else widget)
            for label, row in extra_rows.get(field.key, []):
                if row in (
                    self.provider_info,
                    self.compare_table,
                    self.install_question,
                    self.install_row,
                ):
                    # The whole width: a word-wrapped label in the field column is cut short.
                    form.addRow(row)
                else:
                    form.addRow(label, row)
        form.addRow("Port", self.port_info)
        layout = QVBoxLayout(self)
        layout.addWidget(self.store_note)
        layout.addLayout(form)
        if self.upstreams is not None:
            layout.addWidget(self.upstreams)
        layout.addWidget(self.overrides_note)
        for checkbox in checkboxes:
            layout.addWidget(checkbox)
        layout.addWidget(self.save_button)
        layout.addWidget(self.status)
        self._hide_install_question()
        form.setRowVisible(self.install_row, False)  # until the choices say ngrok is missing
        bridge.when_done(controller.settings(), self.load, self._error)
        bridge.when_done(controller.tunnel_choices(), self._set_choices, self._error)

    def _with_port(self, text: str) -> str:
        """The port a named tunnel must be routed to, once it is known (0 = any free port:
        then only the placeholder can be said)."""
        loaded = self._loaded
        port = loaded and (loaded.port_in_use or loaded.configured_port)
        return text.replace("<LM Gate's port>", str(port)) if port else text

    def ask_to_install(self) -> None:
        self._bridge.when_done(
            self._controller.ngrok_install_plan(), self._show_install_question, self._error
        )

    def _show_install_question(self, plan: tuple[str, str]) -> None:
        url, target = plan
        self.install_question.setText(
            f"This downloads the ngrok agent from {url} and installs it as {target}. "
            "Nothing else is downloaded, and LM Gate checks the program before using it."
        )
        _fit_height(self.install_question)
        self._form.setRowVisible(self.install_question, True)
        self.install_confirm.setVisible(True)
        self.install_cancel.setVisible(True)
        self.install_button.setVisible(False)

    def _hide_install_question(self) -> None:
        self.install_question.setText("")
        self._form.setRowVisible(self.install_question, False)
        self.install_confirm.setVisible(False)
        self.install_cancel.setVisible(False)
        self.install_button.setVisible(True)

    def install_agent(self) -> None:
        self.install_confirm.setEnabled(False)
        self.status.setText("Downloading the ngrok agent…")
        self._bridge.when_done(
            self._controller.install_ngrok_agent(), self._installed, self._install_failed
        )

    def _installed(self, said: str) -> None:
        self.install_confirm.setEnabled(True)
        self._hide_install_question()
        self.status.setText(said)
        self._bridge.when_done(self._controller.tunnel_choices(), self._set_choices, self._error)

    def _install_failed(self, error: BaseException) -> None:
        self.install_confirm.setEnabled(True)
        self._error(error)

    def _set_choices(self, rows: tuple[ChoiceRow, ...]) -> None:
        self._choices = {row.choice.provider.value: row for row in rows}
        self.compare_table.fill(rows)
        self._describe_provider()

    def _describe_provider(self) -> None:
        chosen = str(self.provider.currentData())
        for provider, names in PROVIDER_FIELDS.items():
            for name in names:
                self._form.setRowVisible(getattr(self, name), provider == chosen)
        row = self._choices.get(chosen)
        can_install = chosen == "ngrok" and row is not None and not row.program_found
        self._form.setRowVisible(self.install_row, can_install)
        if not can_install:
            self._hide_install_question()
        if row is None:
            self.provider_info.setText(
                "LM Gate stays on this computer." if chosen == "none" else ""
            )
            return
        c = row.choice
        lines = [
            f"Needs: {c.account}. Stable URL: {c.stable_url}. HTTPS: {c.https}.",
            f"Encryption ends at: {c.tls_ends_at}. Reachable by: {c.reach}.",
            f"Note: {self._with_port(c.note)}.",
        ]
        if can_install:
            lines.append(
                "ngrok is not installed on this computer: install it from ngrok.com, or let "
                "LM Gate download it (it says from where, and asks first)."
            )
        elif c.program and not row.program_found:
            lines.append(
                f"{c.program} is not installed on this computer (or not at {c.path_setting}): "
                "install it first; LM Gate never downloads programs by itself."
            )
        self.provider_info.setText("\n".join(lines))
        _fit_height(self.provider_info)

    def _input(self, key: str, kind: type[W]) -> W:
        widget = self.inputs[key]
        if not isinstance(widget, kind):
            raise TypeError(f"the form shows {key} as {type(widget).__name__}")
        return widget

    def load(self, settings: AppSettings) -> None:
        self._loaded = settings
        for field in FORM_FIELDS:
            self._show(field, getattr(settings, field.attribute))
        self.lmstudio_token.clear()
        self.lmstudio_token.setPlaceholderText(
            "stored — type to replace" if settings.lmstudio_token_set else "not set"
        )
        self.ngrok_token.clear()
        self.ngrok_token.setPlaceholderText(
            "stored in the keyring — type to replace"
            if settings.ngrok_token_set
            else "paste from dashboard.ngrok.com"
        )
        self.cloudflare_token.clear()
        self.cloudflare_token.setPlaceholderText(
            "stored in the keyring — type to replace"
            if settings.cloudflare_token_set
            else "the token of your tunnel (Cloudflare Zero Trust → Networks → Tunnels)"
        )
        self._describe_provider()
        self.store_note.setText(settings.store_problem or "")
        self.store_note.setVisible(bool(settings.store_problem))
        self.start_at_login.setChecked(settings.start_at_login)
        self._show_port(settings)
        self._show_overrides(dict(settings.overridden))
        if self.upstreams is not None:
            self.upstreams.refresh()

    def _show_port(self, settings: AppSettings) -> None:
        if settings.port_note:
            text = settings.port_note
        elif settings.port_in_use is not None:
            text = f"{settings.port_in_use} (on this computer only; internal when public)"
        else:
            text = f"{settings.configured_port} (not running)"
        self.port_info.setText(text)

    def _show_overrides(self, sources: dict[str, str]) -> None:
        """A field an environment variable or flag sets shows that value but cannot be
        edited: Save keeps the file's value of it."""
        named = []
        for field in FORM_FIELDS:
            widget = self.inputs[field.key]
            source = sources.get(field.key)
            widget.setEnabled(source is None)
            widget.setToolTip(f"Set by {source} for this run" if source else "")
            if source:
                named.append(f"{field.label} ({source})")
        self.overrides_note.setText(
            "Set for this run, not by Settings: " + ", ".join(named) + "." if named else ""
        )

    def _show(self, field: FormInput, value: object) -> None:
        widget = self.inputs[field.key]
        if isinstance(widget, QComboBox):
            widget.setCurrentIndex(max(0, widget.findData(str(value))))
        elif isinstance(widget, QSpinBox) and isinstance(value, int):
            widget.setValue(value)
        elif isinstance(widget, QListWidget) and isinstance(value, tuple):
            self._set_models(list(value), value)
        elif isinstance(widget, QCheckBox):
            widget.setChecked(bool(value))
        elif isinstance(widget, QLineEdit):
            widget.setText(field.text(value))

    def _read(self, field: FormInput) -> object:
        """What the field holds now; a typed duration is parsed here, the rest is checked
        (and any error named by key) when the controller saves."""
        widget = self.inputs[field.key]
        if isinstance(widget, QComboBox):
            return str(widget.currentData())
        if isinstance(widget, QSpinBox):
            return widget.value()
        if isinstance(widget, QListWidget):
            return self._checked_models()
        if isinstance(widget, QCheckBox):
            return widget.isChecked()
        text = widget.text().strip() if isinstance(widget, QLineEdit) else ""
        return field.parse(text) if field.kind is FormKind.DURATION else text

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
        values: dict[str, Any] = {f.attribute: self._read(f) for f in FORM_FIELDS}
        return replace(
            self._loaded,
            **values,
            start_at_login=self.start_at_login.isChecked(),
            new_lmstudio_token=self.lmstudio_token.text().strip() or None,
            new_ngrok_token=self.ngrok_token.text().strip() or None,
            new_cloudflare_token=self.cloudflare_token.text().strip() or None,
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


def _fit_height(label: QLabel) -> None:
    """A word-wrapped label in a form gets the height of its text at its width (Qt sizes it
    for one line less when the text grows after the window was laid out)."""
    width = max(label.width(), 520)
    label.setMinimumHeight(label.heightForWidth(width))
