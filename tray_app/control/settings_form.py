"""The tray's Settings form, read from the settings' declarations (``form=`` on a Config field).

The UI reaches the core only through control, so it learns its fields, their limits and their
parsing here: a setting added to the form is one ``form=`` line in its declaration.
"""

from __future__ import annotations

from dataclasses import dataclass

from tray_app.config.declaration import FormKind
from tray_app.config.parsers import IntRange
from tray_app.config.settings import SETTINGS, Setting

__all__ = ["FORM_FIELDS", "FormInput", "FormKind", "duration_text"]


@dataclass(frozen=True, slots=True)
class FormInput:
    """One field of the Settings form: what to show, and how to read what was typed."""

    setting: Setting
    label: str
    kind: FormKind
    placeholder: str
    choices: tuple[tuple[str, str], ...]  # (value, label) for a CHOICE field

    @property
    def key(self) -> str:
        return self.setting.key

    @property
    def attribute(self) -> str:
        """The field's name in :class:`~tray_app.control.controller.AppSettings` (and Config)."""
        return self.setting.attribute

    @property
    def bounds(self) -> tuple[int, int] | None:
        """A NUMBER field's range: exactly what the config accepts, so a value from the file is
        never clamped by the form and saved back changed."""
        parse = self.setting.parse
        return (parse.low, parse.high) if isinstance(parse, IntRange) else None

    def parse(self, raw: object) -> object:
        """The typed value, or ValueError worded for the form ("Default token lifetime must
        be ...")."""
        try:
            return self.setting.parse(raw)
        except ValueError as exc:
            raise ValueError(f"{self.label} {exc}") from None

    def text(self, value: object) -> str:
        """The value as the field shows it."""
        if self.kind is FormKind.DURATION and isinstance(value, int | float):
            return duration_text(value)
        return str(value)


def duration_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}"


def _inputs() -> tuple[FormInput, ...]:
    inputs = [
        (
            s.form.position,
            FormInput(s, s.form.label, s.form.kind, s.form.placeholder, s.form.choice_labels),
        )
        for s in SETTINGS
        if s.form is not None
    ]
    return tuple(field for _, field in sorted(inputs, key=lambda pair: pair[0]))


FORM_FIELDS: tuple[FormInput, ...] = _inputs()
