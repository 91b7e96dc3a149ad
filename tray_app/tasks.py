"""Background tasks with a kept reference.

The event loop only keeps weak references to tasks, so a fire-and-forget ``create_task`` can be
garbage-collected before it finishes. Everything that spawns a task goes through here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_running: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
    """Start ``coro`` as a task and keep it alive until it is done."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task


async def wait_for_event(event: asyncio.Event, seconds: float) -> bool:
    """Whether ``event`` was set within ``seconds``. Not ``asyncio.wait_for``: on Python 3.11 it
    swallows a cancellation that arrives as the event is set, and a loop around it then runs
    on after its task was cancelled (a stop that never ends)."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True
