"""The tray's phase is an enum whose values are what the UI shows and which icon it loads."""

from __future__ import annotations

import pytest

from tests.helpers import REPO_ROOT
from tray_app.control.controller import AppState, Phase


@pytest.mark.parametrize("phase", list(Phase))
def test_every_phase_has_its_icons(phase: Phase) -> None:
    for name in (f"{phase.value}.svg", f"{phase.value}-template.svg"):
        assert (REPO_ROOT / "resources" / "icons" / name).is_file(), name


def test_a_phase_reads_as_its_word_where_the_tray_shows_it() -> None:
    # The tooltip formats the phase and the window title-cases it: a plain Enum would show
    # "Phase.PUBLIC" there.
    assert f"LM Gate — {Phase.PUBLIC}" == "LM Gate — public"
    assert Phase.RECONNECTING.title() == "Reconnecting"
    assert AppState().phase is Phase.STARTING


def test_only_known_phases_exist() -> None:
    assert Phase("private") is Phase.PRIVATE
    with pytest.raises(ValueError):
        Phase("half-public")
