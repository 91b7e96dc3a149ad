"""One generation's way through the parts that share one GPU: the caller's token budget, the
fair queue for a generation slot, and the model guard.

The order is the point. The budget is checked first, from the body alone, so a caller over
budget never waits in the queue for a refusal; its reservation also decides the output cap the
request carries. Then the model guard: a request waiting for another model's answers to end
holds no generation slot, so the slots keep serving the model that is loaded; it holds a
waiting place in the queue instead, so it counts against the queue's bounds like any waiter.
Last the fair queue's slot (round-robin across callers). Both waits share one deadline: a
request waits at most ``queue.max_wait`` (``queue.max_stream_wait``) in all. Everything a
generation took is given back in one place, :meth:`Generation.release`, whatever way it ended.

With several upstreams each has its own model guard and its own queue (its generation slots):
the model and the slot are waited for on the machine the request goes to, so one busy or hung
machine holds no other machine's slots.

The parts are passed in (see :class:`Queue`, :class:`Guard`, :class:`Ledger`): the gateway
builds the real ones, tests may pass their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from tray_app.gateway import api_errors as errors
from tray_app.gateway.body_rules import LENGTH_FIELDS, PreparedBody
from tray_app.gateway.routes import Route
from tray_app.gateway.state_calls import StateCalls
from tray_app.gateway.token_estimate import estimate_prompt_tokens
from tray_app.gateway.upstream.usage import Usage
from tray_app.identity.principal import Budget, Principal

Notify = Callable[[str], None]


class Turn(Protocol):
    caller: str


class Queue(Protocol):
    def try_acquire(self, caller: str) -> Any: ...

    def hold_place(self, caller: str, client: str) -> Any: ...

    def free_place(self, place: Any) -> None: ...

    async def acquire(
        self,
        caller: str,
        client: str,
        *,
        max_wait: float,
        notify: Notify | None = None,
        deadline: float | None = None,
        place: Any = None,
    ) -> Any: ...

    def release(self, turn: Any) -> None: ...


class Guard(Protocol):
    async def enter(
        self,
        model: str | None,
        *,
        max_wait: float,
        notify: Notify | None = None,
        before_waiting: Callable[[], None] | None = None,
        draft_model: str | None = None,
    ) -> Any: ...

    def leave(self, use: Any) -> None: ...


class Ledger(Protocol):
    def reserve(
        self, principal: Principal, *, prompt_estimate: int, requested_output: int | None
    ) -> Any: ...

    def settle(
        self,
        reservation: Any,
        used: Usage | None,
        *,
        bytes_out: int = 0,
        reached: bool = False,
        unanswered: bool = False,
    ) -> Usage | None: ...

    def left(self, principal: str, budget: Budget) -> int: ...

    async def load(
        self, principal: Principal, state: StateCalls, *, fresh: bool = False
    ) -> bool: ...

    async def commit(self, principal: Principal, reservation: Any) -> bool: ...

    def refuse(self, principal: Principal, reservation: Any) -> Exception: ...


class Slots(Protocol):
    """Each upstream's generation slots counted where every replica sees them (the shared
    limits): a replica's own queue alone would let N replicas run N times as many."""

    async def take_slot(self, upstream: str, deadline: float, notify: Notify | None) -> Any: ...

    def give_back_slot(self, upstream: str, slot: Any) -> None: ...


class Leases(Protocol):
    """A caller's places among its concurrent requests, counted where every replica sees
    them (the gateway's protections over the shared limits)."""

    async def enter(self, principal: str) -> str: ...

    def leave(self, principal: str, lease: str) -> None: ...


# A budgeted request that names no output length gets this cap (less if less is left), so
# that one such request does not reserve the whole budget and refuse its caller's others.
BUDGETED_DEFAULT_OUTPUT = 8192
# Less than this left, a request that named no length is refused rather than cut short.
MIN_DEFAULT_OUTPUT = 16
# Replicas: how often a reservation is made again, with the team's fresh counts, when another
# replica took the room it was sized for in the meantime; the last one refused is refused.
RESERVE_TRIES = 3
# What a generation that found every replica's slots taken for its whole wait is told.
SLOT_RETRY_AFTER_SECONDS = 5.0


def requested_output(payload: dict[str, Any], route: Route) -> int | None:
    """The smallest output length the client asked for (None: it set none). An endpoint with
    no output at all (embeddings) asks for 0."""
    fields = LENGTH_FIELDS.get(route.path)
    if fields is None:
        return 0
    asked = [v for f in fields if type(v := payload.get(f)) is int and v > 0]
    return min(asked, default=None)


