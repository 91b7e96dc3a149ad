"""How a long-running LM Gate process sets Python's cyclic garbage collector.

Reference counting frees almost everything a request makes the moment it is done; the cyclic
collector is only for cycles, and a full collection walks every object the process tracks. Under
1,000 paced streams (``benchmarks/load.py``) ``lmgate serve`` tracked about 210,000 objects, most
of them made by its imports (modules, classes, functions: never garbage), and each full
collection held the loop 70-120 ms every few seconds: every stream stalled for that long at once
(the largest gap between chunks was 3x the pacing) and so did ``/healthz``.

So once started, the process freezes what exists (``gc.freeze``: the start-up's objects leave
every later collection) and ``serve`` collects the youngest generation less often: each
collection costs about the same, so fewer of them cost less, and what waits longer is only
garbage in cycles (a finished stream leaves about 55 small objects, no buffer: one young
collection per few hundred streams). The tray keeps Python's threshold for the young: its Qt
wrappers caught in a cycle must go, with their windows, as soon as before.
"""

from __future__ import annotations

import gc

# Python's default is 700 allocations: a busy gateway reached it hundreds of times a second.
YOUNGEST_THRESHOLD = 20_000


def settle_after_start(*, rarer_young_collections: bool = True) -> None:
    """Call once everything long-lived exists (imports done, the server started)."""
    gc.collect()  # garbage made while starting is freed, not frozen
    gc.freeze()
    if rarer_young_collections:
        _, middle, oldest = gc.get_threshold()
        gc.set_threshold(YOUNGEST_THRESHOLD, middle, oldest)
