"""Calls into the stored state (the database) that may block, made without blocking the loop.

A team's PostgreSQL that stops answering without closing its connections (a frozen process, a
paused VM) is the case no socket option ends: its kernel still acknowledges every packet, so
neither TCP keepalives nor ``tcp_user_timeout`` fire, and the server is not there to enforce
``statement_timeout``. Called on the event loop, such a call would hold every request, stream
and health check of the replica for as long as it waits. So with a remote database each call
runs on one of a few worker threads, and the loop waits for it at most ``timeout``; then the
caller gets StorageError, which the gateway answers 503 ``state_unavailable``. While every
worker holds an overdue call no new one is started (it would only queue behind them): each is
refused at once until the database answers again. One slow query holds one worker, not the
replica.

A call that was given up on while it ran still finishes on its thread when the database
answers; only its result is dropped. One still waiting for a worker when it is due never runs
(its caller was told it failed). The local SQLite file answers in microseconds and is called
inline: a thread hop per request would cost more than the call itself.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

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
        self._late: set[Future[Any]] = set()  # those calls

    @property
    def overdue(self) -> int:
        return self._overdue

    async def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        if not self.offload:
            return fn(*args, **kwargs)
        if self._overdue >= self._workers:
            raise StorageError("the database is not answering")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="lmgate-state")
        loop = asyncio.get_running_loop()
        work = self._executor.submit(functools.partial(fn, *args, **kwargs))
        # Overdue by the clock, not by the caller: one that hung up first still left a call
        # hanging on the database, and that one must count.
        timer = loop.call_later(self._timeout, self._overdue_now, work)
        work.add_done_callback(lambda _work: loop.call_soon_threadsafe(self._finished, timer, work))
        deadline = asyncio.timeout(self._timeout)
        try:
            async with deadline:
                # Shielded: a timeout or a caller hanging up gives up the wait, not the call.
                return await asyncio.shield(asyncio.wrap_future(work, loop=loop))
        except TimeoutError:
            if not deadline.expired():
                raise  # the call's own
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not work.cancelled() or (task is not None and task.cancelling()):
                raise
            # Never started, and dropped when it was due (below): as a timeout.
        raise StorageError(f"the database did not answer within {self._timeout:g} s") from None

    def _overdue_now(self, work: Future[Any]) -> None:
        """``work`` is due: dropped if it is still waiting for a worker (it would run after
        its caller was told it failed), else counted until it ends."""
        if work.cancel() or work.done():
            return
        if not self._overdue:
            log.warning("the database did not answer within %g s", self._timeout)
        self._overdue += 1
        self._late.add(work)

    def _finished(self, timer: asyncio.TimerHandle, work: Future[Any]) -> None:
        timer.cancel()
        if work in self._late:
            self._late.discard(work)
            self._overdue -= 1
            if not self._overdue:
                log.warning("the database answers again")

    def close(self) -> None:
        """Stop the workers; a call still waiting on the database is left to finish alone."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
