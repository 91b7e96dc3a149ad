"""Token budgets: tokens (prompt + completion) a principal may use per UTC day and month.

A request is admitted only if what it could use fits: its prompt estimate plus its output cap
is reserved before it is forwarded, and replaced by the real usage when it ends. Reserving is
what makes a burst of parallel streams unable to overshoot: each one holds its worst case
until it is settled. A request without a cap of its own gets one from the ledger (what is
left of the tighter period, less the prompt), so none is ever uncapped.

Where "used" comes from. The ledger keeps, per principal, the totals of the current day and
month in memory. They are loaded once per period, from the database's day buckets plus what
the usage recorder has counted but not yet flushed (``pending``); after that the ledger adds
what it settles itself and never reads the database for that period again. So a request
the recorder flushes later is not counted twice, and a restart continues from the stored
totals. This needs one thing of the gateway: a request is settled here and recorded by the
recorder in the same step (no ``await`` between), so no load can fall between the two.

Midnight. A request counts in the period it ends in, as the recorder writes it, so the totals
after a restart agree with the ones before. A reservation still running at midnight therefore
holds its tokens in the new day (it might end there), and one made before the rollover and
settled after it makes the ledger reload that principal's totals, which then hold it.

Memory: at each new UTC day every principal with nothing in flight is forgotten (a
principal seen again is loaded again), and the ledger keeps only open reservations.

Replicas. With ``shared`` set (a team's gateway) "used" and "reserved" are the team's, read
from Redis before each reservation, and a reservation this ledger made is admitted only once
Redis took it too (:meth:`commit`), exactly, against every replica's; see
:mod:`tray_app.gateway.shared_budgets`. While Redis is down and the policy is open, the ledger
decides alone, as on one machine.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from tray_app.clock import Clock
from tray_app.gateway import api_errors
from tray_app.gateway.shared_budgets import (
    UNREACHABLE,
    Counted,
    Period,
    Reserved,
    SharedBudgets,
)
from tray_app.gateway.state_calls import StateCalls
from tray_app.gateway.upstream.usage import Usage
from tray_app.identity.principal import Budget, Principal
from tray_app.storage.database import DAY
from tray_app.storage.usage_history import (
    UsageHistory,
    day_start,
    month_start,
    next_month_start,
)

# What an answer cut short is charged for when LM Studio never said how many tokens it used:
# a streamed token reaches the client in an SSE event of at least ~100 bytes (its JSON
# envelope), so bytes_out // 100 errs high for streams, never low, and the cap bounds it.
BYTES_PER_TOKEN = 100


@dataclass(frozen=True, slots=True)
class Reservation:
    principal: str
    tokens: int  # reserved: prompt_estimate + output cap
    max_output: int | None  # the output cap the forwarded request must carry (None: its own)
    prompt_estimate: int = 0
    # Tells two reservations with equal fields apart, so settling one twice is caught.
    ticket: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """A principal's budget as the tray, metrics and the CLI show it; times are epoch seconds."""

    day_used: int
    day_limit: int | None
    month_used: int
    month_limit: int | None
    day_resets_at: int
    month_resets_at: int
    in_flight: int = 0  # reserved by requests still running, not in the used counts yet


@dataclass(slots=True)
class _Account:
    day: int  # the UTC day the totals are of; NOT_LOADED when they must be read again
    day_used: int = 0
    month_used: int = 0
    reserved: int = 0  # by requests in flight, whatever period they end in
    elsewhere: int = 0  # reserved by the other replicas, as last read (shared only)
    counted_at: float = float("-inf")  # when Redis last gave the counts (monotonic; shared)


NOT_LOADED = -1
# Replicas: the team's counts, as Redis last gave them (a read, or a reservation's answer), are
# used for this long without asking again; a refusal they would make is asked again first.
SHARED_FRESH_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class _Room:
    period: str
    limit: int
    left: int  # may be negative: a settled request may use more than it reserved
    resets_at: int


