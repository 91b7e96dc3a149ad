"""Calls into the stored state (the database) that may block, made without blocking the loop.

A team's PostgreSQL that stops answering without closing its connections (a frozen process, a
paused VM) is the case no socket option ends: its kernel still acknowledges every packet, so
neither TCP keepalives nor ``tcp_user_timeout`` fire, and the server is not there to enforce
``statement_timeout``. Called on the event loop, such a call would hold every request, stream
and health check of the replica for as long as it waits. So with a remote database each call
runs on one of a few worker threads, and the loop waits for it at most ``timeout``; then the
caller gets StorageError, which the gateway answers 503 ``state_unavailable``. While any call
is overdue no new one is started (it would only queue behind it): each is refused at once
until the database answers again.

A call that was given up on still finishes on its thread when the database answers; only its
result is dropped. The local SQLite file answers in microseconds and is called inline: a
thread hop per request would cost more than the call itself.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from tray_app.errors import StorageError

log = logging.getLogger("lmgate.gateway")

P = ParamSpec("P")
T = TypeVar("T")

# A healthy database answers in milliseconds; this is how long a request waits for one that
# does not before it is told to come back.
STATE_CALL_SECONDS = 2.0
STATE_WORKERS = 4


class StateCalls:
    def __init__(
        self,
        *,
        offload: bool,
        workers: int = STATE_WORKERS,
        timeout: float = STATE_CALL_SECONDS,
    ) -> None:
        self.offload = offload
        self._workers = workers
        self._timeout = timeout
        self._executor: ThreadPoolExecutor | None = None
        self._overdue = 0  # calls past their timeout that have not finished yet

    @property
    def overdue(self) -> int:
        return self._overdue

    async def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        if not self.offload:
            return fn(*args, **kwargs)
        if self._overdue:
            raise StorageError("the database is not answering")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="lmgate-state")
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(fn, *args, **kwargs)
        )
        deadline = asyncio.timeout(self._timeout)
        try:
            async with deadline:
                # Shielded: a timeout or a caller hanging up gives up the wait, not the call.
                return await asyncio.shield(future)
        except TimeoutError:
            if not deadline.expired():
                raise  # the call's own
            if not self._overdue:
                log.warning("the database did not answer within %g s", self._timeout)
            self._overdue += 1
            future.add_done_callback(self._finished_late)
            raise StorageError(f"the database did not answer within {self._timeout:g} s") from None

    def _finished_late(self, _future: object) -> None:
        self._overdue -= 1
        if not self._overdue:
            log.warning("the database answers again")

    def close(self) -> None:
        """Stop the workers; a call still waiting on the database is left to finish alone."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
