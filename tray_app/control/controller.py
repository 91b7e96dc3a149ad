"""The app's brain, with no Qt: it runs the gateway and the tunnel on one asyncio loop and
publishes frozen :class:`AppState` snapshots. The tray (or anything else) drives it through
:class:`ThreadedController`, whose every method returns a ``concurrent.futures.Future``.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import logging
import os
import shlex
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from tray_app.config import upstream_edit
from tray_app.config.files import read_config_file
from tray_app.config.parsers import TunnelProvider
from tray_app.config.settings import (
    CONFIG_FILE_ENV,
    SETTINGS_BY_KEY,
    Config,
    default_config_path,
    dump_settings,
    ensure_public_exposure_allowed,
    load_config,
)
from tray_app.config.upstreams import is_upstream_key, token_secret_name
from tray_app.control.assembly import Identity, data_dir
from tray_app.control.credential_usage import (
    NO_RECENT_USAGE,
    RecentUsage,
    budgets,
    recent_usage,
)
from tray_app.control.going_public import LONGEST_VERIFY
from tray_app.control.loop_thread import LoopThread
from tray_app.control.service import GatewayService, Started
from tray_app.control.settings_form import FORM_FIELDS
from tray_app.control.tunnel_setup import ChoiceRow, choice_rows, missing_setup
from tray_app.control.upstream_changes import add_with_token, remove_with_token
from tray_app.control.upstream_status import (
    UpstreamRow,
    UpstreamsChanged,
    UpstreamStatus,
    ask_upstream,
    rows_of,
    statuses_of,
)
from tray_app.errors import ConfigError, LMGateError, SecretStoreError, TunnelError
from tray_app.gateway.server.identify import lmgate_listens
from tray_app.gateway.upstream.probe import PROBE_TIMEOUT, LMStudioProbe, probe_lmstudio
from tray_app.identity.principal import ALL_SCOPES, Budget, CredentialKind
from tray_app.secret_store.base import LMSTUDIO_API_TOKEN, SecretStore, read_or_none
from tray_app.storage.audit import AuditSource
from tray_app.tasks import spawn
from tray_app.tunnel.cloudflare import CLOUDFLARE_TUNNEL_TOKEN, check_tunnel_token_shape
from tray_app.tunnel.manager import TunnelManager, TunnelState, TunnelStatus
from tray_app.tunnel.ngrok import (
    CLOSE_TIMEOUT,
    NGROK_AUTHTOKEN,
    OPEN_TIMEOUT,
    check_token_shape,
)
from tray_app.tunnel.ngrok_install import default_target, install_ngrok_agent, ngrok_download_url

log = logging.getLogger("lmgate.controller")
T = TypeVar("T")

SNIPPET_TTL = 3600.0
APP_KEY_TTL = 30 * 86400.0
# Each place that hands out an API key reuses its own one while it lasts, instead of minting a
# key that never expires on every click.
MENU_OPENAI_SETTINGS = "openai-settings"
FOR_APPS = "for-apps"
# How often the running tray asks LM Studio whether it is still there: a few seconds after it
# goes away or comes back, the icon, the status line and the main window say so.
WATCH_INTERVAL = 3.0


class Phase(StrEnum):
    """What the tray icon shows (its value names the icon)."""

    PRIVATE = "private"
    STARTING = "starting"
    PUBLIC = "public"
    RECONNECTING = "reconnecting"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class AppState:
    phase: Phase = Phase.STARTING
    gateway_url: str | None = None
    public_url: str | None = None
    provider: str = "none"
    lmstudio_reachable: bool | None = None
    message: str = "Starting…"
    warning: str | None = None
    needs_lmstudio: bool = False  # first-run guide: start LM Studio's server
    needs_tunnel: bool = False  # first-run guide: choose how to go public, or finish setting it up
    tunnel_setup: str | None = None  # what is missing before going public (needs_tunnel)
    busy: bool = False
    port_note: str | None = None  # the configured port was taken: which port is used instead
    # What is wrong with LM Studio while the gateway runs (off, or wants a token); None: fine.
    upstream_note: str | None = None
    store_problem: str | None = None  # no usable secret store: why, and the fix
    # Whether the public URL streams (the check after each open), in words; None: not known.
    stream_note: str | None = None
    streams_in_one_piece: bool = False  # the check found the tunnel buffering answers
    # Each upstream's state while the gateway runs (the tray lists them when there are several).
    upstreams: tuple[UpstreamStatus, ...] = ()

    @property
    def status_line(self) -> str:
        line = self.message
        if self.phase == Phase.PUBLIC and self.public_url:
            line = f"Public at {self.public_url}"
        return f"{line} — {self.upstream_note}" if self.upstream_note else line


@dataclass(frozen=True, slots=True)
class PairingLink:
    url: str  # public URL with the one-time code in the fragment
    code: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class AppSettings:
    """What the settings window shows and saves: one field per setting the form declares
    (:data:`~tray_app.control.settings_form.FORM_FIELDS`, same names as Config's), then what is
    not config. Secrets are write-only: ``*_set`` says whether one is stored, a new value in
    ``new_*`` replaces it."""

    upstream_url: str
    tunnel_provider: str
    tunnel_ngrok_domain: str
    auth_allowed_models: tuple[str, ...]
    auth_token_ttl: float
    limits_requests_per_minute: int
    limits_concurrent_requests: int
    tunnel_go_public_at_start: bool
    start_at_login: bool
    lmstudio_token_set: bool
    ngrok_token_set: bool
    new_lmstudio_token: str | None = None
    new_ngrok_token: str | None = None
    # Going public without ngrok (issue 20).
    tunnel_cloudflare_hostname: str = ""
    cloudflare_token_set: bool = False
    new_cloudflare_token: str | None = None
    # Sharing one GPU (issue 17): defaults as Config's, so a form older than them still loads.
    queue_generations_in_flight: int = 4
    budget_device_tokens_per_day: int = 0
    budget_device_tokens_per_month: int = 0
    budget_copied_key_tokens_per_day: int = 0
    budget_copied_key_tokens_per_month: int = 0
    # (key, source) of form settings an environment variable or a flag sets for this run:
    # shown, but Save leaves the file's value of them alone.
    overridden: tuple[tuple[str, str], ...] = ()
    configured_port: int = 0
    port_in_use: int | None = None
    port_note: str | None = None
    store_problem: str | None = None  # secrets cannot be saved: why, and the fix


@dataclass(frozen=True, slots=True)
class Credential:
    kind: str  # "device", "token", "key"
    id: str
    name: str
    detail: str
    created: float
    last_seen: float | None
    requests: int
    tokens: int
    active: bool
    expires: float | None = None  # None: it does not expire
    recent: RecentUsage = NO_RECENT_USAGE
    budget: Budget | None = None  # None: no budget of its own


def curl_snippet(base_url: str, token: str, model: str) -> str:
    body = json.dumps(
        {
            "model": model,
            "stream": True,
            "messages": [{"role": "user", "content": "Hello! Who are you?"}],
        }
    )
    return (
        f"curl -N {shlex.quote(base_url + '/v1/chat/completions')} \\\n"
        f"  -H {shlex.quote('Authorization: Bearer ' + token)} \\\n"
        "  -H 'Content-Type: application/json' \\\n"
        "  -H 'ngrok-skip-browser-warning: 1' \\\n"
        f"  -d {shlex.quote(body)}\n"
    )


# Chatbox (1.15.1+) imports a provider from a deep link, documented in its docs repository
# (chatboxai/chatbox-docs, en/guides/providers/import-config.md, "Import Third-Party Provider
# Configuration"): ``chatbox://provider/import?config=$BASE64_ENCODED_CONFIG``, the config being
# {id, name, type: "openai", iconUrl, urls: {website}, settings: {apiHost, apiPath?, apiKey?,
# models: [{modelId, ...}]}}; apiPath defaults to /v1/chat/completions.
CHATBOX_IMPORT = "chatbox://provider/import?config="
CHATBOX_MAX_MODELS = 12  # the QR code grows with every model; Chatbox can fetch the rest


def chatbox_import_link(base_url: str, key: str, models: Sequence[str]) -> str:
    """Chatbox's provider deep link for LM Gate at ``base_url`` (ending in /v1) with ``key``
    and ``models``. Standard base64 as documented, percent-encoded so that no URL parser
    reads its "+" as a space."""
    origin = base_url.removesuffix("/").removesuffix("/v1")
    config = {
        "id": urlsplit(origin).netloc or "lmgate",  # unique in Chatbox: the host, as advised
        "name": "LM Gate",
        "type": "openai",
        "iconUrl": "",
        "urls": {"website": origin},
        "settings": {
            "apiHost": origin,
            "apiPath": "/v1/chat/completions",
            "apiKey": key,
            "models": [{"modelId": model} for model in models[:CHATBOX_MAX_MODELS]],
        },
    }
    encoded = base64.b64encode(json.dumps(config, separators=(",", ":")).encode()).decode()
    return CHATBOX_IMPORT + quote(encoded, safe="")


def config_path_for(environ: Mapping[str, str]) -> Path:
    """The file the config is read from, so Settings saves where it was loaded from."""
    named = environ.get(CONFIG_FILE_ENV)
    return Path(named) if named else default_config_path()


# ---- who holds the port --------------------------------------------------------------------
# When the tray cannot bind its port: another LM Gate (of another user or session, whose
# /healthz answers as ours does) or some other program. The tray says which, and runs on a
# free loopback port instead of stopping at an error.


def moved_port_note(host: str, taken: int, used: int, *, by_lmgate: bool) -> str:
    """What the tray says (message, log, Settings) after moving to another port."""
    if by_lmgate:
        return (
            f"Another LM Gate already runs at {host}:{taken} (another user or session); "
            f"this one uses port {used} instead."
        )
    return f"Port {taken} is taken by another program; LM Gate uses port {used} instead."


def store_problem_for_tray(problem: str, config: Config, config_path: Path) -> str:
    """What the tray says when its secret store cannot be opened: the fix in the tray's
    terms (its config file, not a command-line flag), and what the file store means."""
    if config.secrets_store != "keyring":
        return problem
    secrets_dir = (
        Path(config.secrets_file_dir) if config.secrets_file_dir else data_dir(config) / "secrets"
    )
    return (
        "No OS keyring is available (no Secret Service), so LM Gate cannot keep LM Studio's "
        "token, the ngrok token or its signing key beyond this run. Fix: install and unlock "
        "a keyring (GNOME Keyring or KWallet, e.g. `sudo apt install gnome-keyring`, then log "
        f'in again), or put `secrets.store = "file"` in {config_path} and restart LM Gate: '
        f"secrets are then kept unencrypted in files only your user can read ({secrets_dir}), "
        "so anyone who can read your files or their backups can read them."
    )


def upstream_note_for(probe: LMStudioProbe) -> str | None:
    """What the status line says about LM Studio while the gateway runs; None: it answers."""
    if probe.ready:
        return None
    if probe.needs_token:
        return "LM Studio wants an API token: enter it in Settings"
    if probe.answered:
        return f"LM Studio answers {probe.status}"
    return "LM Studio is not answering: start its server (Developer → Start Server)"


class Controller:
    """Lives on the loop thread. ``config_path`` is where Settings saves; ``store`` overrides
    the configured secret store (tests pass an in-memory one). ``overrides`` (flags) and
    ``environ`` are what ``config`` was loaded with besides the file: a reload after Save
    applies them again. ``port_fallback``: when the port is taken, run on a free one."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        store: SecretStore | None = None,
        autostart: Any = None,
        overrides: Mapping[str, object] | None = None,
        environ: Mapping[str, str] | None = None,
        port_fallback: bool = False,
        watch_interval: float = WATCH_INTERVAL,
    ) -> None:
        self.config = config
        self._watch_interval = watch_interval
        self._watch: asyncio.Task[None] | None = None
        self._environ = environ
        self._overrides = dict(overrides or {})
        self._config_path = config_path or config_path_for(self._env)
        self._port_fallback = port_fallback
        self._store_override = store
        self._autostart = autostart
        self._service = GatewayService(config, store=store)
        self._state = AppState(provider=config.tunnel_provider)
        self._listeners: list[Callable[[AppState], None]] = []
        self._purpose_keys: dict[str, str] = {}  # purpose -> "key id:key"

    # ---- state -----------------------------------------------------------------------------

    @property
    def state(self) -> AppState:
        return self._state

    def add_listener(self, listener: Callable[[AppState], None]) -> None:
        self._listeners.append(listener)

    @property
    def _env(self) -> Mapping[str, str]:
        return os.environ if self._environ is None else self._environ

    def _publish(self, **changes: Any) -> AppState:
        previous, self._state = self._state, replace(self._state, **changes)
        if self._state.phase == Phase.ERROR and (
            previous.phase != Phase.ERROR or previous.message != self._state.message
        ):
            # The icon turns red: the log file says why (a tray has no terminal).
            log.error("LM Gate shows an error: %s", self._state.message)
        for listener in self._listeners:
            try:
                listener(self._state)
            except Exception:
                log.exception("a state listener failed")
        return self._state

    @property
    def identity(self) -> Identity:
        return self._service.identity

    @property
    def _store(self) -> SecretStore:
        """The store secrets are read from and saved to: the configured one once started."""
        return self._service.secrets

    @property
    def _tunnel(self) -> TunnelManager | None:
        return self._service.tunnel

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> AppState:
        self._publish(phase=Phase.STARTING, message="Starting…", busy=True)
        note: str | None = None
        if not self._service.running:
            # Each start runs the sequence afresh, with the config as Settings last saved it.
            self._service = GatewayService(self.config, store=self._store_override)
        try:
            # No first key: the tray makes keys when asked, and shows each then.
            started = await self._service.start()
        except ConfigError as exc:
            if not (self._port_fallback and exc.key == "server.port" and self.config.server_port):
                return self._publish(phase=Phase.ERROR, message=str(exc), busy=False)
            try:
                started, note = await self._start_on_a_free_port()
            except ConfigError as again:
                return self._publish(phase=Phase.ERROR, message=str(again), busy=False)
        store_problem = (
            store_problem_for_tray(started.store_problem, self.config, self._config_path)
            if started.store_problem
            else None
        )
        if store_problem:
            log.warning("%s", store_problem)
        state = self._publish(
            phase=Phase.PRIVATE,
            gateway_url=started.url,
            lmstudio_reachable=started.lmstudio_reachable,
            message="Private: only this computer can connect",
            busy=False,
            warning=store_problem or started.key_warning,
            store_problem=store_problem,
            needs_lmstudio=not started.lmstudio_reachable,
            needs_tunnel=not self._tunnel_ready(),
            tunnel_setup=missing_setup(self.config, self._store),
            provider=self.config.tunnel_provider,
            port_note=note,
            upstream_note=None,
        )
        if not started.lmstudio_reachable:
            await self.check_lmstudio()  # says why at once: off, or wants a token
        self.check_upstreams()
        if self._watch_interval > 0:
            self._watch = spawn(self._watch_lmstudio(), name="watch LM Studio")
        if self.config.tunnel_go_public_at_start and self._tunnel_ready():
            with contextlib.suppress(LMGateError):
                state = await self.go_public()
        return state

    async def _start_on_a_free_port(self) -> tuple[Started, str]:
        """The configured port is taken: a free loopback port instead (internal anyway when
        going public), and a note that says so and whether another LM Gate holds the port."""
        host, taken = self.config.server_host, self.config.server_port
        by_lmgate = await lmgate_listens(host, taken)
        elsewhere = replace(self.config, server_port=0)
        self._service = GatewayService(elsewhere, store=self._store_override)
        started = await self._service.start()
        note = moved_port_note(host, taken, self._service.server.port or 0, by_lmgate=by_lmgate)
        log.warning("%s", note)
        return started, note

    def _tunnel_ready(self) -> bool:
        return missing_setup(self.config, self._store) is None

    async def tunnel_choices(self) -> tuple[ChoiceRow, ...]:
        """The ways to go public side by side, each with whether its agent is installed."""
        return await asyncio.to_thread(choice_rows, self.config)

    async def ngrok_install_plan(self) -> tuple[str, str]:
        """(URL, path): what "Install the ngrok agent" would download, and where it puts it;
        shown before the owner agrees."""
        return ngrok_download_url(self.config.tunnel_ngrok_download_url), str(default_target())

    async def install_ngrok_agent(self) -> str:
        """Download, install and prove the ngrok agent (only after the owner agreed: the UI
        asks first); what was installed, in words."""
        url, target = await self.ngrok_install_plan()
        agent = await asyncio.to_thread(install_ngrok_agent, Path(target), download_url=url)
        return f"Installed ngrok {agent.version} at {agent.path}."

    async def choose_tunnel(self, provider: str) -> AppState:
        """Keep ``provider`` as the way to go public (in the config file, as Settings would)
        and go public with it: the first-run guide's one click."""
        chosen = TunnelProvider(provider)
        if chosen is TunnelProvider.NONE:
            raise LMGateError("choose a way to go public")
        if "tunnel.provider" in self._overridden():
            raise LMGateError(
                "tunnel.provider is set for this run by "
                f"{self._overridden()['tunnel.provider']}: change it there"
            )
        chosen_config = replace(self.config, tunnel_provider=chosen)
        # Refused (dev mode) before anything is written: the file keeps what it had.
        ensure_public_exposure_allowed(chosen_config)
        text = self._merged_config_text({"tunnel.provider": chosen.value})
        self._config_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._config_path.with_name(self._config_path.name + ".tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(self._config_path)  # never half a file, whatever happens meanwhile
        # Only the one setting changes, in the file as here: everything else stays as it runs.
        self.config = chosen_config
        await self._restart()
        return await self.go_public()

    def stop_agent_now(self) -> bool:
        """See :meth:`GatewayService.stop_agent_now`: safe from any thread."""
        return self._service.stop_agent_now()

    async def shutdown(self) -> None:
        """Close the tunnel, let streams finish (within the grace), stop the gateway."""
        watch, self._watch = self._watch, None
        if watch is not None and watch is not asyncio.current_task():
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        await self._service.stop()
        self._publish(
            phase=Phase.PRIVATE,
            public_url=None,
            message="Stopped",
            busy=False,
            upstream_note=None,
            upstreams=(),  # nothing checks them now: an old "up" would be a claim
        )

    # ---- watching LM Studio ----------------------------------------------------------------

    async def _watch_lmstudio(self) -> None:
        me = asyncio.current_task()
        while self._watch is me:
            await asyncio.sleep(self._watch_interval)
            try:
                await self.check_lmstudio()
                self.check_upstreams()
            except Exception:  # the watcher must outlive any one failed look
                log.exception("checking on LM Studio failed")

    async def check_lmstudio(self) -> None:
        """Ask LM Studio (with the gateway's token) whether it answers, and publish what
        changed: logged once per change, not once per look. When LM Studio refuses the token
        and the store holds another one (`lmgate secret set` while the tray runs), the
        gateway restarts to use it."""
        service = self._service
        if not service.running or not self.config.all_upstreams[0].enabled:
            return  # switched off: nothing is sent there, not even a look
        probe = await probe_lmstudio(
            self.config.upstream_url,
            service.lmstudio_token,
            within=PROBE_TIMEOUT,
            list_models=False,
        )
        if self._service is not service or not service.running or self._state.busy:
            return  # Save restarted it meanwhile, or a start is under way: that answer is stale
        if probe.needs_token and self._token_changed():
            log.info("LM Studio's API token changed in the secret store; restarting to use it")
            await self._restart()
            self._publish(message="LM Studio's new API token is in use (LM Gate restarted).")
            return
        note = upstream_note_for(probe)
        if note == self._state.upstream_note and probe.ready == self._state.lmstudio_reachable:
            return
        if note:
            log.warning("%s (%s)", note, self.config.upstream_url)
        else:
            log.info("LM Studio answers again at %s", self.config.upstream_url)
        self._publish(
            upstream_note=note, lmstudio_reachable=probe.ready, needs_lmstudio=not probe.ready
        )

    def check_upstreams(self) -> None:
        """Publish each upstream's state as the gateway's health checker last saw it, when it
        changed (the checker probes on its own schedule; this only reads what it found)."""
        if not self._service.running:
            return
        found = statuses_of(self._service.gateway.upstream_views())
        if found != self._state.upstreams:
            self._publish(upstreams=found)

    def _token_changed(self) -> bool:
        stored = read_or_none(self._store, LMSTUDIO_API_TOKEN)
        return bool(stored) and stored != self._service.lmstudio_token

    async def _restart(self) -> AppState:
        """Stop and start again with the current config, public again if it was."""
        was_public = self._tunnel is not None
        await self.shutdown()
        state = await self.start()
        if was_public and self._tunnel_ready() and self._tunnel is None:
            with contextlib.suppress(LMGateError):
                state = await self.go_public()
        return state

    # ---- going public ----------------------------------------------------------------------

    async def go_public(self) -> AppState:
        if not self._service.running:
            raise LMGateError("LM Gate is not running")
        if self._tunnel is not None:
            return self._state
        missing = missing_setup(self.config, self._store)
        if missing is not None:
            self._publish(needs_tunnel=True, tunnel_setup=missing)
            raise TunnelError(f"Not ready to go public: {missing}")
        self._publish(
            phase=Phase.STARTING,
            message=f"Going public with {self.config.tunnel_provider}…",
            busy=True,
        )
        try:
            await self._service.go_public(on_change=self._on_tunnel)
        except LMGateError as exc:
            self._publish(phase=Phase.ERROR, message=str(exc), busy=False)
            raise
        return self._state

    def _on_tunnel(self, status: TunnelStatus) -> None:
        if status.state is TunnelState.PUBLIC:
            streaming = status.streaming
            self._publish(
                phase=Phase.PUBLIC,
                public_url=status.public_url,
                busy=False,
                message=f"Public at {status.public_url}",
                warning=status.warning,
                needs_tunnel=False,
                tunnel_setup=None,
                stream_note=None if streaming is None else streaming.describe(),
                streams_in_one_piece=streaming is not None
                and streaming.checked
                and not streaming.incremental,
            )
        elif status.state is TunnelState.RECONNECTING:
            self._publish(
                stream_note=None,
                streams_in_one_piece=False,
                phase=Phase.RECONNECTING,
                message=f"Reconnecting (attempt {status.attempt}): {status.message}",
            )
        elif status.state is TunnelState.FAILED:
            self._publish(phase=Phase.ERROR, public_url=None, message=status.message, busy=False)
        elif status.state is TunnelState.STOPPED:
            self._publish(
                stream_note=None,
                streams_in_one_piece=False,
                phase=Phase.PRIVATE,
                public_url=None,
                busy=False,
                warning=None,
                message="Private: only this computer can connect",
            )

    async def go_private(self, *, revoke_devices: bool = False) -> AppState:
        await self._service.go_private()
        if revoke_devices and self._service.running:
            count = self.identity.pairing.revoke_all_devices(source=AuditSource.TRAY)
            self._publish(
                message=f"Private: only this computer can connect ({count} device(s) revoked)"
            )
        return self._publish(phase=Phase.PRIVATE, public_url=None, busy=False)

    # ---- links, keys and snippets --------------------------------------------------------

    def _base_url(self) -> str:
        url = self._state.public_url or self._state.gateway_url
        if not url:
            raise LMGateError("LM Gate is not running")
        return url

    async def pairing_link(self) -> PairingLink:
        code, expires = self.identity.pairing.create_code()
        return PairingLink(f"{self._base_url()}/#{code}", code, expires)

    async def models(self) -> list[str]:
        """LM Studio's models, as allowed by Settings."""
        ok, result = await self.test_connection(self.config.upstream_url)
        if not ok:
            raise LMGateError(result[0] if result else "LM Studio is not reachable")
        allowed = set(self.config.auth_allowed_models)
        return [m for m in result if not allowed or m in allowed]

    async def warm_up(self, model: str) -> float:
        """Load ``model`` into LM Studio now, through the running gateway's model guard, so
        the load waits for other models' answers instead of cutting them off (the CLI's
        warm-up cannot see them). Seconds the load took, 0.0 if it was loaded already."""
        if not self._service.running:
            raise LMGateError("LM Gate is not running, so it cannot load a model; start it first.")
        return await self._service.gateway.warm_up(model)

    async def curl_snippet(self) -> str:
        models = await self.models()
        if not models:
            raise LMGateError(
                "LM Studio has no model LM Gate may offer; load one in LM Studio "
                "or check the allowed models in Settings."
            )
        grant = self.identity.access.for_snippet()
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
        issued = self.identity.tokens.issue(
            name=f"curl snippet {stamp}",
            kind=CredentialKind.SNIPPET,
            scopes=grant.scopes,
            ttl=SNIPPET_TTL,
            models=grant.models,
            budget=grant.budget,
            source=AuditSource.TRAY,
        )
        return curl_snippet(self._base_url(), issued.token, models[0])

    async def openai_settings(self, purpose: str = MENU_OPENAI_SETTINGS) -> tuple[str, str]:
        """(base URL ending in /v1, the API key that serves ``purpose``) for apps and SDKs.
        The same key while it is active; a new one (expiring after APP_KEY_TTL) once it
        expired or was revoked. Which key serves which purpose is kept in the secret store
        (in memory when it cannot keep it), so a restart reuses it too."""
        key = self._active_purpose_key(purpose)
        if key is None:
            stamp = datetime.now(UTC).strftime("%Y-%m-%d")
            grant = self.identity.access.for_app_key()
            key, record = self.identity.api_keys.create(
                f"{purpose} {stamp}",
                scopes=grant.scopes,
                models=grant.models,
                ttl=APP_KEY_TTL,
                budget=grant.budget,
                source=AuditSource.TRAY,
            )
            self._remember_purpose_key(purpose, f"{record.id}:{key}")
        return f"{self._base_url()}/v1", key

    def _purpose_entry(self, purpose: str) -> str:
        return f"app-key-{purpose}"

    def _active_purpose_key(self, purpose: str) -> str | None:
        remembered = self._purpose_keys.get(purpose) or read_or_none(
            self._store, self._purpose_entry(purpose)
        )
        if not remembered or ":" not in remembered:
            return None
        key_id, key = remembered.split(":", 1)
        self.identity.api_keys.reload()  # revoked by `lmgate keys revoke` meanwhile?
        return key if self.identity.api_keys.is_active(key_id) else None

    def _remember_purpose_key(self, purpose: str, entry: str) -> None:
        self._purpose_keys[purpose] = entry
        try:
            self._store.set(self._purpose_entry(purpose), entry)
        except LMGateError as exc:
            log.warning("the %s key is kept for this run only: %s", purpose, exc)

    async def test_connection(self, url: str, token: str | None = None) -> tuple[bool, list[str]]:
        """(True, model ids) or (False, [the exact error])."""
        if token is None:
            token = read_or_none(self._store, LMSTUDIO_API_TOKEN)
        probe = await probe_lmstudio(url, token, within=PROBE_TIMEOUT)
        if probe.failure == "InvalidURL":
            return False, [f"{url} is not a valid URL."]
        if not probe.answered:
            return False, [
                f"LM Studio is not reachable at {url} ({probe.reason or probe.failure}). Start "
                "its server: LM Studio → Developer → Start Server."
            ]
        if probe.needs_token:
            return False, [
                f"LM Studio at {url} requires an API token ({probe.status}); enter it in Settings."
            ]
        if not probe.ready:
            return False, [f"LM Studio at {url} answered {probe.status}."]
        if probe.models is None:
            return False, [f"LM Studio at {url} answered, but with no list of models."]
        return True, list(probe.models)

    # ---- devices & tokens ------------------------------------------------------------------

    async def credentials(self) -> list[Credential]:
        identity = self.identity
        identity.recorder.flush()
        usage = {u.principal: u for u in identity.db.usage()}
        recent = recent_usage(identity.db, identity.clock.time())
        budget_of = budgets(identity.db)

        def credential(
            kind: str,
            ident: str,
            name: str,
            detail: str,
            created: float,
            last_seen: float | None,
            principal: str,
            active: bool,
            expires: float | None,
        ) -> Credential:
            u = usage.get(principal)
            return Credential(
                kind,
                ident,
                name,
                detail,
                created,
                last_seen,
                u.requests if u else 0,
                u.prompt_tokens + u.completion_tokens if u else 0,
                active,
                expires,
                recent.get(principal, NO_RECENT_USAGE),
                budget_of.get(principal),
            )

        out: list[Credential] = []
        for device in identity.pairing.devices():
            out.append(
                credential(
                    "device",
                    device.id,
                    device.name,
                    "paired device",
                    device.created,
                    device.last_seen,
                    device.principal_name,
                    device.revoked is None,
                    self._device_expiry(device.id),
                )
            )
        for record in identity.tokens.list():
            if record.kind is CredentialKind.DEVICE:
                continue
            out.append(
                credential(
                    "token",
                    record.jti,
                    record.name,
                    " ".join(sorted(record.scopes)),
                    record.created,
                    usage[record.sub].last_seen if record.sub in usage else None,
                    record.sub,
                    record.revoked is None,
                    record.expires,
                )
            )
        for key in identity.api_keys.list():
            out.append(
                credential(
                    "key",
                    key.id,
                    key.name,
                    " ".join(sorted(key.scopes)),
                    key.created,
                    key.last_used,
                    key.principal_name,
                    key.revoked is None,
                    key.expires,
                )
            )
        return out

    def _device_expiry(self, device_id: str) -> float | None:
        """When the device's newest token runs out (it pairs again after that)."""
        ends = [
            r.expires
            for r in self.identity.tokens.list()
            if r.kind is CredentialKind.DEVICE and r.device_id == device_id and r.revoked is None
        ]
        return max(ends) if ends else None

    async def revoke(self, kind: str, ident: str) -> None:
        if kind == "device":
            self.identity.pairing.revoke_device(ident, source=AuditSource.TRAY)
        elif kind == "token":
            self.identity.tokens.revoke(ident, source=AuditSource.TRAY)
        elif kind == "key":
            self.identity.api_keys.revoke(ident, source=AuditSource.TRAY)
        else:
            raise LMGateError(f"unknown credential kind {kind!r}")

    async def create_key(self, name: str, scopes: frozenset[str]) -> str:
        return self.identity.api_keys.create(
            name, scopes=scopes & ALL_SCOPES, source=AuditSource.TRAY
        )[0]

    # ---- settings ------------------------------------------------------------------------

    async def settings(self) -> AppSettings:
        form_values = {f.attribute: getattr(self.config, f.attribute) for f in FORM_FIELDS}
        return AppSettings(
            **form_values,
            start_at_login=bool(self._autostart and self._autostart.is_enabled()),
            lmstudio_token_set=bool(read_or_none(self._store, LMSTUDIO_API_TOKEN)),
            ngrok_token_set=bool(read_or_none(self._store, NGROK_AUTHTOKEN)),
            cloudflare_token_set=bool(read_or_none(self._store, CLOUDFLARE_TUNNEL_TOKEN)),
            overridden=tuple(self._overridden().items()),
            configured_port=self.config.server_port,
            port_in_use=self._service.server.port if self._service.running else None,
            port_note=self._state.port_note,
            store_problem=self._state.store_problem,
        )

    def _overridden(self) -> dict[str, str]:
        """Form settings set for this run by an environment variable or a flag: their source."""
        sources: dict[str, str] = {}
        for field in FORM_FIELDS:
            if self._overrides.get(field.key) is not None:
                sources[field.key] = "command line"
            elif field.setting.env_var in self._env:
                sources[field.key] = field.setting.env_var
        return sources

    async def save_settings(self, new: AppSettings) -> AppState:
        """Validate, store secrets, write the config file, and restart with the new settings."""
        # What an override sets is this run's, not the file's: the file keeps its own value.
        overridden = self._overridden()
        values = {
            f.key: _toml_ready(getattr(new, f.attribute))
            for f in FORM_FIELDS
            if f.key not in overridden
        }
        text = self._merged_config_text(values)  # raises ConfigError naming a bad key
        new_tokens = (new.new_ngrok_token, new.new_lmstudio_token, new.new_cloudflare_token)
        if any(new_tokens) and self._state.store_problem:
            # Said before anything is written: a token typed in cannot be kept anywhere.
            raise SecretStoreError(f"The token was not saved. {self._state.store_problem}")
        if new.new_ngrok_token:
            self._store.set(NGROK_AUTHTOKEN, check_token_shape(new.new_ngrok_token))
        if new.new_cloudflare_token:
            self._store.set(
                CLOUDFLARE_TUNNEL_TOKEN, check_tunnel_token_shape(new.new_cloudflare_token)
            )
        if new.new_lmstudio_token:
            self._store.set(LMSTUDIO_API_TOKEN, new.new_lmstudio_token.strip())
        self._config_path.parent.mkdir(parents=True, exist_ok=True)
        self._config_path.write_text(text, encoding="utf-8")
        if self._autostart is not None:
            if new.start_at_login:
                self._autostart.enable()
            else:
                self._autostart.disable()
        # The file as saved, under the same environment and flags as at launch; the restart
        # also hands a new LM Studio token to the gateway.
        self.config = load_config(
            path=self._config_path, environ=self._environ, overrides=self._overrides
        )
        return await self._restart()

    # ---- upstreams ---------------------------------------------------------------------------
    # Not part of AppSettings and Save: each change is written to the file at once, as
    # `lmgate upstream add|remove` writes it, and applied as Save applies settings: the
    # gateway restarts (if it runs) to use it.

    async def upstream_rows(self) -> tuple[UpstreamRow, ...]:
        """The configured upstreams, ``local`` first, for Settings' list."""
        return rows_of(self.config.all_upstreams, self._store)

    async def add_upstream(
        self, name: str, url: str, weight: int = 1, token: str | None = None
    ) -> UpstreamsChanged:
        """Raises ValueError (a bad name, URL or weight, a name in use) in the parsers' words."""
        entry = upstream_edit.new_entry(name.strip(), url.strip(), weight)
        upstream_edit.ensure_unused(self._config_path, entry.name)
        token = (token or "").strip() or None
        if token and self._state.store_problem:
            raise SecretStoreError(f"The upstream was not added. {self._state.store_problem}")
        add_with_token(self._config_path, entry, self.config.all_upstreams, self._store, token)
        return await self._upstreams_changed(f"Added {entry.name} at {entry.url}")

    async def remove_upstream(self, name: str) -> UpstreamsChanged:
        remove_with_token(self._config_path, name, self._store)
        return await self._upstreams_changed(f"Removed {name}")

    async def test_upstream(self, name: str) -> tuple[bool, str]:
        """Ask the configured upstream ``name`` now, with its own token."""
        entry = next((e for e in self.config.all_upstreams if e.name == name), None)
        if entry is None:
            raise ValueError(f"no upstream is named {name!r}")
        return await ask_upstream(
            name, entry.url, read_or_none(self._store, token_secret_name(name))
        )

    async def _upstreams_changed(self, done: str) -> UpstreamsChanged:
        self.config = load_config(
            path=self._config_path, environ=self._environ, overrides=self._overrides
        )
        if self._service.running:
            await self._restart()
            message = f"{done}; LM Gate restarted to use it."
        else:
            message = f"{done}; LM Gate uses it when it starts."
        return UpstreamsChanged(rows_of(self.config.all_upstreams, self._store), message)

    def _merged_config_text(self, values: Mapping[str, object]) -> str:
        merged: dict[str, object] = {}
        for key, value in read_config_file(self._config_path).items():
            # The upstreams' tables too: the Settings window does not edit them (yet), and a
            # save must not drop the owner's other machines.
            if key in SETTINGS_BY_KEY or is_upstream_key(key):
                merged[key] = value
        merged.update(values)
        return dump_settings(merged)


def _toml_ready(value: object) -> object:
    """TOML has arrays, not tuples."""
    return list(value) if isinstance(value, tuple) else value


# Beyond the grace and the tunnel's own bounds: the database, the loop's other tasks.
SHUTDOWN_SLACK = 10.0
# A stop while the tunnel opens waits for the opening (the agent's start and the proof that
# the URL answers) before closing it.
OPENING_WAIT = OPEN_TIMEOUT + LONGEST_VERIFY


def shutdown_timeout(config: Config) -> float:
    """How long Quit waits for the orderly shutdown before giving up on it: every step's own
    bound added up, so a grace the owner set (up to an hour) is never cut short by ours."""
    return OPENING_WAIT + CLOSE_TIMEOUT + config.server_shutdown_grace + SHUTDOWN_SLACK


class ThreadedController:
    """Runs a :class:`Controller` on its own loop thread; callable from any thread (the UI's)."""

    def __init__(self, controller: Controller, loop_thread: LoopThread | None = None) -> None:
        self.controller = controller
        self._thread = loop_thread or LoopThread()
        self._own_thread = loop_thread is None
        self._stopped = False

    def start(self) -> concurrent.futures.Future[AppState]:
        if self._own_thread:
            self._thread.start()
        return self._thread.submit(self.controller.start())

    @property
    def state(self) -> AppState:
        return self.controller.state

    def add_listener(self, listener: Callable[[AppState], None]) -> None:
        """``listener`` is called on the loop thread; the UI hands it to its signal bridge."""
        self.controller.add_listener(listener)

    def _run(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return self._thread.submit(coro)

    def go_public(self) -> concurrent.futures.Future[AppState]:
        return self._run(self.controller.go_public())

    def go_private(self, revoke_devices: bool = False) -> concurrent.futures.Future[AppState]:
        return self._run(self.controller.go_private(revoke_devices=revoke_devices))

    def pairing_link(self) -> concurrent.futures.Future[PairingLink]:
        return self._run(self.controller.pairing_link())

    def curl_snippet(self) -> concurrent.futures.Future[str]:
        return self._run(self.controller.curl_snippet())

    def models(self) -> concurrent.futures.Future[list[str]]:
        return self._run(self.controller.models())

    def warm_up(self, model: str) -> concurrent.futures.Future[float]:
        return self._run(self.controller.warm_up(model))

    def openai_settings(
        self, purpose: str = MENU_OPENAI_SETTINGS
    ) -> concurrent.futures.Future[tuple[str, str]]:
        return self._run(self.controller.openai_settings(purpose))

    def test_connection(
        self, url: str, token: str | None = None
    ) -> concurrent.futures.Future[tuple[bool, list[str]]]:
        return self._run(self.controller.test_connection(url, token))

    def credentials(self) -> concurrent.futures.Future[list[Credential]]:
        return self._run(self.controller.credentials())

    def revoke(self, kind: str, ident: str) -> concurrent.futures.Future[None]:
        return self._run(self.controller.revoke(kind, ident))

    def create_key(self, name: str, scopes: frozenset[str]) -> concurrent.futures.Future[str]:
        return self._run(self.controller.create_key(name, scopes))

    def settings(self) -> concurrent.futures.Future[AppSettings]:
        return self._run(self.controller.settings())

    def save_settings(self, new: AppSettings) -> concurrent.futures.Future[AppState]:
        return self._run(self.controller.save_settings(new))

    def tunnel_choices(self) -> concurrent.futures.Future[tuple[ChoiceRow, ...]]:
        # Answered here, not on the loop: the first-run guide asks for it whenever a state
        # says a tunnel is missing, the loop starting or stopping too; it reads only the
        # (frozen) config and looks on PATH.
        answer: concurrent.futures.Future[tuple[ChoiceRow, ...]] = concurrent.futures.Future()
        answer.set_result(choice_rows(self.controller.config))
        return answer

    def choose_tunnel(self, provider: str) -> concurrent.futures.Future[AppState]:
        return self._run(self.controller.choose_tunnel(provider))

    def ngrok_install_plan(self) -> concurrent.futures.Future[tuple[str, str]]:
        return self._run(self.controller.ngrok_install_plan())

    def install_ngrok_agent(self) -> concurrent.futures.Future[str]:
        return self._run(self.controller.install_ngrok_agent())

    def upstream_rows(self) -> concurrent.futures.Future[tuple[UpstreamRow, ...]]:
        return self._run(self.controller.upstream_rows())

    def add_upstream(
        self, name: str, url: str, weight: int = 1, token: str | None = None
    ) -> concurrent.futures.Future[UpstreamsChanged]:
        return self._run(self.controller.add_upstream(name, url, weight, token))

    def remove_upstream(self, name: str) -> concurrent.futures.Future[UpstreamsChanged]:
        return self._run(self.controller.remove_upstream(name))

    def test_upstream(self, name: str) -> concurrent.futures.Future[tuple[bool, str]]:
        return self._run(self.controller.test_upstream(name))

    def stop_now(self) -> None:
        """A second stop signal, from any thread (the UI's, while :meth:`shutdown` waits): the
        tunnel's agent stops at once; the caller then ends the process."""
        self.controller.stop_agent_now()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop everything and the loop thread; returns when done (or after ``timeout``, by
        default :func:`shutdown_timeout` of the settings). Calling it again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        if timeout is None:
            timeout = shutdown_timeout(self.controller.config)
        future = self._run(self.controller.shutdown())
        with contextlib.suppress(concurrent.futures.TimeoutError, LMGateError):
            future.result(timeout)
        self._thread.stop(timeout)
