"""Prometheus metrics for the gateway (served at /metrics to principals with the metrics scope).

Each gateway has its own registry, so several can run in one process (tests, the tray's
restarts) without clashing. Labelled children are cached: a label lookup per request would
be the most expensive thing prometheus-client does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from tray_app.gateway.upstream.pool import UpstreamView

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds; from a fast cached answer to a long generation.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "lmgate_requests",
            "Requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "lmgate_request_duration_seconds",
            "Time from request to the end of the answer, by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.active_streams = Gauge(
            "lmgate_active_streams", "Streamed answers in progress", registry=self.registry
        )
        self._tokens = Counter(
            "lmgate_tokens", "Tokens processed by LM Studio", ["kind"], registry=self.registry
        )
        self._auth_failures = Counter(
            "lmgate_auth_failures",
            "Refused credentials, by reason",
            ["reason"],
            registry=self.registry,
        )
        self._upstream_errors = Counter(
            "lmgate_upstream_errors",
            "Failures talking to LM Studio, by kind",
            ["kind"],
            registry=self.registry,
        )
        self._rate_limited = Counter(
            "lmgate_rate_limited", "Requests refused by a limit", ["limit"], registry=self.registry
        )
        self._children: dict[tuple[str, ...], object] = {}
        self._prompt = self._tokens.labels("prompt")
        self._completion = self._tokens.labels("completion")

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        key = ("r", route, str(status))
        counter = self._children.get(key)
        if counter is None:
            counter = self._children[key] = self._requests.labels(route, str(status))
        counter.inc()  # type: ignore[attr-defined]
        hkey = ("h", route)
        histogram = self._children.get(hkey)
        if histogram is None:
            histogram = self._children[hkey] = self._latency.labels(route)
        histogram.observe(seconds)  # type: ignore[attr-defined]

    def observe_tokens(self, prompt: int, completion: int) -> None:
        self._prompt.inc(prompt)
        self._completion.inc(completion)

    def auth_failure(self, reason: str) -> None:
        self._auth_failures.labels(reason).inc()

    def upstream_error(self, kind: str) -> None:
        self._upstream_errors.labels(kind).inc()

    def rate_limited(self, limit: str) -> None:
        self._rate_limited.labels(limit).inc()

    def watch_sharing(
        self,
        *,
        waiting: Callable[[], int],
        busy: Callable[[], int],
        budgeted: Callable[[], int],
        reserved: Callable[[], int],
    ) -> None:
        """Gauges read when scraped (nothing on the request path): the fair queue and the
        budgets, without a label per caller (callers are unbounded, a scrape must not be)."""
        for name, text, read in (
            ("lmgate_queue_waiting", "Requests waiting for a generation slot", waiting),
            ("lmgate_generations_in_flight", "Generation slots in use", busy),
            (
                "lmgate_budget_callers",
                "Callers with a token budget seen this period",
                budgeted,
            ),
            (
                "lmgate_budget_reserved_tokens",
                "Tokens reserved by budgeted requests still running",
                reserved,
            ),
        ):
            Gauge(name, text, registry=self.registry).set_function(read)

    def watch_upstreams(
        self, views: Callable[[], tuple[UpstreamView, ...]], retries: Callable[[], int]
    ) -> None:
        """Each upstream's state, read when scraped. Labelled by upstream name: the names
        are the owner's configuration, never a caller's input, so the label set is bounded."""
        self.registry.register(_UpstreamCollector(views, retries))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _UpstreamCollector(Collector):
    def __init__(
        self, views: Callable[[], tuple[UpstreamView, ...]], retries: Callable[[], int]
    ) -> None:
        self._views = views
        self._retries = retries

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no fixed description: the label values come from the pool

    def collect(self) -> Iterator[Metric]:
        views = self._views()
        up = GaugeMetricFamily(
            "lmgate_upstream_up",
            "1 while the upstream answers its probe, 0 when down, disabled or not probed yet",
            labels=["upstream"],
        )
        busy = GaugeMetricFamily(
            "lmgate_upstream_in_flight", "Requests the upstream is serving", labels=["upstream"]
        )
        models = GaugeMetricFamily(
            "lmgate_upstream_models", "Models the upstream offers", labels=["upstream"]
        )
        served = CounterMetricFamily(
            "lmgate_upstream_requests", "Requests sent to the upstream", labels=["upstream"]
        )
        for view in views:
            up.add_metric([view.name], 1.0 if view.state == "up" else 0.0)
            busy.add_metric([view.name], view.in_flight)
            models.add_metric([view.name], len(view.models))
            served.add_metric([view.name], view.requests)
        retried = CounterMetricFamily(
            "lmgate_upstream_retries",
            "Requests sent to a second upstream after the first could not be reached",
        )
        retried.add_metric([], self._retries())
        yield from (up, busy, models, served, retried)
