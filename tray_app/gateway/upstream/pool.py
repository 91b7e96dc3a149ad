"""Several model servers behind one gateway: which one a request goes to, and which are up.

The pool is pure bookkeeping, with no I/O: the health checker (``upstream.health``) tells it
what each server answered, the forwarder asks it where to send a request and tells it when
the request ends. Keeping the choice here, in one synchronous place, makes it cheap on the
hot path (no await, a handful of comparisons per upstream) and testable without sockets.

The choice, in order (see :meth:`UpstreamPool.choose`):

1. Only upstreams that are enabled, not marked down, and offer the model (an upstream whose
   model list is not known yet is asked too, but only when none known to have the model
   qualifies: refusing would turn a slow first probe into an outage).
2. The upstream that served the conversation before, while it qualifies: its prompt cache
   holds the conversation, so the next turn starts at once.
3. One that has the model in memory already (a load takes seconds to minutes; when the
   server cannot say, nothing is preferred for it).
4. The least busy (requests in flight), then the higher weight, then the order configured.

A failed upstream is taken out at once and probed again after a backoff that doubles with
each failure in a row, up to :data:`BACKOFF_MAX`; one good answer puts it back.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass

from tray_app.clock import Clock
from tray_app.config.settings import Config

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
# How often an upstream that answers is asked again: its model list and loaded models change
# when someone loads or downloads a model on that machine.
HEALTHY_PROBE_INTERVAL = 10.0


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """One configured model server. Its API token, if any, lives in the secret store under
    ``config.upstreams.token_secret_name(name)``, never in the configuration."""

    name: str
    url: str
    weight: int = 1
    enabled: bool = True


def specs_of(config: Config) -> tuple[UpstreamSpec, ...]:
    """The configured upstreams (``local`` first), as the pool takes them."""
    return tuple(
        UpstreamSpec(entry.name, entry.url, entry.weight, entry.enabled)
        for entry in config.all_upstreams
    )


class Upstream:
    """One upstream's live state. ``up`` is None until its first probe ended."""

    __slots__ = (
        "down_reason",
        "failures",
        "in_flight",
        "index",
        "loaded",
        "models",
        "next_probe",
        "requests",
        "spec",
        "up",
    )

    def __init__(self, spec: UpstreamSpec, index: int) -> None:
        self.spec = spec
        self.index = index
        self.up: bool | None = None
        self.down_reason: str | None = None
        self.failures = 0  # in a row
        self.next_probe = 0.0  # monotonic
        self.models: frozenset[str] | None = None  # None: not known (yet)
        self.loaded: frozenset[str] | None = None  # None: the server cannot say
        self.in_flight = 0
        self.requests = 0  # sent to it, ever (for metrics)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def usable(self) -> bool:
        return self.spec.enabled and self.up is not False

    def offers(self, model: str | None) -> bool:
        return model is None or self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class UpstreamView:
    """A frozen copy of one upstream's state for /readyz, the tray, metrics and `doctor`."""

    name: str
    url: str
    enabled: bool
    up: bool | None
    down_reason: str | None
    models: tuple[str, ...]
    loaded: tuple[str, ...]
    in_flight: int
    requests: int = 0

    @property
    def state(self) -> str:
        if not self.enabled:
            return "disabled"
        return {None: "starting", True: "up", False: "down"}[self.up]