class BudgetLedger:
    def __init__(
        self,
        history: UsageHistory,
        clock: Clock,
        *,
        pending: Callable[[str, float], int] | None = None,
    ) -> None:
        self._history = history
        self._clock = clock
        self._pending = pending
        self._accounts: dict[str, _Account] = {}
        self._open: dict[int, Reservation] = {}
        self._tickets = itertools.count(1)
        self._day = NOT_LOADED
        self._month = NOT_LOADED
        self._next_month = NOT_LOADED
        # Replicas only (set by the gateway): the team's counts, in Redis.
        self.shared: SharedBudgets | None = None
        self._members: dict[int, str] = {}  # ticket -> its reservation's lease in Redis
        self._stale: set[str] = set()  # principals whose Redis counters missed a settle
        self._dropped: set[str] = set()  # unbudgeted principals whose counters were dropped

    async def load(self, principal: Principal, state: StateCalls, *, fresh: bool = False) -> bool:
        """Read a budgeted principal's stored use of today and of the month through ``state``
        (a remote database's on a thread), if this process has not read it yet: the reserve
        that follows then finds it in memory and asks the database nothing on the loop.
        Shared: the team's counts, unless Redis gave them less than SHARED_FRESH_SECONDS ago
        and not ``fresh``. True when the counts may be that old (a refusal is worth asking
        again about with ``fresh``)."""
        budget = principal.budget
        if budget is None or not budget.limited:
            return False
        if self.shared is not None:
            account = self._accounts.get(principal.name)
            if (
                not fresh
                and account is not None
                and account.day == day_start(self._clock.time())
                and principal.name not in self._stale
                and self._clock.monotonic() - account.counted_at < SHARED_FRESH_SECONDS
            ):
                return True
            if await self._load_shared(self.shared, principal, state):
                return False
        name, today = principal.name, day_start(self._clock.time())
        account = self._accounts.get(name)
        if today == self._day and account is not None and account.day == today:
            return False
        month = month_start(today)
        # Pending first, on the loop that owns it (as in _stored).
        pending = (0, 0) if self._pending is None else (
            self._pending(name, today), self._pending(name, month)
        )  # fmt: skip
        day_used, month_used = await state.call(self._stored_totals, name, today, month)
        if day_start(self._clock.time()) != today:
            # Midnight passed meanwhile: these totals are of a day that is over (and the
            # ledger's day must not go back to it); the new day's are read the same way.
            return await self.load(principal, state)
        account = self._slot(name, today)
        if account.day != today:  # not read meanwhile by another request of the same caller
            account.day = today
            account.day_used = pending[0] + day_used
            account.month_used = pending[1] + month_used
        return False

    def _stored_totals(self, principal: str, today: int, month: int) -> tuple[int, int]:
        return (
            self._history.totals_since(principal, today).tokens,
            self._history.totals_since(principal, month).tokens,
        )

    async def _load_shared(
        self, shared: SharedBudgets, principal: Principal, state: StateCalls
    ) -> bool:
        """The team's counts into the principal's account; False when Redis is down and
        the policy is open (the stored totals are read as on one machine then)."""
        name = principal.name
        self._dropped.discard(name)
        period = _period(self._clock.time())
        reset = name in self._stale
        counted = await shared.read(name, period, start=None, reset=reset)
        if counted is UNREACHABLE:
            # What this replica serves meanwhile never reaches the counters: they start
            # again from the database once Redis is back.
            self._stale.add(name)
            return False
        self._stale.discard(name)
        if counted is None:  # a counter to start: from the stored totals, as in load
            pending = (0, 0) if self._pending is None else (
                self._pending(name, period.day), self._pending(name, period.month)
            )  # fmt: skip
            stored = await state.call(self._stored_totals, name, period.day, period.month)
            start = (pending[0] + stored[0], pending[1] + stored[1])
            counted = await shared.read(name, period, start=start, reset=False)
            if counted is UNREACHABLE:
                self._stale.add(name)
                return False
        if day_start(self._clock.time()) != period.day:
            # Midnight passed meanwhile: the new day's counts are read the same way, so
            # nothing is read on the loop for it after this.
            return await self._load_shared(shared, principal, state)
        if isinstance(counted, Counted):
            self._count(self._slot(name, period.day), period.day, counted)
        return True

    def _count(self, account: _Account, today: int, counted: Counted) -> None:
        account.day = today
        account.day_used = counted.day_used
        account.month_used = counted.month_used
        account.elsewhere = max(0, counted.reserved - account.reserved)
        account.counted_at = self._clock.monotonic()

    async def commit(self, principal: Principal, reservation: Reservation | None) -> bool:
        """Shared: have Redis take ``reservation`` too, against every replica's (True), or
        give it back here (False: the account then holds the team's counts, for a second
        try). True at once on one machine, and while Redis is down under the open policy."""
        shared = self.shared
        budget = principal.budget
        if shared is None or reservation is None or budget is None:
            return True
        period = _period(self._clock.time())
        answer = await shared.reserve(
            reservation.principal,
            period,
            reservation.ticket,
            reservation.tokens,
            (budget.tokens_per_day, budget.tokens_per_month),
        )
        if answer is UNREACHABLE:
            self._stale.add(reservation.principal)  # as in _load_shared
            return True
        if isinstance(answer, Reserved):
            self._members[reservation.ticket] = answer.member
            account = self._accounts.get(reservation.principal)
            if account is not None and account.day == period.day:
                self._count(account, period.day, answer.counted)
            return True
        self._open.pop(reservation.ticket, None)
        account = self._slot(reservation.principal, period.day)
        account.reserved -= reservation.tokens
        if isinstance(answer, Counted):
            self._count(account, period.day, answer)
        else:
            account.day = NOT_LOADED  # a counter went missing: the next load starts it
        return False

    def refuse(self, principal: Principal, reservation: Reservation) -> api_errors.ApiError:
        """The refusal for a reservation Redis did not take, in the team's counts."""
        assert principal.budget is not None
        now = self._clock.time()
        # The counts as Redis last gave them: nothing is read here (on the loop).
        rooms = self._rooms(self._slot(principal.name, day_start(now)), principal.budget)
        short = [room for room in rooms if reservation.tokens > room.left]
        room = short[-1] if short else min(rooms, key=lambda room: room.left)
        fits = min(room.left for room in rooms) - reservation.prompt_estimate
        return _refusal(room, reservation.tokens, now, fits)

    def reserve(
        self, principal: Principal, *, prompt_estimate: int, requested_output: int | None
    ) -> Reservation | None:
        """Hold what the request could use, or raise ``budget_exceeded`` (429); None when the
        principal has no budget (nothing to settle then)."""
        budget = principal.budget
        if budget is None or not budget.limited:
            self._unload(principal.name)  # its usage is not settled here while it has none
            if self.shared is not None and principal.name not in self._dropped:
                # Nor in Redis: counters kept would be short when a budget is given back.
                self._dropped.add(principal.name)
                self.shared.drop(principal.name, _period(self._clock.time()))
            return None
        now = self._clock.time()
        account = self._account(principal.name, now)
        rooms = self._rooms(account, budget)
        prompt = max(0, prompt_estimate)
        if requested_output is not None:
            needed = prompt + max(0, requested_output)
            max_output = None
            short = [room for room in rooms if needed > room.left]
        else:
            tightest = min(room.left for room in rooms)
            needed = tightest
            max_output = tightest - prompt
            short = [room for room in rooms if room.left - prompt < 1]
        if short:
            # The month's reset is the later one: if it is short, waiting for the day is no use.
            fits = min(room.left for room in rooms) - prompt  # >= 1 only if a cap was too large
            raise _refusal(short[-1], max(needed, prompt + 1), now, fits)
        reservation = Reservation(principal.name, needed, max_output, prompt, next(self._tickets))
        account.reserved += needed
        self._open[reservation.ticket] = reservation
        return reservation

    def settle(
        self,
        reservation: Reservation,
        used: Usage | None,
        *,
        bytes_out: int = 0,
        reached: bool = False,
        unanswered: bool = False,
    ) -> Usage | None:
        """Replace the reservation by what the request used; a second call does nothing.
        ``unanswered``: LM Studio had the request but no answer came back (the client hung
        up, or the connection broke, before a non-streamed answer's headers): it may have
        generated up to the cap, so that is what is charged.
        Returns the usage it was charged (``used``, or the estimate when LM Studio reported
        none), which the recorder must write in the same step, so that the totals a restart
        reads are the ones the ledger counted."""
        charged = _charged(reservation, used, bytes_out, reached, unanswered)
        if self._open.pop(reservation.ticket, None) is None:
            return used
        tokens = 0 if charged is None else charged.prompt_tokens + charged.completion_tokens
        member = self._members.pop(reservation.ticket, None)
        if member is not None and self.shared is not None:
            name = reservation.principal
            self.shared.settle(
                name, member, tokens, _period(self._clock.time()), lambda: self._stale.add(name)
            )
        account = self._accounts.get(reservation.principal)
        if account is None:
            return charged  # it reserved nothing, so it was forgotten: the next load reads it
        account.reserved -= reservation.tokens
        if account.day != day_start(self._clock.time()):
            # Not loaded for the day it ended in: its totals are read again before they are
            # used, and by then the recorder holds this request; idle, it is not kept at all.
            self._forget_if_idle(reservation.principal, account)
            return charged
        account.day_used += tokens
        account.month_used += tokens
        return charged

    def status(self, principal: str, budget: Budget) -> BudgetStatus:
        now = self._clock.time()
        account = self._account(principal, now)
        return BudgetStatus(
            day_used=account.day_used,
            day_limit=budget.tokens_per_day,
            month_used=account.month_used,
            month_limit=budget.tokens_per_month,
            day_resets_at=self._day + DAY,
            month_resets_at=self._next_month,
            in_flight=account.reserved + account.elsewhere,
        )

    def left(self, principal: str, budget: Budget) -> int:
        """Tokens the tightest limited period has left, less what is reserved: what a request
        may still reserve (for its default output cap). ``budget`` must be limited."""
        account = self._account(principal, self._clock.time())
        return min(room.left for room in self._rooms(account, budget))

    @property
    def principals_tracked(self) -> int:
        return len(self._accounts)

    @property
    def reserved_tokens(self) -> int:
        """Tokens held by requests still running, every principal together (for metrics)."""
        return sum(account.reserved for account in self._accounts.values())

    # ---- periods and loading ----------------------------------------------------------------

    def _account(self, principal: str, now: float) -> _Account:
        today = day_start(now)
        account = self._slot(principal, today)
        if account.day != today:
            account.day = today
            account.day_used = self._stored(principal, today)
            account.month_used = self._stored(principal, self._month)
        return account

    def _slot(self, principal: str, today: int) -> _Account:
        """The principal's account, made if there is none, after a new day was begun; its
        totals may still have to be read."""
        if today != self._day:
            self._new_day(today)
        account = self._accounts.get(principal)
        if account is None:
            account = self._accounts[principal] = _Account(NOT_LOADED)
        return account

    def _new_day(self, today: int) -> None:
        self._day = today
        self._month = month_start(today)
        self._next_month = next_month_start(today)
        for name, account in list(self._accounts.items()):
            self._forget_if_idle(name, account)

    def _stored(self, principal: str, since: int) -> int:
        # Pending first: a flush finishing between the two reads then counts a batch twice
        # (refusing a little early) rather than not at all.
        pending = self._pending(principal, since) if self._pending is not None else 0
        return pending + self._history.totals_since(principal, since).tokens

    def _unload(self, principal: str) -> None:
        account = self._accounts.get(principal)
        if account is not None:
            self._forget_if_idle(principal, account)

    def _forget_if_idle(self, principal: str, account: _Account) -> None:
        account.day = NOT_LOADED
        if account.reserved == 0:
            del self._accounts[principal]

    def _rooms(self, account: _Account, budget: Budget) -> list[_Room]:
        """Each limited period's room, the day's before the month's."""
        rooms = []
        if budget.tokens_per_day is not None:
            left = budget.tokens_per_day - account.day_used - account.reserved - account.elsewhere
            rooms.append(_Room("day", budget.tokens_per_day, left, self._day + DAY))
        if budget.tokens_per_month is not None:
            left = (
                budget.tokens_per_month - account.month_used - account.reserved - account.elsewhere
            )
            rooms.append(_Room("month", budget.tokens_per_month, left, self._next_month))
        return rooms


