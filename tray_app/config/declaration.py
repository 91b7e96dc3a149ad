"""How a setting is declared: once, as a field of :class:`~tray_app.config.settings.Config`.

``setting(...)`` returns a dataclass field whose metadata is a :class:`Setting`: the dotted TOML
key, the parser, the help text, and optionally the ``lmgate serve`` flag and the tray's form
field. The config file keys, the ``LMGATE_*`` variables, the flags, ``lmgate config keys``, the
README table and the Settings form are all read from these declarations (the model is
mitmproxy's options, whose one ``add_option`` feeds its file, its flags and its UI).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

T = TypeVar("T")

ENV_PREFIX = "LMGATE_"


@dataclass(frozen=True, slots=True)
class Flag:
    """A command-line flag that sets the setting. Its value stays a string, so the setting's
    own parser words any error ("server.port (from command line): ...")."""

    name: str  # "--port"
    metavar: str | None = None
    # Every command that reads config takes it (it says where secrets and data live), not
    # only `serve`.
    common: bool = False
    # Takes no value: given means true, absent means "as configured".
    switch: bool = False
    # Words for a terminal, when the setting's own help reads wrong after a flag.
    help: str = ""

    @property
    def dest(self) -> str:
        """The argparse attribute the flag's value lands in."""
        return self.name.removeprefix("--").replace("-", "_")


class FormKind(StrEnum):
    """Which input the tray's Settings form shows for a setting."""

    TEXT = "text"
    CHOICE = "choice"
    NUMBER = "number"
    DURATION = "duration"
    MODELS = "models"  # a ticked list of LM Studio's models
    CHECKBOX = "checkbox"


@dataclass(frozen=True, slots=True)
class FormField:
    """The setting's field in the tray's Settings form."""

    label: str
    kind: FormKind
    position: int  # where the form shows it, top to bottom
    placeholder: str = ""
    # (value, label) for a CHOICE field, in the order shown; values are the parser's choices.
    choice_labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Setting:
    key: str  # dotted TOML key, e.g. "server.port"
    parse: Callable[[object], Any]
    help: str
    flag: Flag | None = None
    form: FormField | None = None
    attribute: str = ""  # the Config attribute; filled in from the field's name

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.key.replace(".", "_").upper()

    @property
    def choices(self) -> tuple[str, ...] | None:
        """The accepted values, when the parser accepts only a few (for argparse and forms)."""
        choices: tuple[str, ...] | None = getattr(self.parse, "choices", None)
        return choices


_METADATA = "lmgate.setting"


def setting(
    key: str,
    default: T,
    parse: Callable[[object], T],
    help: str,
    *,
    flag: Flag | None = None,
    form: FormField | None = None,
) -> T:
    """Declare one setting as a Config field; typed as its default so ``mypy`` sees the field's
    type, while the dataclass sees a ``Field`` that carries the declaration."""
    declared = Setting(key, parse, help, flag, form)
    field: T = dataclasses.field(default=default, metadata={_METADATA: declared})
    return field


def declarations(config_type: type[Any]) -> tuple[Setting, ...]:
    """Every setting declared on ``config_type``, in declaration order, with its attribute."""
    return tuple(
        dataclasses.replace(field.metadata[_METADATA], attribute=field.name)
        for field in dataclasses.fields(config_type)
        if _METADATA in field.metadata
    )
