"""Asking every upstream, in the background, whether it answers and what it offers.

Each probe is the same question `/readyz` and `doctor` ask (``probe.probe_lmstudio``), plus,
where the server is LM Studio, which models are in memory (its native API, read with the
gateway's own token for that upstream). The results go to the pool, which takes a failing
upstream out with a backoff and puts it back on its first good answer. A request that could
not connect wakes the checker, so the upstream is confirmed down (or back) without waiting
for its turn.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from tray_app.clock import Clock
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.upstream.model_api import LMStudioModelApi, ModelStates
from tray_app.gateway.upstream.pool import Upstream, UpstreamPool
from tray_app.gateway.upstream.probe import probe_lmstudio


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one probe found: ``failure`` (in words) when the upstream did not answer usably;
    else its models, and which are loaded (None when the server cannot say)."""

    models: tuple[str, ...] | None = None
    loaded: frozenset[str] | None = None
    failure: str | None = None


Probe = Callable[[Upstream], Awaitable[ProbeResult]]


class HealthChecker:
    def __init__(self, pool: UpstreamPool, probe: Probe, clock: Clock) -> None:
        self._pool = pool
        self._probe = probe
        self._clock = clock
        self._wake = asyncio.Event()
        self.rounds = 0  # completed check rounds, for tests and `doctor`

    async def check_due(self) -> None:
        """Probe every upstream that is due, all at once (one slow server delays no other)."""
        due = self._pool.due()
        if due:
            await asyncio.gather(*(self._check(upstream) for upstream in due))
        self.rounds += 1

    async def check_all(self) -> None:
        """Probe every enabled upstream now (the start, `doctor`, the tray's Test)."""
        await asyncio.gather(*(self._check(u) for u in self._pool if u.spec.enabled))

    def suspect(self, upstream: Upstream, reason: str) -> None:
        """A request could not connect to ``upstream``: take it out now and let the next
        probe (after the backoff) decide when it is back."""
        self._pool.failed(upstream.name, reason)
        self._wake.set()

    async def run(self) -> None:
        """Check until cancelled (a ``cleanup_ctx`` task)."""
        while True:
            await self.check_due()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._pool.next_due_in()):
                    await self._wake.wait()

    async def _check(self, upstream: Upstream) -> None:
        try:
            result = await self._probe(upstream)
        except Exception as exc:  # a probe must never end the checker
            result = ProbeResult(failure=f"the probe failed: {type(exc).__name__}")
        if result.failure is not None:
            self._pool.failed(upstream.name, result.failure)
        else:
            self._pool.answered(upstream.name, models=result.models, loaded=result.loaded)


def lmstudio_probe(session: aiohttp.ClientSession, token_of: Callable[[str], str | None]) -> Probe:
    """The real probe: ``/v1/models`` (any OpenAI-compatible server), then LM Studio's own
    list of loaded models where the server has it. ``token_of`` reads an upstream's token
    from the secret store at each probe, so a token changed meanwhile is used."""

    async def probe(upstream: Upstream) -> ProbeResult:
        name, url = upstream.name, upstream.spec.url
        found = await probe_lmstudio(url, token_of(name), session=session)
        if not found.ready:
            if found.status is None:
                return ProbeResult(failure=found.reason or "it did not answer")
            if found.needs_token:
                return ProbeResult(failure=f"it refused LM Gate's token ({found.status})")
            return ProbeResult(failure=f"it answered {found.status}")
        states: ModelStates | None
        try:
            states = await LMStudioModelApi(url, lambda: token_of(name), session).loaded()
        except ApiError:
            states = None  # it serves; only what is loaded is unknown
        return ProbeResult(models=found.models, loaded=None if states is None else states.loaded)

    return probe
