"""Token budgets counted in Redis, for the replicas of a team's gateway.

Each replica's :class:`tray_app.gateway.budgets.BudgetLedger` counts what it settles itself:
alone, two replicas would each let a caller use its whole budget. Here every replica reserves
and settles in the same place, per principal:

- a counter per period (``…:day:<start>``, ``…:month:<start>``): the tokens used in it. The
  first replica that needs one while it is missing starts it from the database's totals (plus
  what that replica has not flushed yet); from then on every settle adds to it.
- the reservations of requests in flight, as leases in a sorted set (member
  ``<replica>:<ticket>:<tokens>``, score = when it expires), renewed by the replica that holds
  them with the concurrency leases: a replica that crashes holds none for long.

A reservation is admitted by one script that reads the counters and the leases and adds its
own only if it fits every limited period, so two replicas never both take the last room. A
settle is one script too: the lease goes and the counters grow in the same step, so no reader
sees the request neither reserved nor used.

What can be off, and which way: a counter missing while requests settle (a new period's first
minutes, or Redis lost its data) starts from the database, which lacks what other replicas
have not flushed yet (a few seconds of their use: counted low); a request flushed to the
database before a counter was started and settled after it is counted twice (high). A settle
that could not reach Redis leaves its counters low, so this replica starts them again from the
database before it reserves for that principal next. A budget lifted drops its counters, so a
budget given back later starts from the database, not from the day as it was.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from tray_app.storage.database import DAY
from tray_app.tasks import spawn

T = TypeVar("T")

PREFIX = "lmgate:budget:"
# A counter outlives its period by this, so a replica whose clock is a little behind still
# finds it (it only ever writes the period its own clock is in).
COUNTER_GRACE_SECONDS = DAY

# KEYS the day's counter, the month's, the reservations; ARGV reset (1: drop the counters
# first), the day's and month's starting totals ('' when not read yet), when each counter
# expires (epoch s), then for a reservation: its member ('' for none), tokens, lease ms, the
# day's and month's limits (-1: none). Returns {status, day used, month used, reserved}:
# status -1 a counter is missing and no start was given, 0 read (or refused), 1 reserved.
RESERVE = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if ARGV[1] == '1' then
  redis.call('DEL', KEYS[1], KEYS[2])
end
local used = {}
for i = 1, 2 do
  local value = redis.call('GET', KEYS[i])
  if not value then
    if ARGV[1 + i] == '' then
      return {-1, 0, 0, 0}
    end
    redis.call('SET', KEYS[i], ARGV[1 + i], 'NX', 'EXAT', ARGV[3 + i])
    value = redis.call('GET', KEYS[i])
  end
  used[i] = tonumber(value)
end
local reserved = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  reserved = reserved + tonumber(string.match(member, ':(%d+)$'))
end
if ARGV[6] == '' then
  return {0, used[1], used[2], reserved}
end
local tokens = tonumber(ARGV[7])
for i = 1, 2 do
  local limit = tonumber(ARGV[8 + i])
  if limit >= 0 and tokens > limit - used[i] - reserved then
    return {0, used[1], used[2], reserved}
  end
end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[8]), ARGV[6])
redis.call('PEXPIRE', KEYS[3], ARGV[8])
return {1, used[1], used[2], reserved + tokens}
"""

# KEYS the day's counter, the month's, the reservations; ARGV the member, the tokens charged.
# A counter that is missing is not started: the database has the request when one is.
SETTLE = """
redis.call('ZREM', KEYS[3], ARGV[1])
for i = 1, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('INCRBY', KEYS[i], ARGV[2])
  end
end
return 0
"""

DROP = """
redis.call('DEL', KEYS[1], KEYS[2])
return 0
"""


class Shared(Protocol):
    """What this needs of :class:`tray_app.gateway.shared_limits.SharedLimits`."""

    @property
    def replica(self) -> str: ...

    @property
    def lease_ms(self) -> int: ...

    async def evaluate(
        self, source: str, keys: list[str], args: list[str | int], *, allowed: T
    ) -> object: ...

    def hold(self, key: str, lease: str) -> None: ...

    def let_go(self, key: str, lease: str) -> bool: ...

    def in_background(
        self, call: Callable[[], Coroutine[Any, Any, object]], name: str
    ) -> object: ...


@dataclass(frozen=True, slots=True)
class Counted:
    """A principal's use as every replica counts it: settled per period, and reserved by
    requests in flight anywhere."""

    day_used: int
    month_used: int
    reserved: int


@dataclass(frozen=True, slots=True)
class Period:
    """The UTC day and month a call is made in (epoch seconds of their starts and ends)."""

    day: int
    month: int
    next_month: int


@dataclass(frozen=True, slots=True)
class Reserved:
    """A reservation Redis took: its lease's member, and the counts with it included."""

    member: str
    counted: Counted


