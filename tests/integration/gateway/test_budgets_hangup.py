"""A budgeted caller that hangs up after LM Studio has its request pays for it, even before
any answer header came back (a non-streamed answer has none until it is done): through the
whole gateway over real sockets. Before, such a request was charged nothing and recorded as
nothing, so sending long prompts and hanging up just before the answer used the GPU for free.
What never reached LM Studio (refused at the door, or no connection) still costs nothing."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import aiohttp
import pytest

from tests.conftest import IdentityFactory, IdentityRig
from tests.fake_lmstudio import FakeLMStudio
from tests.integration.gateway.test_budgets_usage import (
    ESTIMATE,
    QUESTION,
    QWEN,
    key_with_budget,
    used,
)
from tray_app.storage.budgets import Budget

CHAT = "/v1/chat/completions"
CAP = 500


async def hang_up(rig: IdentityRig, key: str, fake: FakeLMStudio, *, stream: bool) -> None:
    """Send, wait until LM Studio has the request, then go away before its headers."""
    before = len(fake.received)
    async with aiohttp.ClientSession() as session:
        task = asyncio.ensure_future(
            session.post(
                rig.url + CHAT,
                json={"model": QWEN, "messages": QUESTION, "stream": stream, "max_tokens": CAP},
                headers={"Authorization": f"Bearer {key}"},
            )
        )
        while len(fake.received) == before:
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # the gateway notices the hang-up and settles
    for _ in range(200):
        await asyncio.sleep(0.01)
        if used(rig, "quitter").requests:
            break


@pytest.fixture
async def rig(start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio) -> IdentityRig:
    fake_lmstudio.behaviour.header_delay = 5  # "generating": no header for a while
    return await start_identity_gateway()


class TestAHangUpBeforeTheHeadersPays:
    async def test_a_non_streamed_request_pays_its_whole_reservation(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio
    ) -> None:
        key = key_with_budget(rig, "quitter", Budget(tokens_per_day=100_000))
        await hang_up(rig, key, fake_lmstudio, stream=False)
        charged = used(rig, "quitter")
        # LM Studio may have generated up to the cap before it noticed: that is charged.
        assert (charged.requests, charged.tokens) == (1, ESTIMATE + CAP)

    async def test_a_stream_pays_its_prompt(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio
    ) -> None:
        key = key_with_budget(rig, "quitter", Budget(tokens_per_day=100_000))
        await hang_up(rig, key, fake_lmstudio, stream=True)
        charged = used(rig, "quitter")
        # A stream is stopped with its connection; what it read is its prompt.
        assert (charged.requests, charged.tokens) == (1, ESTIMATE)

    async def test_hanging_up_again_and_again_runs_out(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio
    ) -> None:
        key = key_with_budget(rig, "quitter", Budget(tokens_per_day=2 * (ESTIMATE + CAP)))
        for _ in range(2):
            await hang_up(rig, key, fake_lmstudio, stream=False)
        status, body = await ask(rig, key)
        assert (status, body["error"]["code"]) == (429, "budget_exceeded")


async def ask(rig: IdentityRig, key: str) -> tuple[int, Any]:
    """One non-streamed chat with the cap; its status and JSON answer."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            rig.url + CHAT,
            json={"model": QWEN, "messages": QUESTION, "max_tokens": CAP},
            headers={"Authorization": f"Bearer {key}"},
        ) as response,
    ):
        return response.status, await response.json()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestWhatNeverReachedLMStudioIsFree:
    async def test_no_connection_costs_nothing(
        self, start_identity_gateway: IdentityFactory
    ) -> None:
        rig = await start_identity_gateway(upstream_url=f"http://127.0.0.1:{closed_port()}")
        key = key_with_budget(rig, "quitter", Budget(tokens_per_day=100_000))
        status, body = await ask(rig, key)
        assert (status, body["error"]["code"]) == (502, "upstream_unreachable")
        assert used(rig, "quitter").tokens == 0

    async def test_a_refused_token_costs_nothing(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        fake_lmstudio.behaviour.require_token = "not-the-one-lm-gate-has"
        rig = await start_identity_gateway()
        key = key_with_budget(rig, "quitter", Budget(tokens_per_day=100_000))
        status, body = await ask(rig, key)
        assert (status, body["error"]["code"]) == (502, "upstream_auth_failed")
        assert used(rig, "quitter").tokens == 0
