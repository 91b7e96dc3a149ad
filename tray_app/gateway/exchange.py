"""One request as the gateway sees it while it runs: what the access log, metrics, accounting
and the revocation watchdog need to know about it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.sharing import Generation
from tray_app.gateway.upstream.forwarding import Outcome
from tray_app.identity.principal import Principal


@dataclass(slots=True, eq=False)  # identity hash: exchanges live in a set
class Exchange:
    """Filled in as the request proceeds."""

    request_id: str
    method: str
    started: float
    client: str | None
    path: str = "-"
    route: str = "other"  # bounded label for metrics
    principal: str | None = None  # the principal's name, for the log and accounting
    caller: Principal | None = field(default=None, repr=False)  # whose credential runs it
    model: str | None = None
    status: int = 0
    bytes_in: int = 0
    stream: bool = False
    cors: dict[str, str] | None = None
    outcome: Outcome = field(default_factory=Outcome, repr=False)
    task: asyncio.Task[object] | None = field(default=None, repr=False)
    # Set when LM Gate itself cancelled the request (shutdown, a revoked credential): the
    # client is still there and gets this error instead of the answer.
    aborted_with: ApiError | None = field(default=None, repr=False)
    error: str | None = None
    # A generation's budget reservation, settled when the request is counted (_finish).
    generation: Generation | None = field(default=None, repr=False)
    # Its line in the usage journal, closed when it is counted (None: no journal kept).
    begun: int | None = None
