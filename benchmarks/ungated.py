"""``lmgate`` with the sharing gate taken out, for ``bench_gateway.py --ungated`` only.

Every request still goes through the whole gateway (authentication, limits, body rules,
forwarding, usage recording, metrics, the access log), but ``Sharing.admit`` hands back a
generation that reserves no budget, waits for no model or slot and settles nothing. Run side by
side with the real gateway in one process each, the difference is what the budget, the fair
queue and the model guard cost a request end to end. The caller's own concurrency lease goes
with it (it lives in the same step), so the figure is, if anything, too high.

    python benchmarks/ungated.py serve --port 0     # as ``lmgate serve``
"""

from __future__ import annotations

import sys
from typing import Any

from tray_app.gateway import sharing
from tray_app.gateway.upstream.usage import Usage
from tray_app.main import main


class Ungated:
    """What the gateway asks of an admitted generation, doing nothing."""

    def __init__(self, max_tokens: int | None) -> None:
        self.max_tokens = max_tokens

    async def wait_turn(self, notify: Any, upstream: str | None = None) -> None:
        return None

    def release(self) -> None:
        return None

    def settle(
        self,
        usage: Usage | None,
        bytes_out: int,
        *,
        reached: bool = False,
        unanswered: bool = False,
    ) -> Usage | None:
        return usage


async def _admit(self: sharing.Sharing, principal: Any, *_: Any) -> Ungated:
    return Ungated(principal.max_tokens)


if __name__ == "__main__":
    sharing.Sharing.admit = _admit  # type: ignore[assignment,method-assign]
    sys.exit(main())
