"""The sharing gate on its own, with the real ledger (over a real database) and the real fair
queue: which output cap a generation carries, what it reserves, and that everything it took
is given back once. The whole path through the gateway is in the integration test of the same
name."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import FakeClock
from tray_app.gateway.body_rules import prepare_body
from tray_app.gateway.budgets import BudgetLedger
from tray_app.gateway.fair_queue import FairQueue
from tray_app.gateway.routes import FORWARDED_ROUTES, Route
from tray_app.gateway.sharing import BUDGETED_DEFAULT_OUTPUT, Sharing, requested_output
from tray_app.gateway.upstream.usage import Usage
from tray_app.identity.principal import ALL_SCOPES, Principal
from tray_app.storage.budgets import Budget
from tray_app.storage.database import Database
from tray_app.storage.usage_history import UsageHistory

ROUTES = {r.path: r for r in FORWARDED_ROUTES}
CHAT, EMBEDDINGS = ROUTES["/v1/chat/completions"], ROUTES["/v1/embeddings"]
QUESTION = '"messages":[{"role":"user","content":"hello there friend"}]'  # estimate 9


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "lmgate.db")
    yield database
    database.close()


def gate(db: Database, *, slots: int = 4) -> tuple[Sharing, FairQueue, BudgetLedger]:
    queue = FairQueue(slots=slots, per_caller=4, max_waiting=10, max_waiting_per_client=10)
    ledger = BudgetLedger(UsageHistory(db), FakeClock())
    return Sharing(queue, guard=None, ledger=ledger, max_wait=1, max_stream_wait=1), queue, ledger


def body(route: Route, text: str) -> bytes:
    return ("{" + text + "}").encode()


def caller(budget: Budget | None = None, max_tokens: int | None = None) -> Principal:
    return Principal("key:k", ALL_SCOPES, max_tokens=max_tokens, budget=budget)


class TestTheCapAGenerationCarries:
    def test_no_budget_keeps_the_principal_s_cap_and_reserves_nothing(self, db: Database) -> None:
        sharing, _, ledger = gate(db)
        prepared = prepare_body(CHAT, body(CHAT, f'"model":"m",{QUESTION},"max_tokens":100'))
        generation = sharing.admit(caller(max_tokens=50), "127.0.0.1", CHAT, prepared)
        assert generation.max_tokens == 50 and ledger.principals_tracked == 0

    def test_a_budgeted_principal_s_own_cap_bounds_what_it_reserves(self, db: Database) -> None:
        sharing, _, ledger = gate(db)
        prepared = prepare_body(CHAT, body(CHAT, f'"model":"m",{QUESTION},"max_tokens":100'))
        who = caller(Budget(tokens_per_day=1000), max_tokens=50)
        generation = sharing.admit(who, "127.0.0.1", CHAT, prepared)
        assert generation.max_tokens == 50 and ledger.reserved_tokens == 9 + 50

    def test_a_request_without_a_length_gets_the_default_or_what_is_left(
        self, db: Database
    ) -> None:
        sharing, _, _ = gate(db)
        prepared = prepare_body(CHAT, body(CHAT, f'"model":"m",{QUESTION}'))
        roomy = sharing.admit(caller(Budget(tokens_per_day=10**9)), "c", CHAT, prepared)
        assert roomy.max_tokens == BUDGETED_DEFAULT_OUTPUT
        roomy.settle(None, 0)
        tight = sharing.admit(caller(Budget(tokens_per_month=30)), "c", CHAT, prepared)
        assert tight.max_tokens == 30 - 9

    def test_embeddings_reserve_their_input_and_carry_no_cap(self, db: Database) -> None:
        sharing, _, ledger = gate(db)
        prepared = prepare_body(
            EMBEDDINGS, body(EMBEDDINGS, '"model":"e","input":"' + "x" * 40 + '"')
        )
        assert requested_output(prepared.payload, EMBEDDINGS) == 0
        generation = sharing.admit(caller(Budget(tokens_per_day=100)), "c", EMBEDDINGS, prepared)
        assert generation.max_tokens is None and ledger.reserved_tokens == 10
        assert generation.settle(Usage(12, 0), 0) == Usage(12, 0)
        assert ledger.reserved_tokens == 0


class TestGivingBack:
    async def test_a_slot_is_taken_once_and_given_back_once(self, db: Database) -> None:
        sharing, queue, _ = gate(db, slots=1)
        prepared = prepare_body(CHAT, body(CHAT, f'"model":"m",{QUESTION}'))
        generation = sharing.admit(caller(), "c", CHAT, prepared)
        await generation.wait_turn(None)
        assert queue.busy == 1
        generation.release()
        generation.release()
        assert queue.busy == 0
        assert generation.settle(Usage(1, 2), 10) == Usage(1, 2)  # nothing reserved: as used

    def test_settling_twice_charges_once(self, db: Database) -> None:
        sharing, _, ledger = gate(db)
        prepared = prepare_body(CHAT, body(CHAT, f'"model":"m",{QUESTION},"max_tokens":10'))
        who = caller(Budget(tokens_per_day=100))
        generation = sharing.admit(who, "c", CHAT, prepared)
        assert generation.settle(None, 500) == Usage(9, 5)  # an estimate from the bytes sent
        assert generation.settle(None, 500) is None
        assert ledger.status("key:k", Budget(tokens_per_day=100)).day_used == 14
