"""How many client connections fit in this process's file-descriptor limit.

An open client connection is one descriptor, and while its request is forwarded it holds a
second one to LM Studio. The rest of the process needs some too (the database and its journal,
the log, the listening sockets, the tunnel agent's pipes), and a burst of connections is accepted
before any of them can be refused. What is left after those, halved, is how many client
connections may be open at once: a flood meets a 503 well before the process meets EMFILE, and
the connections already admitted can still reach LM Studio.

At start the soft limit is raised toward the hard one, to at most ``RAISED_SOFT_LIMIT``: macOS
starts processes at 256 descriptors and Linux at 1024, far below what the hard limits allow, and
a gateway that can hold more connections is harder to starve. It is never lowered. The cap keeps
the number of connections (and their memory) at a size one LM Studio can use, and keeps clear of
the far end of the descriptor table where old select()-based code breaks.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

RAISED_SOFT_LIMIT = 8192
# The database, its -wal and -shm files, the log, listening sockets, the event loop's own
# descriptors, the tunnel agent's pipes and the odd file the tray opens.
BASE_RESERVE = 48
# Without a descriptor limit to read (Windows), budget as for Linux's usual soft limit.
FALLBACK_LIMIT = 1024


@dataclass(frozen=True, slots=True)
class Budget:
    descriptors: int  # the soft limit this budget was made for
    max_connections: int  # client connections open at once, at most
    accept_backlog: int  # the listen queue; asyncio also accepts this many per wake-up
    max_lingering: int  # refused connections kept open briefly, so the 503 is read


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def budget_for(descriptors: int) -> Budget:
    backlog = _clamp(descriptors // 8, 16, 128)
    lingering = _clamp(descriptors // 32, 4, 64)
    # Two accept bursts can be in flight before the first is refused and closed.
    spare = descriptors - BASE_RESERVE - 2 * backlog - lingering
    return Budget(
        descriptors=descriptors,
        max_connections=max(8, spare // 2),
        accept_backlog=backlog,
        max_lingering=lingering,
    )


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE toward the hard one; return the soft limit now in force."""
    if sys.platform == "win32":
        return FALLBACK_LIMIT
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = RAISED_SOFT_LIMIT if hard == resource.RLIM_INFINITY else min(hard, RAISED_SOFT_LIMIT)
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        # A per-process maximum below the hard limit (macOS's kern.maxfilesperproc) can
        # refuse it: then the limit we have stays.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return RAISED_SOFT_LIMIT
    return int(soft)
