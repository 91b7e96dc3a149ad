"""The upstreams as the tray shows them: frozen rows for Settings' list, frozen states for the
menu, and the words of a Settings *Test*.

Everything here crosses to the UI thread, so it is frozen data, built on the loop thread from
the config and the gateway's own views (never the pool itself, which the loop keeps changing).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tray_app.config.upstreams import LOCAL, WEIGHT_MAX, UpstreamEntry, token_secret_name
from tray_app.gateway.upstream.pool import UpstreamView
from tray_app.gateway.upstream.probe import PROBE_TIMEOUT, probe_lmstudio
from tray_app.logs import printable_list
from tray_app.secret_store.base import SecretStore, read_or_none

# The UI reaches the config only through control: the names it needs, passed on.
__all__ = [
    "LOCAL",
    "WEIGHT_MAX",
    "UpstreamRow",
    "UpstreamStatus",
    "UpstreamsChanged",
    "ask_upstream",
    "rows_of",
    "statuses_of",
]


@dataclass(frozen=True, slots=True)
class UpstreamRow:
    """One configured upstream in Settings' list. The token itself never leaves the store."""

    name: str
    url: str
    weight: int
    enabled: bool
    token_set: bool


@dataclass(frozen=True, slots=True)
class UpstreamsChanged:
    """What an Add or a Remove left: the list as it is now, and what to tell the owner."""

    rows: tuple[UpstreamRow, ...]
    message: str


@dataclass(frozen=True, slots=True)
class UpstreamStatus:
    """One upstream's live state, as the running gateway's health checker last saw it."""

    name: str
    url: str
    state: str  # "up", "down", "starting" or "disabled" (UpstreamView.state)
    reason: str | None  # why it is down
    models: int

    @property
    def words(self) -> str:
        """The state as one line reads it: "up, 3 models", "down: it refused LM Gate's token"."""
        if self.state == "up":
            return f"up, {self.models} model{'' if self.models == 1 else 's'}"
        if self.state == "down":
            return f"down: {self.reason}" if self.reason else "down"
        return self.state


def rows_of(entries: Iterable[UpstreamEntry], store: SecretStore) -> tuple[UpstreamRow, ...]:
    return tuple(
        UpstreamRow(
            entry.name,
            entry.url,
            entry.weight,
            entry.enabled,
            bool(read_or_none(store, token_secret_name(entry.name))),
        )
        for entry in entries
    )


def statuses_of(views: Iterable[UpstreamView]) -> tuple[UpstreamStatus, ...]:
    # The in-flight count is left out: it changes with every request, and a snapshot that
    # changed every time it was taken would repaint the tray for nothing.
    return tuple(
        UpstreamStatus(view.name, view.url, view.state, view.down_reason, len(view.models))
        for view in views
    )


async def ask_upstream(name: str, url: str, token: str | None) -> tuple[bool, str]:
    """Ask ``url`` now, as /readyz and `doctor` ask: (answered usably, what it said, in words)."""
    probe = await probe_lmstudio(url, token, within=PROBE_TIMEOUT)
    if not probe.answered:
        return False, f"{name} is not reachable at {url} ({probe.reason or probe.failure})."
    if probe.needs_token:
        stored = "refused the stored token" if token else "requires an API token, none is stored"
        return False, f"{name} at {url} {stored} ({probe.status})."
    if not probe.ready:
        return False, f"{name} at {url} answered {probe.status}."
    if probe.models is None:
        return False, f"{name} at {url} answered, but with no list of models."
    models = printable_list(probe.models) or "none"
    return True, f"{name} answers at {url}. Models: {models}"