# What a call answers while Redis is down and the policy lets requests through (open).
UNREACHABLE = "unreachable"


class SharedBudgets:
    def __init__(self, shared: Shared) -> None:
        self._shared = shared

    async def read(
        self, principal: str, period: Period, *, start: tuple[int, int] | None, reset: bool
    ) -> Counted | str | None:
        """The principal's counted use; None when a counter must be started and ``start``
        (the stored day and month totals) was not given; UNREACHABLE (open policy)."""
        answer = await self._reserve(principal, period, start=start, reset=reset)
        if not isinstance(answer, list):
            return UNREACHABLE
        if answer[0] == -1:
            return None
        return _counted(answer)

    async def reserve(
        self,
        principal: str,
        period: Period,
        ticket: int,
        tokens: int,
        limits: tuple[int | None, int | None],
    ) -> Reserved | Counted | str | None:
        """Reserve ``tokens`` if they fit both periods' ``limits`` with what is counted:
        Reserved when they did (its lease renewed until :meth:`settle`), what is counted when
        they did not, None when a counter is missing, UNREACHABLE (open policy)."""
        member = f"{self._shared.replica}:{ticket}:{tokens}"
        asking = spawn(
            self._reserve(
                principal,
                period,
                start=None,
                reset=False,
                member=member,
                tokens=tokens,
                limits=limits,
            ),
            name="shared-budget-reserve",
        )
        try:
            # Shielded: a caller that hangs up while Redis takes the reservation would leave
            # it there, unsettled and unrenewed, holding the team's room for lease_seconds.
            answer = await asyncio.shield(asking)
        except asyncio.CancelledError:
            asking.add_done_callback(
                lambda done: self._give_back_unwanted(principal, member, period, done)
            )
            raise
        if not isinstance(answer, list):
            return UNREACHABLE
        if answer[0] == -1:
            return None
        if answer[0] == 1:
            self._shared.hold(_held_key(principal), member)
            return Reserved(member, _counted(answer))
        return _counted(answer)

    def _give_back_unwanted(
        self, principal: str, member: str, period: Period, asking: asyncio.Task[object]
    ) -> None:
        if asking.cancelled() or asking.exception() is not None:
            return
        answer = asking.result()
        if isinstance(answer, list) and answer[0] == 1:
            self.settle(principal, member, 0, period, lambda: None)

    def settle(
        self, principal: str, member: str, tokens: int, period: Period, failed: Callable[[], None]
    ) -> None:
        """Replace the reservation ``member`` by the ``tokens`` charged, in the background;
        ``failed`` is called if Redis did not hear it."""
        held = _held_key(principal)
        self._shared.let_go(held, member)
        keys = [*_counter_keys(principal, period), held]

        async def send() -> None:
            answer = await self._shared.evaluate(SETTLE, keys, [member, tokens], allowed=None)
            if answer is None:
                failed()

        async def call() -> None:
            try:
                await send()
            except Exception:
                failed()

        self._shared.in_background(call, "shared-budget-settle")

    def drop(self, principal: str, period: Period) -> None:
        """Forget the principal's counters (its budget was lifted), in the background."""
        keys = _counter_keys(principal, period)

        async def call() -> None:
            try:
                await self._shared.evaluate(DROP, keys, [], allowed=None)
            except Exception:
                return  # Redis is down: nothing is counted for it there meanwhile either

        self._shared.in_background(call, "shared-budget-drop")

    async def _reserve(
        self,
        principal: str,
        period: Period,
        *,
        start: tuple[int, int] | None,
        reset: bool,
        member: str = "",
        tokens: int = 0,
        limits: tuple[int | None, int | None] = (None, None),
    ) -> object:
        day_start, month_start = ("", "") if start is None else start
        return await self._shared.evaluate(
            RESERVE,
            [*_counter_keys(principal, period), _held_key(principal)],
            [
                "1" if reset else "0",
                day_start,
                month_start,
                period.day + DAY + COUNTER_GRACE_SECONDS,
                period.next_month + COUNTER_GRACE_SECONDS,
                member,
                tokens,
                self._shared.lease_ms,
                -1 if limits[0] is None else limits[0],
                -1 if limits[1] is None else limits[1],
            ],
            allowed=UNREACHABLE,
        )


def _counted(answer: list[object]) -> Counted:
    day, month, reserved = (int(str(value)) for value in answer[1:4])
    return Counted(day, month, reserved)


def _counter_keys(principal: str, period: Period) -> list[str]:
    return [f"{PREFIX}{principal}:day:{period.day}", f"{PREFIX}{principal}:month:{period.month}"]


def _held_key(principal: str) -> str:
    return f"{PREFIX}{principal}:held"
