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
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial

import aiohttp

from tray_app.clock import Clock
from tray_app.config.upstreams import token_secret_name
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.upstream.model_api import LMStudioModelApi, ModelStates
from tray_app.gateway.upstream.pool import Upstream, UpstreamPool, UpstreamSpec, UpstreamView
from tray_app.gateway.upstream.probe import probe_lmstudio
from tray_app.tasks import spawn

log = logging.getLogger("lmgate.upstreams")


def _said_down(name: str, reason: str) -> None:
    log.warning(
        "upstream %s is down (%s): it gets no requests until it answers again", name, reason
    )


# The longest one probe (its model list and its loaded models) may take.
PROBE_DEADLINE = 10.0


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one probe found: ``failure`` (in words) when the upstream did not answer usably;
    else its models, and which are loaded (None when the server cannot say)."""

    models: tuple[str, ...] | None = None
    loaded: frozenset[str] | None = None
    failure: str | None = None


Probe = Callable[[Upstream], Awaitable[ProbeResult]]


class HealthChecker:
    def __init__(
        self,
        pool: UpstreamPool,
        probe: Probe,
        clock: Clock,
        *,
        probe_deadline: float = PROBE_DEADLINE,
    ) -> None:
        self._pool = pool
        self._probe_deadline = probe_deadline
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
        if self._pool.suspect(upstream.name, reason):
            _said_down(upstream.name, reason)
        self._wake.set()

    async def run(self) -> None:
        """Check until cancelled (a ``cleanup_ctx`` task). Each upstream's probe runs on its
        own: a machine that takes the whole probe deadline to answer delays no other's probe
        (a failed one's retry after a second, a returning one's rejoin)."""
        probing: dict[str, asyncio.Task[None]] = {}

        def ended(name: str, _: asyncio.Task[None]) -> None:
            probing.pop(name, None)
            self._wake.set()

        try:
            while True:
                for upstream in self._pool.due():
                    if upstream.name not in probing:
                        task = spawn(self._check(upstream), name=f"probe-{upstream.name}")
                        probing[upstream.name] = task
                        task.add_done_callback(partial(ended, upstream.name))
                self.rounds += 1
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._pool.next_due_in(skip=probing)):
                        await self._wake.wait()
        finally:
            for task in probing.values():
                task.cancel()

    async def _check(self, upstream: Upstream) -> None:
        try:
            # One server that accepts and then dribbles must not hold up every other's probe.
            async with asyncio.timeout(self._probe_deadline):
                result = await self._probe(upstream)
        except TimeoutError:
            result = ProbeResult(failure=f"it did not answer within {self._probe_deadline:g} s")
        except Exception as exc:  # a probe must never end the checker
            result = ProbeResult(failure=f"the probe failed: {type(exc).__name__}")
        was_up = upstream.up
        if result.failure is not None:
            self._pool.failed(upstream.name, result.failure)
            if was_up is not False:
                _said_down(upstream.name, result.failure)
        else:
            self._pool.answered(upstream.name, models=result.models, loaded=result.loaded)
            if was_up is False:
                log.info("upstream %s answers again: it gets requests from now on", upstream.name)


def lmstudio_probe(session: aiohttp.ClientSession, token_of: Callable[[str], str | None]) -> Probe:
    """The real probe: ``/v1/models`` (any OpenAI-compatible server), then LM Studio's own
    list of loaded models where the server has it, each with ``token_of(name)``: the token
    the gateway sends that upstream."""

    async def probe(upstream: Upstream) -> ProbeResult:
        name, url = upstream.name, upstream.spec.url
        found = await probe_lmstudio(url, token_of(name), session=session)
        if not found.ready:
            if found.status is None:
                return ProbeResult(failure=found.reason or "it did not answer")
            if found.needs_token and token_of(name) is None:
                return ProbeResult(
                    failure=f"it wants an API token ({found.status}) and none is stored: "
                    f"`lmgate secret set {token_secret_name(name)}`"
                )
            if found.needs_token:
                return ProbeResult(failure=f"it refused LM Gate's token ({found.status})")
            return ProbeResult(failure=f"it answered {found.status}")
        if found.models is None:
            # Up but unreadable would count as "offers every model": it would draw requests
            # for models it may not have (typos, the owner's own machine's when that is down).
            return ProbeResult(failure="its model list is not one LM Gate can read")
        states: ModelStates | None
        try:
            states = await LMStudioModelApi(url, lambda: token_of(name), session).loaded()
        except ApiError:
            states = None  # it serves; only what is loaded is unknown
        return ProbeResult(models=found.models, loaded=None if states is None else states.loaded)

    return probe


async def probe_once(
    specs: Iterable[UpstreamSpec], token_of: Callable[[str], str | None], clock: Clock
) -> tuple[UpstreamView, ...]:
    """Probe ``specs`` once, all at once, on a session of its own (`lmgate upstream test`,
    which runs no gateway): what the background checker would find."""
    pool = UpstreamPool(specs, clock)
    async with aiohttp.ClientSession(trust_env=False, auto_decompress=False) as session:
        await HealthChecker(pool, lmstudio_probe(session, token_of), clock).check_all()
    return pool.views()
