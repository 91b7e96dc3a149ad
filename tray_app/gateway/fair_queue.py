"""The fair queue for generation slots: when LM Studio is busy, requests wait their turn instead
of being refused, and the turns go round-robin across callers, not by arrival.

A caller (principal) with fifty requests waiting and one with a single request alternate. Each
request gets a round number: one more than its caller's request before it (waiting, running or
done), and never earlier than the round being served now. A caller with nothing waiting or
running (idle) starts in the round being served or the one after, never later: it saves up no
turns while idle and carries no debt from turns it took while nobody else waited, so it is
served within one round, but only once before the others' next. A request that gives up gives
its round back, so abandoned waits push a caller no later. Turns go by round, and within a
round by arrival. A caller that sends its next request only when the last one ends thus keeps
its share against one that queued fifty at once: plain rotation over the callers that wait at
each grant would pass it over, because at that instant it has nothing waiting. A caller never
runs more than ``per_caller`` generations at once; one at that cap is passed over, keeping its
place, until one of its own ends.

Waiting is bounded three times — in total, per client address group (an IPv4 address, an IPv6
/64) and per caller — so a flood from one address, or from one credential spread over many
addresses (a tunnel, an IPv6 /48), fills only its own share. A request waiting for its model
before it queues (see :class:`Place`) counts against the same bounds. A waiter that gives up
(the client hung up, its credential was revoked, the gateway stops) leaves at once; a slot
granted to it in the same instant goes on to the next waiter, never lost.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable

from tray_app.gateway import api_errors as errors
from tray_app.gateway.limits import address_group

Notify = Callable[[str], None]

# Retry-After after a refusal is one mean turn: by then ``slots`` waiters have moved on, so a
# full queue has room again and a busy LM Studio has served a round. Clamped so that a client
# neither hammers the gateway after a quick answer nor gives up for minutes after a long one.
# The first estimate stands until some turns have been measured.
RETRY_AFTER_MIN = 1.0
RETRY_AFTER_MAX = 5.0
_FIRST_TURN_ESTIMATE = 2.0
_TURN_WEIGHT = 0.1  # of the newest turn in the moving mean: about the last ten count
_PRUNE_AT = 4096  # callers remembered before those that no longer matter are forgotten
# Entries of waiters that left, kept in the heap of heads beyond the live ones before it is
# rebuilt: a flood of give-ups must not grow it past the waiting it bounds.
_STALE_SLACK = 16


class Turn:
    """One granted generation slot; give it back with :meth:`FairQueue.release`."""

    __slots__ = ("_released", "caller", "round", "started")

    def __init__(self, caller: str, round_: int, started: float) -> None:
        self.caller = caller
        self.round = round_  # its start round (see _take_round)
        self.started = started
        self._released = False


class Place:
    """A waiting place held before the request joins the queue — while the model guard waits
    for its model — counted against the same bounds as a waiter, so requests waiting for a
    model cannot pile up past them. Pass it to :meth:`FairQueue.acquire` (which takes it over)
    or give it back with :meth:`FairQueue.free_place`."""

    __slots__ = ("_held", "caller", "group")

    def __init__(self, caller: str, group: str) -> None:
        self.caller = caller
        self.group = group
        self._held = True


class _Waiter:
    __slots__ = ("ahead", "caller", "future", "group", "notify", "place", "prior")

    def __init__(
        self,
        caller: str,
        group: str,
        notify: Notify | None,
        future: asyncio.Future[Turn],
        place: tuple[int, int],
    ) -> None:
        self.caller = caller
        self.group = group
        self.notify = notify
        self.future = future
        self.place = place  # (round, arrival): the smallest is served first
        # The round its caller goes back to if this one gives up: its own, or an earlier one
        # handed on by a request of the same caller before it that gave up.
        self.prior = place[0]
        self.ahead = -1  # what the client was last told


class FairQueue:
    """``busy`` (slots in use) and ``waiting`` (requests waiting) are read by the metrics."""

    def __init__(
        self,
        *,
        slots: int,
        per_caller: int,
        max_waiting: int,
        max_waiting_per_client: int,
        max_waiting_per_caller: int | None = None,
    ) -> None:
        self._slots = slots
        self._per_caller = per_caller
        self._max_waiting = max_waiting
        self._max_per_client = max_waiting_per_client
        # None: no bound of its own, only the total's
        self._max_per_caller = (
            max_waiting if max_waiting_per_caller is None else max_waiting_per_caller
        )
        self.busy = 0
        self.waiting = 0
        self._held = 0  # places held outside the queue (see Place)
        self._caller_places: dict[str, int] = {}  # waiting and held, per caller
        self._running: dict[str, int] = {}
        self._queues: dict[str, deque[_Waiter]] = {}  # each waiting caller's, in its own order
        # Each waiting caller's first waiter's place, with its name; entries whose waiter has
        # left since are skipped when they come up.
        self._heads: list[tuple[int, int, str]] = []
        self._round = 0  # the latest start round granted to a waiter
        self._in_service: dict[int, int] = {}  # start round: how many turns from it run
        self._done_round = 0  # the latest end of a round
        self._next_round: dict[str, int] = {}  # each caller's: after its latest request's
        self._arrivals = itertools.count()
        self._per_group: dict[str, int] = {}
        self._mean_turn = _FIRST_TURN_ESTIMATE
        self._telling: asyncio.Handle | None = None

    def try_acquire(self, caller: str) -> Turn | None:
        """A turn at once when nobody waits, a slot is free and ``caller`` is under its cap;
        else None (then :meth:`acquire`). No await: it runs on every generation request, so
        _grant, _now and _take_round are written out here (without pruning, which waits for
        a queue to form)."""
        if self.waiting or self.busy >= self._slots:
            return None
        running = self._running
        count = running.get(caller, 0)
        if count >= self._per_caller:
            return None
        running[caller] = count + 1
        self.busy += 1
        # A turn taken at once counts in the rounds too: a caller that grabbed every slot
        # while nobody waited queues behind the others when they come.
        in_service = self._in_service
        now = min(in_service) if in_service else self._done_round
        if now < self._round:
            now = self._round
        rounds = self._next_round
        place = rounds.get(caller, 0)
        if place < now:
            place = now
        elif not count and place > now + 1:
            place = now + 1  # idle (nothing waits, nothing of its own runs): see _take_round
        rounds[caller] = place + 1
        in_service[place] = in_service.get(place, 0) + 1
        return Turn(caller, place, time.monotonic())

    def hold_place(self, caller: str, client: str) -> Place:
        """A waiting place for ``caller`` from ``client``, counted against the bounds until it
        is given to :meth:`acquire` or back; raises queue_full as :meth:`acquire` does."""
        group = address_group(client)
        self._check_room(caller, group)
        self._held += 1
        self._count_in(caller, group)
        return Place(caller, group)

    def free_place(self, place: Place) -> None:
        """Gives a held place back; a second call, or one for a place acquire took, does
        nothing."""
        if place._held:
            place._held = False
            self._held -= 1
            self._count_out(place.caller, place.group)

    async def acquire(
        self,
        caller: str,
        client: str,
        *,
        max_wait: float,
        notify: Notify | None = None,
        deadline: float | None = None,
        place: Place | None = None,
    ) -> Turn:
        """Waits for ``caller``'s turn, telling ``notify`` how many go first whenever that
        changes. Raises queue_full when no more may wait (in total, from ``client``'s address
        group, or from ``caller``), queue_wait_timeout after ``max_wait`` seconds — or at
        ``deadline`` (the loop's clock) when the request already waited elsewhere for part of
        ``max_wait``. A ``place`` held for this request is taken over, whatever the outcome."""
        # Whenever a slot is free, every waiter's caller is at its cap (each change grants what
        # it can), so a caller under its cap overtakes nobody by taking a free slot.
        if self.busy < self._slots and self._running.get(caller, 0) < self._per_caller:
            if place is not None:
                self.free_place(place)
            return self._grant(caller, self._take_round(caller))
        if place is not None and place._held:
            place._held = False  # its counts become the waiter's
            self._held -= 1
            group = place.group
        else:
            group = address_group(client)
            self._check_room(caller, group)
            self._count_in(caller, group)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Turn] = loop.create_future()
        waiter = _Waiter(caller, group, notify, future, self._next_place(caller))
        self._enqueue(waiter)
        try:
            async with asyncio.timeout_at(loop.time() + max_wait if deadline is None else deadline):
                return await waiter.future
        except TimeoutError:
            turn = self._give_up(waiter)
            if turn is not None:
                return turn  # granted just as the time ran out: it counts
            if self.busy < self._slots:
                # Slots were free: only the caller's own answers held it back, and more
                # slots would not have helped (as queue_wait_timeout's advice says).
                raise errors.too_many_concurrent_requests(self._per_caller) from None
            raise errors.queue_wait_timeout(max_wait, self.retry_after()) from None
        except BaseException:
            turn = self._give_up(waiter)
            if turn is not None:
                self.release(turn)  # granted just as the waiter left: the next one gets it
            raise

    def release(self, turn: Turn) -> None:
        """Gives the slot back and grants the next turn; a second release does nothing."""
        if turn._released:
            return
        turn._released = True
        self.busy -= 1
        caller, round_ = turn.caller, turn.round
        running = self._running
        count = running[caller] - 1
        if count:
            running[caller] = count
        else:
            del running[caller]
        in_service = self._in_service
        count = in_service[round_] - 1
        if count:
            in_service[round_] = count
        else:
            del in_service[round_]
        if round_ >= self._done_round:
            self._done_round = round_ + 1
        self._mean_turn += (time.monotonic() - turn.started - self._mean_turn) * _TURN_WEIGHT
        if self._heads:
            self._grant_waiting()

    def retry_after(self) -> float:
        """Seconds a refused client should wait before trying again."""
        return min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, self._mean_turn))

    # ---- the waiters ------------------------------------------------------------------------

    def _grant(self, caller: str, round_: int) -> Turn:
        self._running[caller] = self._running.get(caller, 0) + 1
        self.busy += 1
        return self._start(caller, round_)

    def _start(self, caller: str, round_: int) -> Turn:
        self._in_service[round_] = self._in_service.get(round_, 0) + 1
        return Turn(caller, round_, time.monotonic())

    def _now(self) -> int:
        """The round being served: the latest given to a waiter, or later when every turn
        running started later (turns taken at once while nobody waited) or none runs. The
        earliest running turn, not the latest, so that one caller's burst of turns taken at
        once does not move the others on; never behind the waiters' rounds, so that one long
        answer does not hold "now" back while the queue moves on."""
        running = self._in_service
        return max(self._round, min(running) if running else self._done_round)

    def _take_round(self, caller: str) -> int:
        # Start-time fair queuing, in rounds: a request starts in its caller's round after the
        # one of its latest request (waiting, running or done), but never before the round
        # being served. Counting from the latest request even when that one was already
        # served keeps a caller that was just served from a second turn this round.
        # Invariant: an idle caller (nothing waiting, nothing running) starts in round now or
        # now + 1. Its rounds ahead of that came from turns it took while nobody waited (a
        # long answer holds "now" back meanwhile) and deprived nobody, so they must not keep
        # it behind a backlog that formed since; and never before now, so idling saves none.
        now = self._now()
        rounds = self._next_round
        if len(rounds) > _PRUNE_AT and len(rounds) > 2 * len(self._queues):
            # Only rounds still ahead of now matter; the others mean "now".
            self._next_round = rounds = {c: r for c, r in rounds.items() if r > now}
        place = max(now, rounds.get(caller, 0))
        if place > now + 1 and caller not in self._queues and caller not in self._running:
            place = now + 1
        rounds[caller] = place + 1
        return place

    def _next_place(self, caller: str) -> tuple[int, int]:
        return self._take_round(caller), next(self._arrivals)

    def _check_room(self, caller: str, group: str) -> None:
        if self._per_group.get(group, 0) >= self._max_per_client:
            raise errors.queue_full(True, self.retry_after())
        if self.waiting + self._held >= self._max_waiting:
            raise errors.queue_full(False, self.retry_after())
        if self._caller_places.get(caller, 0) >= self._max_per_caller:
            raise errors.queue_full_for_caller(self.retry_after())

    def _count_in(self, caller: str, group: str) -> None:
        self._per_group[group] = self._per_group.get(group, 0) + 1
        self._caller_places[caller] = self._caller_places.get(caller, 0) + 1

    def _count_out(self, caller: str, group: str) -> None:
        for counts, key in ((self._per_group, group), (self._caller_places, caller)):
            left = counts[key] - 1
            if left:
                counts[key] = left
            else:
                del counts[key]

    def _enqueue(self, waiter: _Waiter) -> None:
        queue = self._queues.get(waiter.caller)
        if queue is None:
            queue = self._queues[waiter.caller] = deque()
            self._push_head(waiter)
        queue.append(waiter)
        self.waiting += 1
        self._positions_changed()

    def _push_head(self, waiter: _Waiter) -> None:
        heapq.heappush(self._heads, (*waiter.place, waiter.caller))

    def _unlink(self, waiter: _Waiter) -> None:
        """Counts ``waiter`` out; it is already off its caller's queue."""
        self.waiting -= 1
        self._count_out(waiter.caller, waiter.group)
        self._positions_changed()

    def _give_up(self, waiter: _Waiter) -> Turn | None:
        """Takes a waiter that stops waiting out of the queue; returns the turn it was granted
        in the meantime, if any."""
        future = waiter.future
        if future.done() and not future.cancelled():
            return future.result()
        caller = waiter.caller
        queue = self._queues.get(caller)
        if queue is not None and waiter in queue:
            index = queue.index(waiter)
            del queue[index]
            # Its round goes back: to the caller's next request when one waits behind it,
            # else to the caller, so abandoned waits do not push the caller later and later.
            if index < len(queue):
                queue[index].prior = waiter.prior
            else:
                self._next_round[caller] = waiter.prior
            if not queue:
                del self._queues[caller]
            elif not index:
                self._push_head(queue[0])
            self._unlink(waiter)
            if len(self._heads) > 2 * len(self._queues) + _STALE_SLACK:
                self._heads = [(*q[0].place, c) for c, q in self._queues.items()]
                heapq.heapify(self._heads)
        return None

    def _grant_waiting(self) -> None:
        capped: list[tuple[int, int, str]] = []  # passed over, for after this grant
        heads = self._heads
        while self.busy < self._slots and heads:
            entry = heapq.heappop(heads)
            caller = entry[2]
            queue = self._queues.get(caller)
            if queue is None or queue[0].place != entry[:2]:
                continue  # that waiter left; its caller's next one has its own entry
            if self._running.get(caller, 0) >= self._per_caller:
                capped.append(entry)
                continue
            waiter = queue.popleft()
            if queue:
                self._push_head(queue[0])
            else:
                del self._queues[caller]
            self._unlink(waiter)
            if not waiter.future.done():  # a waiter cancelled a moment ago is gone
                self._round = max(self._round, waiter.place[0])
                waiter.future.set_result(self._grant(caller, waiter.place[0]))
        for entry in capped:
            heapq.heappush(heads, entry)

    # ---- telling waiters their place --------------------------------------------------------

    def _positions_changed(self) -> None:
        """Places are told once per loop turn, however many changes that turn brought: a burst
        of arrivals costs one pass over the waiters, not one per arrival."""
        if self._telling is None and self.waiting:
            self._telling = asyncio.get_running_loop().call_soon(self._tell_positions)

    def _tell_positions(self) -> None:
        self._telling = None
        ahead = 0
        for waiter in self._in_serving_order():
            if waiter.future.done():
                continue  # leaving: it holds no place
            if waiter.notify is not None and waiter.ahead != ahead:
                waiter.notify(f"waiting, {ahead} ahead")
            waiter.ahead = ahead
            ahead += 1

    def _in_serving_order(self) -> list[_Waiter]:
        """The waiters in the order their turns would come if every cap allowed."""
        return list(heapq.merge(*self._queues.values(), key=lambda waiter: waiter.place))
