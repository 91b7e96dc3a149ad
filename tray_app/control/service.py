"""The one startup sequence, which `lmgate serve` and the tray both run, so they cannot drift:
secret store → signing key → identity → gateway → server → LM Studio probe → (on request) the
tunnel; torn down in reverse. A start that fails part way closes what it had opened.

The front-ends only present it: `serve` prints around it, the tray's controller publishes
states. Neither opens a store, a database or a port itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from tray_app.config.settings import Config
from tray_app.control.assembly import (
    Identity,
    build_gateway,
    data_dir,
    open_identity,
    open_shared,
    secret_store_for,
    signing_key_loader,
    signing_key_or_ephemeral,
)
from tray_app.control.going_public import go_public, stop_agent_now
from tray_app.control.shared_state import uses_shared_state
from tray_app.errors import LMGateError, SecretStoreError
from tray_app.gateway.app import Gateway
from tray_app.gateway.server.runner import GatewayServer
from tray_app.gateway.upstream.pool import UpstreamView
from tray_app.identity.principal import ALL_SCOPES
from tray_app.secret_store.base import (
    LMSTUDIO_API_TOKEN,
    EnvSecretStore,
    SecretStore,
    read_or_none,
)
from tray_app.storage.audit import AuditSource
from tray_app.tasks import spawn
from tray_app.tunnel.manager import StatusListener, TunnelManager

log = logging.getLogger("lmgate.service")

FIRST_KEY_NAME = "owner"

# A logout stops a session's processes with SIGTERM and, milliseconds later, SIGHUP (systemd's
# SendSIGHUP=yes, which logind's session scopes use): one stop sent twice over, not a person
# asking twice. A person's second Ctrl-C is the same signal again, and no one sends a different
# one within a second by hand; a minute into a slow stop, any signal is meant.
SAME_STOP_SECONDS = 1.0


class StopKind(Enum):
    ORDERLY = "orderly"  # the first: stop in order
    SAME_STOP = "same stop"  # part of the stop already under way: nothing more to do
    AT_ONCE = "at once"  # a second stop request: end now, the agent still stopped


class StopRequests:
    """The one rule, for the tray and `serve` alike, for what a stop signal asks: the first
    starts the orderly stop; a different signal within SAME_STOP_SECONDS of that start is the
    same stop; the same signal again, or any signal later, ends at once. A stop begun without
    a signal (the tray's Quit) counts as a different signal."""

    def __init__(
        self,
        same_stop_seconds: float = SAME_STOP_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window = same_stop_seconds
        self._clock = clock
        self._began: float | None = None
        self._signals: set[int] = set()

    @property
    def stopping(self) -> bool:
        return self._began is not None

    def begin(self) -> bool:
        """The orderly stop begins without a signal; True the first time."""
        if self._began is not None:
            return False
        self._began = self._clock()
        return True

    def signal(self, signum: int) -> StopKind:
        if self._began is None:
            self._began = self._clock()
            self._signals.add(signum)
            return StopKind.ORDERLY
        if signum in self._signals or self._clock() - self._began >= self._window:
            return StopKind.AT_ONCE
        self._signals.add(signum)
        return StopKind.SAME_STOP


@dataclass(frozen=True, slots=True)
class Started:
    url: str
    lmstudio_reachable: bool
    store_problem: str | None  # the configured store is unusable: why, and what to do
    key_warning: str | None  # the signing key lives in memory for this run only
    first_key: str | None  # made by this start (see GatewayService.start); shown only now
    # With several upstreams, each one's state after the start's probe (else empty).
    upstreams: tuple[UpstreamView, ...] = ()


class GatewayService:
    """Owns what one run opens: the secret store, the identity database, the gateway's
    server and the tunnel. ``store`` replaces the configured secret store (tests pass an
    in-memory one)."""

    def __init__(self, config: Config, *, store: SecretStore | None = None) -> None:
        self.config = config
        self._store_override = store
        # Until a start opens the configured store, only LMGATE_SECRET_* variables are read.
        self.secrets: SecretStore = store or EnvSecretStore()
        self._identity: Identity | None = None
        self._server: GatewayServer | None = None
        self._tunnel: TunnelManager | None = None
        # The tunnel being opened: a stop meanwhile must wait for it and close what it opened,
        # or the agent (and its config file with the authtoken) outlives LM Gate.
        self._opening: asyncio.Task[TunnelManager] | None = None
        # LM Studio's token as this run's gateway read it at start: a different one in the
        # store later (`lmgate secret set`) means the gateway must be restarted to use it.
        self.lmstudio_token: str | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def identity(self) -> Identity:
        if self._identity is None:
            raise LMGateError("LM Gate is not running")
        return self._identity

    @property
    def server(self) -> GatewayServer:
        if self._server is None:
            raise LMGateError("LM Gate is not running")
        return self._server

    @property
    def gateway(self) -> Gateway:
        """The running gateway, for what the owner asks of it directly (a warm-up)."""
        return self.server.gateway

    @property
    def tunnel(self) -> TunnelManager | None:
        return self._tunnel

    async def start(self, *, first_key: bool = False) -> Started:
        """Run the sequence up to the LM Studio probe. ``first_key``: the front-end can show
        a key exactly once (a terminal), so when no credential exists yet an all-scope
        'owner' key is made — as the start's last step, once the server listens and LM Studio
        was asked, so a failed or interrupted start leaves no key nobody saw. Raises
        (ConfigError for a taken port) with everything closed again."""
        if self._identity is not None:
            raise LMGateError("LM Gate is already running")
        store, store_problem = self._open_store()
        shared = None
        if uses_shared_state(self.config):
            # A replica without its store has no database URL and no common key: it must
            # not start on a key of its own whose tokens no other replica accepts.
            if store is None:
                raise SecretStoreError(store_problem or "no secret store is available")
            shared = open_shared(self.config, store)
            signing_key, key_warning, loader = shared.signing.current(), None, None
        else:
            signing_key, key_warning = signing_key_or_ephemeral(store)
            # With the key from a store, `lmgate keys rotate` reaches this gateway while it
            # runs; a key in memory only cannot have been rotated by anyone else.
            loader = None if key_warning or store is None else signing_key_loader(store)
        # Without a usable store LM Gate still reads LMGATE_SECRET_* variables set on purpose.
        self.secrets = store if store is not None else EnvSecretStore()
        self.lmstudio_token = read_or_none(self.secrets, LMSTUDIO_API_TOKEN)
        try:
            identity = open_identity(self.config, signing_key, key_loader=loader, shared=shared)
        except BaseException:
            if shared is not None:
                shared.db.close()
            raise
        try:
            server = GatewayServer(build_gateway(self.config, identity, self.secrets))
            await server.start()
        except BaseException:
            identity.close()
            raise
        self._identity, self._server = identity, server
        try:
            reachable = await server.gateway.upstreams_reachable()
            # After the last await: nothing can interrupt the start between making the key
            # and handing it to the front-end that shows it.
            made = self._make_first_key(identity) if first_key else None
        except BaseException:
            await self.stop()
            raise
        views = server.gateway.upstream_views() if server.gateway.pool.several else ()
        return Started(server.url, reachable, store_problem, key_warning, made, views)

    def _open_store(self) -> tuple[SecretStore | None, str | None]:
        if self._store_override is not None:
            return self._store_override, None
        try:
            return secret_store_for(self.config), None
        except SecretStoreError as exc:
            return None, str(exc)

    @staticmethod
    def _make_first_key(identity: Identity) -> str | None:
        if identity.api_keys.list() or identity.tokens.list():
            return None
        key, _record = identity.api_keys.create(
            FIRST_KEY_NAME, scopes=ALL_SCOPES, source=AuditSource.GATEWAY
        )
        return key

    async def go_public(self, on_change: StatusListener | None = None) -> TunnelManager:
        """The last step: open and prove the public URL (the configured provider)."""
        if self._tunnel is not None:
            return self._tunnel
        if self._opening is None:
            self._opening = spawn(
                go_public(
                    self.config,
                    self.server,
                    self.secrets,
                    data_dir(self.config),
                    on_change=on_change,
                ),
                name="going-public",
            )
        opening = self._opening
        try:
            # Shielded: a caller given up on does not abandon an agent half started.
            tunnel = await asyncio.shield(opening)
        except BaseException:
            if self._opening is opening and opening.done():
                self._opening = None  # failed (and closed what it had): the next try starts anew
            raise
        if self._opening is not opening:
            raise LMGateError("LM Gate went private before the tunnel finished opening.")
        self._opening, self._tunnel = None, tunnel
        return tunnel

    async def go_private(self) -> None:
        opening, self._opening = self._opening, None
        if opening is not None:
            # The agent's start cannot be interrupted (pyngrok waits for it in a thread): wait
            # for it, bounded by the provider's open timeout, then close what it opened.
            with contextlib.suppress(LMGateError):  # a failed opening closed its own
                opened = await asyncio.shield(opening)
                await opened.stop()
        if self._tunnel is not None:
            tunnel, self._tunnel = self._tunnel, None
            await tunnel.stop()

    def stop_agent_now(self) -> bool:
        """A second stop signal: the tunnel's agent is stopped here and now, from any thread,
        even while :meth:`stop` is under way; the rest is left to the process's end."""
        return stop_agent_now(self.config, self.secrets, data_dir(self.config))

    async def stop(self) -> None:
        """In reverse: the tunnel (and its agent) before the gateway, whose running streams
        may finish within the grace, then the database. Stopping twice does nothing."""
        try:
            await self.go_private()
        finally:
            try:
                if self._server is not None:
                    server, self._server = self._server, None
                    await server.stop()
            finally:
                if self._identity is not None:
                    identity, self._identity = self._identity, None
                    identity.close()
