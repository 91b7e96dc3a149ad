"""Warm up a model: the owner loads one of LM Studio's models before people arrive, so the
first request for it neither waits for the load nor swaps models under someone's answer.

The window lists the models LM Gate offers, says what is loading, and hands the outcome to
the tray as a message (``said``): a load can take a minute, and the window may be closed by
then. One load at a time from here; the gateway's model guard orders it with everyone else's.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from tray_app.ui.bridge import UiBridge
from tray_app.ui.port import ControllerPort

ASKING = "Asking LM Studio for its models…"
NO_MODELS = (
    "LM Studio lists no model LM Gate may offer: download one in LM Studio, "
    "or check the allowed models in Settings."
)
PICK = "Pick a model and press Load."
TITLE = "LM Gate"


def loading_words(model: str) -> str:
    return f"Loading {model}…"


def loaded_words(model: str, seconds: float) -> str:
    if seconds <= 0.0:
        return f"{model} was loaded already"
    return f"{model} is loaded ({seconds:.1f} s)"


class WarmUpWindow(QWidget):
    said = Signal(str, str)  # title, message: the outcome, for the tray to show

    def __init__(self, controller: ControllerPort, bridge: UiBridge) -> None:
        super().__init__()
        self._controller = controller
        self._bridge = bridge
        self.loading: str | None = None  # the model being loaded from here
        self.setWindowTitle("LM Gate — warm up a model")
        intro = QLabel(
            "Load a model into LM Studio now, so the first request for it does not wait. "
            "LM Studio may unload another model to make room; LM Gate lets the answers "
            "from other models finish first."
        )
        intro.setWordWrap(True)
        intro.setMinimumWidth(420)
        self.models = QListWidget()
        self.models.itemSelectionChanged.connect(self._enable_load)
        self.models.itemDoubleClicked.connect(lambda _item: self.load())
        self.load_button = QPushButton("Load")
        self.load_button.clicked.connect(self.load)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        # Model names come from LM Studio: shown as text, never as markup.
        self.status.setTextFormat(Qt.TextFormat.PlainText)
        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addWidget(self.models)
        layout.addWidget(self.load_button)
        layout.addWidget(self.status)
        self._enable_load()

    @property
    def listed(self) -> list[str]:
        return [self.models.item(row).text() for row in range(self.models.count())]

    def refresh(self) -> None:
        """Ask LM Studio again: models come and go while the window is closed."""
        self.models.clear()
        self._say(ASKING)
        self._bridge.when_done(self._controller.models(), self._show_models, self._no_models)

    def _show_models(self, models: list[str]) -> None:
        self.models.clear()
        for model in models:
            self.models.addItem(QListWidgetItem(model))
        if models:
            self.models.setCurrentRow(0)
        self._say(PICK if models else NO_MODELS)

    def _no_models(self, error: BaseException) -> None:
        self._say(str(error))

    def _say(self, words: str) -> None:
        """The status line; while a load runs it says so, whatever else happens."""
        self.status.setText(loading_words(self.loading) if self.loading else words)

    def _enable_load(self) -> None:
        self.load_button.setEnabled(self.loading is None and self.models.currentItem() is not None)

    def load(self) -> None:
        item = self.models.currentItem()
        if item is None or self.loading is not None:
            return
        model = self.loading = item.text()
        self._say("")
        self._enable_load()

        def loaded(seconds: float) -> None:
            self._finish(loaded_words(model, seconds))

        def failed(error: BaseException) -> None:
            self._finish(str(error))

        self._bridge.when_done(self._controller.warm_up(model), loaded, failed)

    def _finish(self, words: str) -> None:
        self.loading = None
        self._say(words)
        self._enable_load()
        self.said.emit(TITLE, words)