class UpstreamPool:
    def __init__(self, specs: Iterable[UpstreamSpec], clock: Clock) -> None:
        self._clock = clock
        self._upstreams: dict[str, Upstream] = {}
        for spec in specs:
            if spec.name in self._upstreams:
                raise ValueError(f"two upstreams are named {spec.name!r}")
            self._upstreams[spec.name] = Upstream(spec, len(self._upstreams))
        if not self._upstreams:
            raise ValueError("LM Gate needs at least one upstream")
        self._only = next(iter(self._upstreams.values())) if len(self._upstreams) == 1 else None
        self.any_enabled = any(u.spec.enabled for u in self._upstreams.values())

    def __iter__(self) -> Iterator[Upstream]:
        return iter(self._upstreams.values())

    def __len__(self) -> int:
        return len(self._upstreams)

    @property
    def several(self) -> bool:
        """More than one upstream: a choice to make, states worth probing and showing."""
        return self._only is None

    def get(self, name: str) -> Upstream | None:
        return self._upstreams.get(name)

    # ---- the choice (hot path) ------------------------------------------------------------

    def choose(
        self, model: str | None, *, sticky: str | None = None, avoid: str | None = None
    ) -> Upstream | None:
        """Where a request for ``model`` goes, or None when no upstream can take it.
        ``sticky``: the upstream that served the conversation before; ``avoid``: one that
        just failed this request (a retry goes elsewhere or nowhere)."""
        only = self._only
        if only is not None:
            # One upstream: no choice to make, and none to pay for. It is asked even when its
            # probe failed or its list lacks the model: it may be back already, and its own
            # answer (unreachable, model not found) says more than a refusal from here.
            return only if only.spec.enabled and avoid is None else None
        if sticky is not None and sticky != avoid:
            kept = self._upstreams.get(sticky)
            if kept is not None and kept.usable and kept.offers(model):
                return kept
        best: Upstream | None = None
        best_key: tuple[bool, bool, int, int, int] | None = None
        for upstream in self._upstreams.values():
            if upstream.name == avoid or not upstream.usable or not upstream.offers(model):
                continue
            loaded = upstream.loaded
            key = (
                # Not probed yet: asked only when no upstream is known to have the model.
                upstream.models is None,
                not (model is not None and loaded is not None and model in loaded),
                upstream.in_flight,
                -upstream.spec.weight,
                upstream.index,
            )
            if best_key is None or key < best_key:
                best, best_key = upstream, key
        return best

    def may_have(self, model: str) -> bool:
        """Whether some enabled upstream, up or down, lists ``model`` (or has not said what it
        lists): a model none has is not there, however long the caller waits."""
        return any(u.spec.enabled and u.offers(model) for u in self._upstreams.values())

    def models(self) -> frozenset[str]:
        """Every model some usable upstream offers (what ``/v1/models`` lists)."""
        found: set[str] = set()
        for upstream in self._upstreams.values():
            if upstream.usable and upstream.models is not None:
                found |= upstream.models
        return frozenset(found)

    # ---- what happened --------------------------------------------------------------------

    def started(self, upstream: Upstream) -> None:
        upstream.in_flight += 1
        upstream.requests += 1

    def ended(self, upstream: Upstream) -> None:
        upstream.in_flight -= 1

    def answered(
        self,
        name: str,
        *,
        models: Iterable[str] | None,
        loaded: Iterable[str] | None = None,
    ) -> None:
        """A probe (or a request) found ``name`` answering."""
        upstream = self._upstreams.get(name)
        if upstream is None:
            return
        upstream.up = True
        upstream.down_reason = None
        upstream.failures = 0
        if models is not None:
            upstream.models = frozenset(models)
        if loaded is not None:
            upstream.loaded = frozenset(loaded)
        upstream.next_probe = self._clock.monotonic() + HEALTHY_PROBE_INTERVAL

    def failed(self, name: str, reason: str) -> None:
        """``name`` could not be reached (a probe, or a request before its first byte): out
        until a probe after the backoff finds it answering."""
        upstream = self._upstreams.get(name)
        if upstream is None:
            return
        upstream.up = False
        upstream.down_reason = reason
        upstream.failures += 1
        backoff = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (upstream.failures - 1))
        upstream.next_probe = self._clock.monotonic() + backoff

    def suspect(self, name: str, reason: str) -> bool:
        """A request could not connect to ``name``: out now, unless it is out already; whether
        this took it out. Only probes grow the backoff: a burst of requests refused by one
        server that went away must not push its return out to the longest backoff."""
        upstream = self._upstreams.get(name)
        if upstream is None or upstream.up is False:
            return False
        self.failed(name, reason)
        return True

    def due(self) -> list[Upstream]:
        """The enabled upstreams whose next probe is due."""
        now = self._clock.monotonic()
        return [u for u in self._upstreams.values() if u.spec.enabled and u.next_probe <= now]

    def next_due_in(self, skip: Container[str] = ()) -> float:
        """Seconds until the next probe is due (0 when one is due now), leaving out the
        upstreams named in ``skip`` (those being probed already)."""
        now = self._clock.monotonic()
        waits = [
            u.next_probe - now
            for u in self._upstreams.values()
            if u.spec.enabled and u.name not in skip
        ]
        return max(0.0, min(waits, default=HEALTHY_PROBE_INTERVAL))

    def views(self) -> tuple[UpstreamView, ...]:
        return tuple(
            UpstreamView(
                name=u.name,
                url=u.spec.url,
                enabled=u.spec.enabled,
                up=u.up,
                down_reason=u.down_reason,
                models=tuple(sorted(u.models or ())),
                loaded=tuple(sorted(u.loaded or ())),
                in_flight=u.in_flight,
                requests=u.requests,
            )
            for u in self._upstreams.values()
        )
