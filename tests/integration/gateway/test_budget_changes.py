"""A budget as the owner really changes it, and a budget beside a credential's own output cap:
through the whole gateway over real sockets (a new user's walk-through found each of these)."""

from __future__ import annotations

import json
import time

import aiohttp

from tests.conftest import IdentityFactory
from tests.fake_lmstudio import FakeLMStudio
from tests.integration.gateway.test_sharing import (
    ESTIMATE,
    PROMPT,
    chat,
    error_code,
    key_with_budget,
    principal_of,
)
from tray_app.gateway.sharing import MIN_DEFAULT_OUTPUT
from tray_app.storage.audit import AuditSource
from tray_app.storage.budgets import NO_BUDGET, Budget, BudgetStore
from tray_app.storage.usage_history import UsageHistory, day_start


class TestABudgetLiftedAndGivenBack:
    async def test_what_was_used_meanwhile_counts(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        fake_lmstudio.behaviour.chunks = 5
        rig = await start_identity_gateway()
        key = key_with_budget(rig, "bob", Budget(tokens_per_day=1000))
        principal = principal_of(rig, "bob")
        budgets = BudgetStore(rig.identity.db)

        def set_budget(budget: Budget) -> None:
            budgets.set(principal, budget, now=time.time(), source=AuditSource.CLI)
            rig.identity.authenticator.reload_budgets()

        async with aiohttp.ClientSession() as session:
            assert (await chat(session, rig, key, max_tokens=5))[0] == 200
            set_budget(NO_BUDGET)  # "lift Bob's cap tonight"
            for _ in range(4):
                assert (await chat(session, rig, key, max_tokens=5))[0] == 200
            set_budget(Budget(tokens_per_day=PROMPT + 5 + 4 * (PROMPT + 5) + 20))  # "put it back"
            # 5 answers of PROMPT + 5 tokens were used today: 20 are left, so an answer that
            # could use ESTIMATE + 15 fits, one that could use more does not.
            status, _, body = await chat(session, rig, key, max_tokens=20 - ESTIMATE + 1)
            assert (status, error_code(body)) == (429, "budget_exceeded"), body
            assert (await chat(session, rig, key, max_tokens=20 - ESTIMATE))[0] == 200
        rig.identity.recorder.flush()
        history = UsageHistory(rig.identity.db)
        totals = history.totals_since(principal, day_start(time.time()))
        assert totals.tokens == 6 * (PROMPT + 5)  # the refusal used nothing
        assert totals.requests == 7  # and is a request


class TestACredentialsOwnCapBesideABudget:
    async def test_a_request_naming_no_length_gets_what_is_left_not_a_refusal(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        rig = await start_identity_gateway()
        issued = rig.identity.tokens.issue(
            name="capped",
            scopes=frozenset({"chat"}),
            ttl=3600,
            max_tokens=2000,
            budget=Budget(tokens_per_day=300),
        )
        async with aiohttp.ClientSession() as session:
            status, _, body = await chat(session, rig, issued.token, stream=False)
        assert status == 200, body
        sent = fake_lmstudio.received[-1].json()
        assert sent["max_tokens"] == 300 - ESTIMATE  # the room, under the credential's cap

    async def test_the_credentials_cap_still_caps_when_there_is_room(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        rig = await start_identity_gateway()
        issued = rig.identity.tokens.issue(
            name="capped",
            scopes=frozenset({"chat"}),
            ttl=3600,
            max_tokens=40,
            budget=Budget(tokens_per_day=100_000),
        )
        async with aiohttp.ClientSession() as session:
            assert (await chat(session, rig, issued.token, stream=False))[0] == 200
            assert (await chat(session, rig, issued.token, stream=False, max_tokens=500))[0] == 200
        first, second = (r.json() for r in fake_lmstudio.received[-2:])
        assert first["max_tokens"] == 40 and second["max_tokens"] == 40


class TestALittleLeftIsRefusedNotCutShort:
    async def test_below_the_minimum_a_request_naming_no_length_is_refused(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        rig = await start_identity_gateway()
        key = key_with_budget(rig, "tiny", Budget(tokens_per_day=ESTIMATE + MIN_DEFAULT_OUTPUT - 1))
        async with aiohttp.ClientSession() as session:
            status, _, body = await chat(session, rig, key, stream=False)
        assert (status, error_code(body)) == (429, "budget_exceeded")
        assert fake_lmstudio.received == []
        message = json.loads(body)["error"]["message"]
        assert (
            f"to {MIN_DEFAULT_OUTPUT - 1} or less" in message
        )  # what fits, if the caller wants it

    async def test_at_the_minimum_it_is_answered(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        rig = await start_identity_gateway()
        key = key_with_budget(rig, "tiny", Budget(tokens_per_day=ESTIMATE + MIN_DEFAULT_OUTPUT))
        async with aiohttp.ClientSession() as session:
            status, _, body = await chat(session, rig, key, stream=False)
        assert status == 200, body
        assert fake_lmstudio.received[-1].json()["max_tokens"] == MIN_DEFAULT_OUTPUT
