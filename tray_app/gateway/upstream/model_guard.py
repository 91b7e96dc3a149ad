"""No model evicted mid-answer: what stands between a request and LM Studio's JIT loading.

A request naming a model LM Studio has on disk but not in memory makes LM Studio load it and
evict the others, cutting off whoever is streaming from them (LM Studio bug #671), and
simultaneous first requests load several copies (#1751). So the guard counts each model's
uses (from ``enter`` to ``leave``) and lets a request that needs another model wait until the
other models' answers are done (policy wait; refuse answers 503 at once), holding new requests
for those models meanwhile so the switch is not starved; then it loads the model once, however
many ask for it. What is loaded it reads from LM Studio's own API, at most every
``REFRESH_INTERVAL`` seconds and again on a miss, so LM Studio's own unloads are noticed.

When the guard cannot know (the policy is off, no model is named, the server has no model API,
LM Studio cannot be asked, or it does not know the model), it lets the request through: the
forwarder then reports what LM Studio says, in LM Studio's own words.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

from tray_app.clock import Clock
from tray_app.config.settings import ModelSwitch
from tray_app.gateway import api_errors as errors
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.upstream.model_api import ModelApi, ModelStates
from tray_app.tasks import spawn

REFRESH_INTERVAL = 2.0
# What a refused or timed-out switch is told to wait: about one answer's length.
RETRY_AFTER = 10.0
WAITING_FOR_OTHERS = "waiting for another model's answers to finish"
WAITING_FOR_SWITCH = "waiting for another model to load"
LOADING = "loading the model"


class ModelUse:
    """One request's hold on its model (and its draft model), from ``enter`` until ``leave``."""

    __slots__ = ("_counted", "_draft", "model")

    def __init__(self, model: str | None) -> None:
        self.model = model
        # The model this use is counted under until it leaves; None: not (or no longer) counted.
        self._counted: str | None = None
        self._draft: str | None = None  # the draft model it is counted under as well


def _silent(_: str) -> None:
    pass


def _nothing() -> None:
    pass