def _period(now: float) -> Period:
    today = day_start(now)
    return Period(today, month_start(today), next_month_start(today))


def _charged(
    reservation: Reservation, used: Usage | None, bytes_out: int, reached: bool, unanswered: bool
) -> Usage | None:
    """LM Studio's usage, or an estimate where it said nothing. A prompt it counts as 0 is
    taken as not said (every generation reads at least its chat template): a usage event the
    gateway could not see in full must not let a prompt go free."""
    if used is None:
        if unanswered:
            return Usage(
                reservation.prompt_estimate, reservation.tokens - reservation.prompt_estimate
            )
        return _estimate(reservation, bytes_out, reached)
    if used.prompt_tokens <= 0 < reservation.prompt_estimate:
        return Usage(reservation.prompt_estimate, used.completion_tokens)
    return used


def _estimate(reservation: Reservation, bytes_out: int, reached: bool) -> Usage | None:
    """What a request LM Studio reported no usage for is charged. ``reached``: LM Studio took
    the request (and so read its prompt), whatever happened after: a client that hangs up
    mid-answer pays for what was generated, not nothing."""
    if bytes_out <= 0 and not reached:
        return None  # nothing came back: LM Studio refused or failed before answering
    cap = reservation.tokens - reservation.prompt_estimate
    return Usage(reservation.prompt_estimate, min(cap, bytes_out // BYTES_PER_TOKEN))


def _refusal(room: _Room, needed: int, now: float, fits_output: int) -> api_errors.ApiError:
    """``fits_output``: the largest output cap every period has room for now, besides the
    prompt; a caller told it can retry at once instead of waiting for the reset."""
    resets = dt.datetime.fromtimestamp(room.resets_at, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return api_errors.budget_exceeded(
        room.period,
        room.limit,
        max(0, room.left),
        needed,
        resets,
        room.resets_at - now,
        fits_output=fits_output if fits_output >= 1 else None,
    )
