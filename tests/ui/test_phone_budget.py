"""The phone page refused for its budget, in Debian's headless Chromium: the gateway says when
the budget resets in UTC, the phone says it in its own time zone and how long that is from
now. A real aiohttp server on loopback plays the gateway (test_phone_waiting's), answering
/api/chat with the gateway's 429; the page's clock and zone are the browser context's."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from tests.ui import test_phone_page
from tests.ui.test_phone_page import PHONE
from tests.ui.test_phone_waiting import FakeGateway

browser = test_phone_page.browser

# 21:00 UTC is 02:30 the next day in Kolkata (UTC+5:30): the zone's own date and time differ.
NOW = dt.datetime(2026, 12, 2, 21, 0, tzinfo=dt.UTC)
ZONE = "Asia/Kolkata"


def budget_exceeded(resets: str) -> dict[str, object]:
    # As tray_app/gateway/api_errors.py's budget_exceeded words it.
    return {
        "error": {
            "message": "Your token budget for this day (1,000 tokens) is used up; it resets "
            f"at {resets}. Ask the owner for a larger budget.",
            "type": "rate_limit_error",
            "code": "budget_exceeded",
        }
    }


@dataclass
class RefusingGateway(FakeGateway):
    refusal: dict[str, object] | None = None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.refusal, status=429, headers={"Retry-After": "10800"})


@pytest.fixture
def gateway() -> Iterator[RefusingGateway]:
    yield from RefusingGateway().run()  # type: ignore[misc]


def refusal_shown(browser: Any, gateway: RefusingGateway, resets: str) -> str:
    gateway.refusal = budget_exceeded(resets)
    context = browser.new_context(
        viewport=PHONE, is_mobile=True, has_touch=True, timezone_id=ZONE, locale="en-US"
    )
    context.add_init_script("localStorage.setItem('lmgate.token', 'a.paired.device');")
    page = context.new_page()
    page.clock.set_fixed_time(NOW)
    page.goto(gateway.url + "/")
    page.wait_for_selector("#chat-screen:not([hidden])", timeout=10000)
    page.fill("#input", "Hi")
    page.click("#send")
    page.wait_for_selector(".message.error .error-line", timeout=10000)
    said: str = page.inner_text(".message.error .error-line")
    context.close()
    return said


class TestBudgetResetInLocalTime:
    def test_a_daily_reset_is_the_phones_time_and_how_long_from_now(
        self, browser: Any, gateway: RefusingGateway
    ) -> None:
        said = refusal_shown(browser, gateway, "2026-12-03 00:00 UTC")
        assert said == (
            "Your token budget for this day (1,000 tokens) is used up; it resets at 05:30 "
            "(in 3 h). Ask the owner for a larger budget."
        )

    def test_a_reset_a_day_or_more_away_names_its_day(
        self, browser: Any, gateway: RefusingGateway
    ) -> None:
        said = refusal_shown(browser, gateway, "2027-01-01 00:00 UTC")
        assert "it resets on Fri, Jan 1 at 05:30 (in 29 days)." in said

    def test_minutes_when_it_is_soon_and_iso_times_too(
        self, browser: Any, gateway: RefusingGateway
    ) -> None:
        said = refusal_shown(browser, gateway, "2026-12-02T21:20:00Z")
        assert "it resets at 02:50 (in 20 min)." in said

    def test_a_message_without_a_reset_time_is_shown_as_it_came(
        self, browser: Any, gateway: RefusingGateway
    ) -> None:
        said = refusal_shown(browser, gateway, "midnight")
        assert said == (
            "Your token budget for this day (1,000 tokens) is used up; it resets at midnight. "
            "Ask the owner for a larger budget."
        )
