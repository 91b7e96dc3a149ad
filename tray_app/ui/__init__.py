"""The tray UI: the only part of LM Gate that imports Qt (PySide6)."""
