"""Regression: a value the config accepts survives a save through the Settings form.

The spin boxes had hand-written ranges (at most 100 000 requests a minute, 1 000 at once), so
opening Settings on a config with a larger value and pressing Save silently wrote a smaller one.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("PySide6")

from tests.fake_controller import FakeController
from tray_app.ui.bridge import UiBridge
from tray_app.ui.settings_dialog import SettingsDialog


def test_large_limits_are_saved_unchanged(qtbot) -> None:  # type: ignore[no-untyped-def]
    fake = FakeController()
    fake.stored_settings = replace(
        fake.stored_settings, limits_requests_per_minute=500_000, limits_concurrent_requests=5_000
    )
    dialog = SettingsDialog(fake, UiBridge())
    qtbot.addWidget(dialog)
    qtbot.waitUntil(lambda: dialog.rpm.value() == 500_000)
    dialog.save_button.click()
    qtbot.waitUntil(lambda: dialog.status.text() == "Saved.")
    ((saved,),) = fake.called("save_settings")
    assert (saved.limits_requests_per_minute, saved.limits_concurrent_requests) == (500_000, 5_000)


def test_the_largest_budget_defaults_are_saved_unchanged(qtbot) -> None:  # type: ignore[no-untyped-def]
    from PySide6.QtWidgets import QSpinBox

    from tray_app.config.settings import BUDGET_DEFAULT_MAX, SETTINGS_BY_KEY

    fake = FakeController()
    fake.stored_settings = replace(
        fake.stored_settings,
        budget_device_tokens_per_day=BUDGET_DEFAULT_MAX,
        budget_copied_key_tokens_per_month=BUDGET_DEFAULT_MAX,
    )
    dialog = SettingsDialog(fake, UiBridge())
    qtbot.addWidget(dialog)
    day = dialog.inputs["budget.device_tokens_per_day"]
    assert isinstance(day, QSpinBox)
    qtbot.waitUntil(lambda: day.value() == BUDGET_DEFAULT_MAX)
    dialog.save_button.click()
    qtbot.waitUntil(lambda: dialog.status.text() == "Saved.")
    ((saved,),) = fake.called("save_settings")
    assert saved.budget_device_tokens_per_day == BUDGET_DEFAULT_MAX
    assert saved.budget_copied_key_tokens_per_month == BUDGET_DEFAULT_MAX
    with pytest.raises(ValueError):  # and the config refuses what the form could not hold
        SETTINGS_BY_KEY["budget.device_tokens_per_day"].parse(BUDGET_DEFAULT_MAX + 1)