class Sharing:
    def __init__(
        self,
        queue: Queue,
        *,
        guard: Guard | None,
        ledger: Ledger | None,
        max_wait: float,
        max_stream_wait: float,
        state: StateCalls | None = None,
    ) -> None:
        self._queue = queue
        self._state = state or StateCalls(offload=False)
        # Replicas only: each queue caps a caller's generations on its own machine, so a
        # generation also holds a place counted across the replicas once it has its turn.
        self.leases: Leases | None = None
        self.slots: Slots | None = None  # replicas only, likewise
        self.guard = guard
        # Each upstream's own guard, by name (a model loaded on one machine evicts nothing on
        # another); an upstream without one here has ``guard``.
        self.guards: Mapping[str, Guard] = {}
        # Likewise each upstream's own queue for its generation slots; one without has
        # ``queue``.
        self.queues: Mapping[str, Queue] = {}
        self._ledger = ledger
        self._max_wait = max_wait
        self._max_stream_wait = max_stream_wait

    def queue_for(self, upstream: str | None) -> Queue:
        if upstream is None:
            return self._queue
        return self.queues.get(upstream, self._queue)

    def guard_for(self, upstream: str | None) -> Guard | None:
        if upstream is None:
            return self.guard
        return self.guards.get(upstream, self.guard)

    async def admit(
        self, principal: Principal, client: str, route: Route, prepared: PreparedBody
    ) -> Generation:
        """A generation that may go ahead as far as its budget goes (else ApiError 429
        budget_exceeded); it still has to wait for its turn. The caller's stored use is read
        first (a remote database's off the loop); with replicas, the reservation is taken
        where every replica counts."""
        ledger = self._ledger
        fresh = False
        tries_left = RESERVE_TRIES
        while True:
            tries_left -= 1
            may_be_old = ledger is not None and await ledger.load(
                principal, self._state, fresh=fresh
            )
            try:
                generation = self._admit_here(principal, client, route, prepared)
            except errors.ApiError as err:
                if not may_be_old or err.code != "budget_exceeded" or not tries_left:
                    raise
                fresh = True  # refused on counts a moment old: asked again first
                continue
            reservation = generation._reservation
            if ledger is None:
                return generation
            try:
                committed = await ledger.commit(principal, reservation)
            except BaseException:
                # Hung up, or Redis failed (closed policy): the generation is never returned,
                # so nothing else would give its reservation back.
                generation.settle(None, 0)
                raise
            if committed:
                return generation
            if not tries_left:
                raise ledger.refuse(principal, reservation)

    def _admit_here(
        self, principal: Principal, client: str, route: Route, prepared: PreparedBody
    ) -> Generation:
        cap = principal.max_tokens
        reservation = None
        budget = principal.budget
        ledger = self._ledger
        if ledger is not None and budget is not None and budget.limited:
            asked = requested_output(prepared.payload, route)
            prompt = estimate_prompt_tokens(prepared.payload)
            if asked is None:
                # The client named no length: what is left caps it, the credential's own
                # cap too (a phone cannot set max_tokens, so refusing it would strand it).
                # Less than the minimum left: asking for the minimum makes the ledger refuse,
                # in its words and with what would still fit.
                asked = self._default_output(principal.name, budget, prompt, cap)
                asked = asked or MIN_DEFAULT_OUTPUT
            elif cap is not None:
                asked = min(asked, cap)
            # Always a length here: the body carries what was reserved for its output, so it
            # cannot use more.
            reservation = ledger.reserve(principal, prompt_estimate=prompt, requested_output=asked)
            if asked:
                cap = asked
        elif ledger is not None:
            # No budget now: the ledger forgets what it counted, or a budget given back
            # later would start from the day's total as it was when it was lifted.
            ledger.reserve(principal, prompt_estimate=0, requested_output=None)
        return Generation(
            self,
            principal.name,
            client,
            prepared.model,
            prepared.draft_model,
            cap,
            reservation,
            self._max_stream_wait if prepared.stream else self._max_wait,
        )

    def _default_output(
        self, caller: str, budget: Budget, prompt: int, cap: int | None
    ) -> int | None:
        """BUDGETED_DEFAULT_OUTPUT (or the credential's ``cap``), or what is left when that
        is less; None when less than MIN_DEFAULT_OUTPUT is left (an answer cut to a token or
        two, with no word why, helps nobody)."""
        assert self._ledger is not None
        room = min(
            BUDGETED_DEFAULT_OUTPUT if cap is None else cap,
            self._ledger.left(caller, budget) - prompt,
        )
        return room if room >= MIN_DEFAULT_OUTPUT else None


