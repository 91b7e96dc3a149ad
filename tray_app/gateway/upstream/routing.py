"""Sending one request to one of several upstreams: the pick, the retry, the stickiness.

A request goes where :meth:`UpstreamPool.choose` says. A connection that fails before any
byte was sent (refused, unreachable, timed out while connecting) cannot have started a
generation, so it is tried once more on another upstream with the model, and the one that
failed is taken out until its probe finds it back. Nothing else is retried: once the request
went out, the server may be generating, and a second try would run it twice.

A caller's conversation with a model stays on the upstream that last answered it while that
upstream qualifies (its prompt cache holds the conversation): remembered per (principal,
model), for the most recent :data:`STICKY_MAX` pairs.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tray_app.gateway import api_errors as errors
from tray_app.gateway.upstream.client import NOT_SENT
from tray_app.gateway.upstream.failures import describe_failure
from tray_app.gateway.upstream.health import HealthChecker
from tray_app.gateway.upstream.pool import Upstream, UpstreamPool

T = TypeVar("T")
log = logging.getLogger("lmgate.upstreams")
STICKY_MAX = 10_000


class Router:
    def __init__(self, pool: UpstreamPool, *, health: HealthChecker | None = None) -> None:
        self.pool = pool
        self._health = health
        self._sticky: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.retries = 0  # requests sent a second time, elsewhere (for metrics and tests)

    async def send(
        self,
        principal: str,
        model: str | None,
        send: Callable[[Upstream], Awaitable[T]],
    ) -> tuple[Upstream, T]:
        """``send`` to the chosen upstream (again to another one if it could not connect);
        returns the upstream that took it, counted busy until :meth:`done`. Raises the
        connect failure when no other upstream could take it, or ApiError 503 when none can
        take it at all."""
        pool = self.pool
        # One upstream: nothing to remember.
        key = (principal, model) if model is not None and pool.several else None
        sticky = self._sticky.get(key) if key is not None else None
        upstream = pool.choose(model, sticky=sticky)
        if upstream is None:
            if not pool.any_enabled:
                # Not "no such model": the owner switched every server off, and it is they
                # who can change that.
                raise errors.no_upstream_enabled()
            if model is not None and not pool.may_have(model):
                raise errors.model_not_found(model)
            raise errors.no_upstream(model)
        pool.started(upstream)
        try:
            answer = await send(upstream)
        except NOT_SENT as exc:
            pool.ended(upstream)
            retry = pool.choose(model, avoid=upstream.name)
            self._suspect(upstream, exc)
            if retry is None:
                raise
            self.retries += 1
            log.info(
                "upstream %s could not be reached; the request went to %s",
                upstream.name,
                retry.name,
            )
            upstream = retry
            pool.started(upstream)
            try:
                answer = await send(upstream)
            except NOT_SENT as again:
                pool.ended(upstream)
                self._suspect(upstream, again)
                raise
            except BaseException:
                pool.ended(upstream)
                raise
        except BaseException:
            pool.ended(upstream)
            raise
        if key is not None:
            # Every answer refreshes the pair, not just a move: a conversation in use must
            # not age out of the map as if idle.
            self._remember(key, upstream.name)
        return upstream, answer

    def done(self, upstream: Upstream) -> None:
        """The request sent to ``upstream`` ended (answered, failed or hung up)."""
        self.pool.ended(upstream)

    def _suspect(self, upstream: Upstream, exc: BaseException) -> None:
        if not self.pool.several:
            return  # one upstream is always asked: "down" would tell nobody anything
        reason = describe_failure(exc)
        if self._health is not None:
            self._health.suspect(upstream, reason)
        else:
            self.pool.suspect(upstream.name, reason)

    def _remember(self, key: tuple[str, str], name: str) -> None:
        sticky = self._sticky
        sticky[key] = name
        sticky.move_to_end(key)
        if len(sticky) > STICKY_MAX:
            sticky.popitem(last=False)
