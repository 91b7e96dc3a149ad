"""The Settings form comes from the settings' declarations, through control."""

from __future__ import annotations

import dataclasses

import pytest

from tray_app.config.settings import SETTINGS_BY_KEY, Config
from tray_app.control.controller import AppSettings
from tray_app.control.settings_form import FORM_FIELDS, FormKind, duration_text

NOT_CONFIG = {
    "start_at_login",
    "lmstudio_token_set",
    "ngrok_token_set",
    "new_lmstudio_token",
    "new_ngrok_token",
    "cloudflare_token_set",
    "new_cloudflare_token",
    "overridden",
    "configured_port",
    "port_in_use",
    "port_note",
    "store_problem",
}


def test_app_settings_holds_exactly_the_declared_form_fields() -> None:
    fields = {f.name for f in dataclasses.fields(AppSettings)} - NOT_CONFIG
    assert fields == {f.attribute for f in FORM_FIELDS}
    config_fields = {f.name for f in dataclasses.fields(Config)}
    assert fields <= config_fields, "a form field is named as its Config attribute"


def test_the_form_keeps_its_order() -> None:
    assert [f.key for f in FORM_FIELDS] == [
        "upstream.url",
        "tunnel.provider",
        "tunnel.ngrok_domain",
        "tunnel.cloudflare_hostname",
        "auth.allowed_models",
        "auth.token_ttl",
        "limits.requests_per_minute",
        "limits.concurrent_requests",
        "tunnel.go_public_at_start",
        "queue.generations_in_flight",
        "budget.device_tokens_per_day",
        "budget.device_tokens_per_month",
        "budget.copied_key_tokens_per_day",
        "budget.copied_key_tokens_per_month",
    ]


def test_number_fields_offer_what_the_config_accepts() -> None:
    (rpm,) = [f for f in FORM_FIELDS if f.key == "limits.requests_per_minute"]
    assert rpm.kind is FormKind.NUMBER and rpm.bounds == (1, 100_000_000)
    assert rpm.bounds is not None
    _low, high = rpm.bounds
    SETTINGS_BY_KEY[rpm.key].parse(high)  # accepted
    with pytest.raises(ValueError):
        SETTINGS_BY_KEY[rpm.key].parse(high + 1)
    (url,) = [f for f in FORM_FIELDS if f.key == "upstream.url"]
    assert url.bounds is None


def test_a_field_parses_with_the_setting_and_names_itself() -> None:
    (ttl,) = [f for f in FORM_FIELDS if f.key == "auth.token_ttl"]
    assert ttl.parse("7d") == 7 * 86400
    with pytest.raises(ValueError, match=r"^Default token lifetime must be a duration"):
        ttl.parse("soon")
    with pytest.raises(ValueError, match=r"^Default token lifetime must be between 60"):
        ttl.parse("10")
    assert ttl.text(7 * 86400.0) == "7d"


def test_duration_text_uses_the_largest_whole_unit() -> None:
    assert [duration_text(s) for s in (86400, 7200, 120, 90)] == ["1d", "2h", "2m", "90"]


def test_choice_labels_cover_the_choices() -> None:
    (provider,) = [f for f in FORM_FIELDS if f.key == "tunnel.provider"]
    assert [value for value, _ in provider.choices] == [
        "none",
        "cloudflare-quick",
        "ngrok",
        "cloudflare-named",
        "tailscale-serve",
        "tailscale-funnel",
        "lan",
    ]