class Generation:
    """What one admitted generation holds: its budget reservation, then its slot and its model
    use once :meth:`wait_turn` got them. ``max_tokens`` is the output cap its body must carry."""

    __slots__ = (
        "_caller",
        "_client",
        "_deadline",
        "_draft_model",
        "_lease",
        "_max_wait",
        "_model",
        "_place",
        "_queue",
        "_reservation",
        "_sharing",
        "_slot",
        "_turn",
        "_use",
        "max_tokens",
    )

    def __init__(
        self,
        sharing: Sharing,
        caller: str,
        client: str,
        model: str | None,
        draft_model: str | None,
        max_tokens: int | None,
        reservation: Any,
        max_wait: float,
    ) -> None:
        self._sharing = sharing
        self._caller = caller
        self._client = client
        self._model = model
        self._draft_model = draft_model
        self.max_tokens = max_tokens
        self._reservation = reservation
        self._max_wait = max_wait
        self._turn: Any = None
        self._deadline: float | None = None  # set by the first wait_turn
        self._use: tuple[Guard, Any] | None = None
        self._place: Any = None
        self._lease: str | None = None
        self._slot: tuple[str, Any] | None = None  # (upstream, its slot) on the replicas
        # The queue of the upstream being asked: its slot, or the place held in it.
        self._queue: Queue = sharing._queue

    async def wait_turn(self, notify: Notify | None, upstream: str | None = None) -> None:
        """Wait for the model on ``upstream``, then for a slot, both within one
        ``max_wait``; ApiError if either refuses. Called just before an upstream is asked
        (cancelled with the request, it leaves both queues), and again when a request that
        could not connect is sent to another upstream: then only that upstream's model guard
        is waited for, within what is left of the same deadline, and the slot is that
        upstream's (each machine runs its own generations)."""
        sharing = self._sharing
        queue = sharing.queue_for(upstream)
        loop_time = asyncio.get_running_loop().time
        if self._deadline is None:
            self._deadline = loop_time() + self._max_wait
        deadline = self._deadline
        if self._use is not None:
            # A retry elsewhere: the model is no longer being asked of the first upstream.
            left, use = self._use
            self._use = None
            left.leave(use)
        if self._turn is not None and self._queue is not queue:
            self._queue.release(self._turn)
            self._turn = None
            self._give_back_slot()
        self._queue = queue
        guard = sharing.guard_for(upstream)
        if guard is not None:
            try:
                # The guard it entered is the one it leaves, even if the gateway stops
                # meanwhile.
                self._use = (
                    guard,
                    await guard.enter(
                        self._model,
                        max_wait=min(self._max_wait, max(0.0, deadline - loop_time())),
                        notify=notify,
                        before_waiting=self._hold_place,
                        draft_model=self._draft_model,
                    ),
                )
            except BaseException:
                self._free_place()
                raise
        if self._turn is not None:
            self._free_place()
            return
        turn = queue.try_acquire(self._caller)
        if turn is None:
            place, self._place = self._place, None
            turn = await queue.acquire(
                self._caller,
                self._client,
                max_wait=self._max_wait,
                notify=notify,
                deadline=deadline,
                place=place,
            )
        else:
            self._free_place()
        self._turn = turn
        leases = sharing.leases
        if leases is not None and self._lease is None:
            # After the turn: the caller's generations on this replica wait in its queue as
            # on one machine; one beyond the cap elsewhere is refused here (429), which
            # release() then undoes with the turn.
            self._lease = await leases.enter(self._caller)
        slots = sharing.slots
        if slots is not None and self._slot is None:
            # Last: a generation holds another replica's share of LM Studio only once it
            # may run.
            name = upstream or ""
            slot = await slots.take_slot(name, deadline, notify)
            if slot is None:
                raise errors.queue_wait_timeout(self._max_wait, SLOT_RETRY_AFTER_SECONDS)
            self._slot = (name, slot)

    def _give_back_slot(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None and self._sharing.slots is not None:
            self._sharing.slots.give_back_slot(*slot)

    def _hold_place(self) -> None:
        self._place = self._queue.hold_place(self._caller, self._client)

    def _free_place(self) -> None:
        place, self._place = self._place, None
        if place is not None:
            self._queue.free_place(place)

    def release(self) -> None:
        """Give back the slot and the model, as soon as the answer ended however it ended
        (refused, failed, hung up, finished); a second call does nothing."""
        if self._use is not None:
            guard, use = self._use
            guard.leave(use)
            self._use = None
        if self._turn is not None:
            self._queue.release(self._turn)
            self._turn = None
        self._give_back_slot()
        lease, self._lease = self._lease, None
        if lease is not None and self._sharing.leases is not None:
            self._sharing.leases.leave(self._caller, lease)

    def settle(
        self,
        usage: Usage | None,
        bytes_out: int,
        *,
        reached: bool = False,
        unanswered: bool = False,
    ) -> Usage | None:
        """Settle the budget with what was really used, and return the usage to record for
        it (an estimate when LM Studio reported none): the gateway records it in the same
        step, so a restart reads the totals the ledger counted."""
        reservation, self._reservation = self._reservation, None
        if reservation is None or self._sharing._ledger is None:
            return usage
        return self._sharing._ledger.settle(
            reservation, usage, bytes_out=bytes_out, reached=reached, unanswered=unanswered
        )