class ModelGuard:
    def __init__(
        self, api: ModelApi, *, policy: ModelSwitch, load_timeout: float, clock: Clock
    ) -> None:
        self._api = api
        self._policy = ModelSwitch(policy)  # a plain "off" from code (Config built by hand) too
        self._load_timeout = load_timeout
        self._clock = clock
        self._active: Counter[str] = Counter()
        # Models requests wait to switch to, each with its number of waiters, first come
        # first: the first is the switch under way, and every other model's new requests wait.
        self._wanted: dict[str, int] = {}
        self._states: ModelStates | None = None
        self._read_at: float | None = None
        self._reading: asyncio.Task[ModelStates | None] | None = None
        self._loads: dict[str, asyncio.Task[float]] = {}
        self._changed = asyncio.Event()
        self._waiting = 0  # requests in _changes_before, for _wake

    def loaded_models(self) -> frozenset[str]:
        """The models LM Studio last said were loaded, for the tray and metrics only."""
        return frozenset() if self._states is None else self._states.loaded

    async def enter(
        self,
        model: str | None,
        *,
        max_wait: float,
        notify: Callable[[str], None] | None = None,
        before_waiting: Callable[[], None] | None = None,
        draft_model: str | None = None,
    ) -> ModelUse:
        """Return once ``model`` may be asked for without evicting a model others are
        receiving answers from. Raises model_switch_refused, model_switch_timeout (after
        ``max_wait`` seconds of waiting), model_load_failed or model_load_timeout.
        ``before_waiting`` is called once, before the first wait (for other answers, a
        switch or a load), and not when the model may be asked for at once: the queue holds
        a place there, so requests waiting here count against its bounds (what it raises,
        ``enter`` raises). A ``draft_model`` (speculative decoding) LM Studio would load too:
        one not loaded is refused (model_switch_refused), as its load could evict a model
        others read from; one loaded is counted like the model, so no switch evicts it."""
        if self._policy is ModelSwitch.OFF or model is None:
            return ModelUse(model)
        use, _ = await self._enter(
            model, max_wait, notify or _silent, before_waiting or _nothing, warm=False
        )
        if draft_model is not None and draft_model != model:
            try:
                await self._count_draft(use, draft_model)
            except BaseException:
                self.leave(use)
                raise
        return use

    def leave(self, use: ModelUse) -> None:
        counted = (use._counted, use._draft)
        use._counted = use._draft = None
        for model in counted:
            if model is not None:
                self._active[model] -= 1
                if not self._active[model]:
                    del self._active[model]
                    self._wake()

    async def warm_up(self, model: str) -> float:
        """Load ``model`` now, under the same rules as a request for it (with the policy
        off, at once); the seconds the load took, 0 if it was loaded already."""
        # Off turns off the guarding, not the loading the owner asks for; with the guard
        # off no use is counted, so nothing is waited for.
        use, seconds = await self._enter(model, self._load_timeout, _silent, _nothing, warm=True)
        self.leave(use)
        return seconds

    async def close(self) -> None:
        """Stop the loads and reads under way (at shutdown: nobody waits for them)."""
        tasks: list[asyncio.Task[Any]] = [*self._loads.values()]
        if self._reading is not None:
            tasks.append(self._reading)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- entering ---------------------------------------------------------------------------

    async def _enter(
        self,
        model: str,
        max_wait: float,
        notify: Callable[[str], None],
        before_waiting: Callable[[], None],
        *,
        warm: bool,
    ) -> tuple[ModelUse, float]:
        deadline = self._clock.monotonic() + max_wait
        told: set[str] = set()

        def say(words: str) -> None:
            # Every wait is told first, so the first words are the moment waiting begins.
            if words not in told:
                if not told:
                    before_waiting()
                told.add(words)
                notify(words)

        seconds = 0.0
        wanting = False
        try:
            states = await (self._read_now() if warm else self._read(model))
            while True:
                if states is None or model not in states.downloaded:
                    if warm:
                        raise _cannot_warm_up(model, states)
                    return self._count(model), seconds
                if model in states.loaded:
                    if not self._held(model):
                        return self._count(model), seconds
                    say(WAITING_FOR_SWITCH)
                else:
                    if not wanting:
                        self._wanted[model] = self._wanted.get(model, 0) + 1
                        wanting = True
                    if self._busy_besides(model):
                        if self._policy is ModelSwitch.REFUSE:
                            raise errors.model_switch_refused(model, RETRY_AFTER)
                        say(WAITING_FOR_OTHERS)
                    elif next(iter(self._wanted)) != model:
                        say(WAITING_FOR_SWITCH)
                    else:
                        say(LOADING)
                        # Shielded: a caller going away must not cancel a load others await.
                        seconds = await asyncio.shield(self._load_once(model))
                        states = await self._read(None)
                        if states is None:
                            # Loaded, then LM Studio could not be asked (see _load): the
                            # forwarder finds out whether it answers.
                            return self._count(model), seconds
                        continue
                if not await self._changes_before(deadline):
                    raise errors.model_switch_timeout(model, max_wait, RETRY_AFTER)
                states = await self._read(None)
        finally:
            if wanting:
                self._unwant(model)

    async def _count_draft(self, use: ModelUse, draft: str) -> None:
        # Loading a draft model beside the model is a switch of its own; waiting for it too
        # would mean waiting for two models at once, so it must be loaded already (a warm-up).
        states = await self._read(draft)
        if states is None or draft not in states.downloaded:
            return  # not one the guard can know: LM Studio answers for it
        if draft not in states.loaded:
            raise errors.draft_model_not_loaded(draft, RETRY_AFTER)
        self._active[draft] += 1
        use._draft = draft

    def _count(self, model: str) -> ModelUse:
        self._active[model] += 1
        use = ModelUse(model)
        use._counted = model
        return use

    def _held(self, model: str) -> bool:
        """A switch to another model is under way or waiting: this model may be evicted."""
        return bool(self._wanted) and next(iter(self._wanted)) != model

    def _busy_besides(self, model: str) -> bool:
        return any(other != model for other in self._active)

    def _unwant(self, model: str) -> None:
        left = self._wanted[model] - 1
        if left:
            self._wanted[model] = left
        else:
            del self._wanted[model]
            self._wake()

    def _wake(self) -> None:
        # Every answer's end comes here: with nobody waiting (the common case) there is
        # nobody to wake, and no new Event to make.
        if self._waiting:
            self._changed.set()
            self._changed = asyncio.Event()

    async def _changes_before(self, deadline: float) -> bool:
        """Wait for a use to end, a switch to end or the states to change; False if the
        deadline came first."""
        self._waiting += 1
        try:
            await asyncio.wait_for(self._changed.wait(), deadline - self._clock.monotonic())
        except TimeoutError:
            return False
        finally:
            self._waiting -= 1
        return True

    # ---- what is loaded ---------------------------------------------------------------------

    async def _read(self, model: str | None) -> ModelStates | None:
        """The states as last read, read again when older than REFRESH_INTERVAL or when
        ``model`` is downloaded but not loaded in them (LM Studio may have loaded it since)."""
        states = self._states
        stale = self._read_at is None or (
            self._clock.monotonic() - self._read_at >= REFRESH_INTERVAL
        )
        # Only a downloaded model LM Studio may have loaded since: a name it does not have at
        # all must not cost a read per request (nor let a caller make LM Studio answer two).
        missed = (
            model is not None
            and states is not None
            and model in states.downloaded
            and model not in states.loaded
        )
        if not (stale or missed):
            return states
        if self._reading is None:
            self._reading = spawn(self._api.loaded())
            self._reading.add_done_callback(self._read_done)
        try:
            # Shielded: one caller going away must not cancel the read the others share.
            return await asyncio.shield(self._reading)
        except ApiError:
            return None  # LM Studio cannot be asked: the request goes on to say why

    def _read_done(self, task: asyncio.Task[ModelStates | None]) -> None:
        self._reading = None  # the task is the one read under way: a new one starts after it
        if task.cancelled():
            return
        failure = task.exception()
        self._remember(None if failure is not None else task.result())

    def _remember(self, states: ModelStates | None) -> None:
        self._states = states
        self._read_at = self._clock.monotonic()
        self._wake()

    async def _read_now(self) -> ModelStates | None:
        """A read of its own, never one that started earlier (it could predate a load)."""
        states = await self._api.loaded()
        self._remember(states)
        return states

    # ---- loading ----------------------------------------------------------------------------

    def _load_once(self, model: str) -> asyncio.Task[float]:
        task = self._loads.get(model)
        if task is None:
            task = spawn(self._load(model))
            self._loads[model] = task
            task.add_done_callback(partial(self._load_done, model))
        return task

    def _load_done(self, model: str, task: asyncio.Task[float]) -> None:
        del self._loads[model]  # one load per model at a time: this is it
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have gone
        self._wake()

    async def _load(self, model: str) -> float:
        # Asked again first: LM Studio answers a load of a loaded model with a second copy.
        with contextlib.suppress(ApiError):
            states = await self._read_now()
            if states is not None and model in states.loaded:
                return 0.0
        started = self._clock.monotonic()
        try:
            async with asyncio.timeout(self._load_timeout):
                await self._api.load(model, self._load_timeout)
        except (TimeoutError, ApiError) as exc:
            # A failed load may still have evicted what was loaded: the next request must know.
            with contextlib.suppress(ApiError):
                await self._read_now()
            if isinstance(exc, ApiError):
                raise
            raise errors.model_load_timeout(model, self._load_timeout) from None
        seconds = self._clock.monotonic() - started
        try:
            states = await self._read_now()
        except ApiError:
            # LM Studio answered the load, then could not be asked: what is loaded is unknown
            # now, so the request goes on and the forwarder says why LM Studio cannot answer
            # (this read's error names the server's address, which is no caller's business).
            self._remember(None)
            return seconds
        if states is not None and model not in states.loaded:
            raise errors.model_load_failed(
                model, "it answered that it loaded the model, but does not list it as loaded"
            )
        return seconds


def _cannot_warm_up(model: str, states: ModelStates | None) -> ApiError:
    if states is None:
        return errors.model_load_failed(
            model, "this server has no model API to load it with (LM Studio's is needed)"
        )
    return errors.model_not_found(model)
