"""Configuration: defaults < TOML file < ``LMGATE_*`` environment < command-line flags.

Every setting is declared once, as a field of :class:`Config` (see
:mod:`tray_app.config.declaration`); the same declaration parses a TOML value, an environment
string and a CLI flag, so all three give the same error for the same mistake, and that error
names the key (``server.port``) and where the bad value came from. A setting's attribute is its
key with "." replaced by "_".
Secrets never live here: they are read through :mod:`tray_app.secret_store.base`.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tray_app.config import parsers as p
from tray_app.config.declaration import Flag, FormField, FormKind, Setting, declarations, setting
from tray_app.config.files import read_config_file, toml_text
from tray_app.config.parsers import (
    MIB,
    LogFormat,
    LogLevel,
    ModelSwitch,
    SecretStoreKind,
    StateBackend,
    TunnelProvider,
    WhenRedisIsDown,
    parse_duration,
)
from tray_app.config.upstreams import (
    FIELDS as UPSTREAM_FIELDS,
)
from tray_app.config.upstreams import (
    LOCAL,
    UpstreamEntry,
    check_distinct_servers,
    check_name,
    is_upstream_key,
    parse_upstreams,
)
from tray_app.config.upstreams import (
    PREFIX as UPSTREAM_PREFIX,
)
from tray_app.errors import ConfigError
from tray_app.paths import user_config_dir

__all__ = [
    "CONFIG_FILE_ENV",
    "SETTINGS",
    "SETTINGS_BY_KEY",
    "Config",
    "LogLevel",
    "ModelSwitch",
    "SecretStoreKind",
    "Setting",
    "TunnelProvider",
    "check_combinations",
    "default_config_path",
    "describe_settings",
    "dump_settings",
    "ensure_public_exposure_allowed",
    "format_default",
    "load_config",
    "parse_duration",
    "read_config_file",
]

CONFIG_FILE_ENV = "LMGATE_CONFIG"

_SECONDS = "SECONDS"
# The Settings form edits budget defaults in a spin box, which holds a C int; two billion
# tokens a day is far beyond what one GPU makes.
BUDGET_DEFAULT_MAX = 2_000_000_000


@dataclass(frozen=True, slots=True)
class Config:
    """The validated settings, each declared once. Frozen: the running gateway never sees a
    half-changed config."""

    upstream_url: str = setting(
        "upstream.url",
        "http://127.0.0.1:1234",
        p.upstream_url,
        "LM Studio server URL",
        flag=Flag("--upstream", metavar="URL"),
        form=FormField("LM Studio URL", FormKind.TEXT, 1),
    )
    upstream_connect_timeout: float = setting(
        "upstream.connect_timeout",
        10.0,
        p.seconds(0.1, 300),
        "seconds to wait for a TCP connection to LM Studio",
    )
    # Idle, not total: a long generation may run for many minutes, but a silent upstream for
    # this long is dead. Generous because prompt processing on big contexts can take minutes.
    upstream_idle_timeout: float = setting(
        "upstream.idle_timeout",
        600.0,
        p.seconds(1, 86400),
        "seconds LM Studio may stay silent (prompt processing) before the request fails",
        flag=Flag("--idle-timeout", metavar=_SECONDS),
    )
    server_host: str = setting(
        "server.host",
        "127.0.0.1",
        p.bind_host,
        "address the gateway listens on",
        flag=Flag("--host"),
    )
    server_port: int = setting(
        "server.port",
        8787,
        p.int_in(0, 65535),
        "port the gateway listens on (0 = any free port)",
        flag=Flag("--port"),
    )
    # Image inputs arrive base64-encoded inside JSON; 32 MiB fits several large photos.
    limits_max_body_bytes: int = setting(
        "limits.max_body_bytes",
        32 * MIB,
        p.int_in(1024, 1024 * MIB),
        "largest accepted request body in bytes",
        flag=Flag("--max-body-bytes", metavar="N"),
    )
    limits_max_response_bytes: int = setting(
        "limits.max_response_bytes",
        256 * MIB,
        p.int_in(1024, 16 * 1024 * MIB),
        "largest non-streamed LM Studio response in bytes",
    )
    # One SSE event from LM Studio; a stream event is a few hundred bytes.
    limits_max_event_bytes: int = setting(
        "limits.max_event_bytes",
        1 * MIB,
        p.int_in(1024, 1024 * MIB),
        "largest single SSE event LM Studio may send in a stream, in bytes",
    )
    # SSE comments sent while LM Studio is still processing the prompt, so that proxies and
    # phones do not drop an idle connection. 0 turns them off.
    streaming_heartbeat_interval: float = setting(
        "streaming.heartbeat_interval",
        15.0,
        p.seconds(0, 3600),
        "seconds between SSE keep-alive comments while the prompt is processed (0 = off)",
        flag=Flag("--heartbeat", metavar=_SECONDS),
    )
    # How long in-flight requests may run on after a stop before they are closed.
    server_shutdown_grace: float = setting(
        "server.shutdown_grace",
        10.0,
        p.seconds(0, 3600),
        "seconds in-flight requests may finish after a stop",
    )
    # Slow or silent clients: a connection must deliver its request head within
    # server.header_timeout and its body within server.body_timeout; an idle keep-alive
    # connection closes after server.keepalive_timeout. None of them limits how long an answer
    # may stream.
    server_header_timeout: float = setting(
        "server.header_timeout",
        10.0,
        p.seconds(0.5, 600),
        "seconds a client may take to send a request's headers",
    )
    server_body_timeout: float = setting(
        "server.body_timeout",
        60.0,
        p.seconds(1, 3600),
        "seconds a client may take to send a request's body",
    )
    server_keepalive_timeout: float = setting(
        "server.keepalive_timeout",
        30.0,
        p.seconds(1, 3600),
        "seconds an idle keep-alive connection stays open",
    )
    # A client that reads nothing of its answer for this long (its socket buffer full) is
    # cut off: a stream it stopped reading, or pipelined requests it never reads.
    server_write_timeout: float = setting(
        "server.write_timeout",
        60.0,
        p.seconds(1, 3600),
        "seconds a client may leave its answer unread (its socket full) before it is cut off",
    )
    # Open client connections: 0 = derived from the process's file-descriptor limit, so the
    # gateway refuses new connections before it runs out of descriptors.
    server_max_connections: int = setting(
        "server.max_connections",
        0,
        p.int_in(0, 1_000_000),
        "open client connections at most (0 = from the file-descriptor limit)",
    )
    server_max_connections_per_client: int = setting(
        "server.max_connections_per_client",
        64,
        p.int_in(1, 1_000_000),
        "open connections at most from one address (the running tunnel agent excepted)",
    )
    # Host names (besides this machine's addresses, localhost and the tunnel's public name)
    # that requests may be addressed to; a browser tricked by DNS rebinding sends another one.
    server_allowed_hosts: tuple[str, ...] = setting(
        "server.allowed_hosts",
        (),
        p.host_names,
        "host names requests may be addressed to, besides IP addresses, localhost and the "
        "tunnel's public name (e.g. llm.example.com behind nginx)",
    )
    routes_enable_responses: bool = setting(
        "routes.enable_responses",
        False,
        p.boolean,
        "forward POST /v1/responses (MCP tools removed)",
        flag=Flag("--enable-responses", switch=True),
    )
    routes_enable_messages: bool = setting(
        "routes.enable_messages",
        False,
        p.boolean,
        "forward POST /v1/messages (Anthropic-style; MCP tools removed)",
        flag=Flag("--enable-messages", switch=True),
    )
    log_level: LogLevel = setting(  # noqa: RUF009 - a field specifier, evaluated once
        "log.level",
        LogLevel.INFO,
        p.OneOf(LogLevel),
        "log level",
        flag=Flag("--log-level"),
    )
    log_format: LogFormat = setting(  # noqa: RUF009 - a field specifier, evaluated once
        "log.format",
        LogFormat.AUTO,
        p.OneOf(LogFormat),
        "log lines: auto (short text at a terminal, JSON elsewhere), text or json",
        flag=Flag("--log-format"),
    )
    # ---- identity
    auth_dev_mode: bool = setting(
        "auth.dev_mode",
        False,
        p.boolean,
        "accept X-User-Id from this machine instead of a token (never with a tunnel)",
    )
    auth_token_ttl: float = setting(
        "auth.token_ttl",
        86400.0,
        p.duration_in(60, 366 * 86400),
        "default lifetime of `lmgate token create` (seconds, or 15m, 24h, 30d)",
        form=FormField("Default token lifetime", FormKind.DURATION, 6),
    )
    auth_device_token_ttl: float = setting(
        "auth.device_token_ttl",
        30 * 86400.0,
        p.duration_in(60, 366 * 86400),
        "lifetime of a paired device's token",
    )
    auth_pairing_code_ttl: float = setting(
        "auth.pairing_code_ttl",
        600.0,
        p.duration_in(30, 86400),
        "how long a pairing code (QR code) stays valid",
    )
    # ---- limits per principal and per client address
    limits_requests_per_minute: int = setting(
        "limits.requests_per_minute",
        120,
        p.int_in(1, 100_000_000),
        "requests per minute per principal (token bucket)",
        form=FormField("Requests per minute (per caller)", FormKind.NUMBER, 7),
    )
    limits_concurrent_requests: int = setting(
        "limits.concurrent_requests",
        4,
        p.int_in(1, 10_000),
        "requests or streams one principal may run at once (generations: on each upstream)",
        form=FormField("Requests at once (per caller)", FormKind.NUMBER, 8),
    )
    # ---- sharing one GPU: the generation queue, budgets, the model guard
    # LM Studio's "Max Concurrent Predictions" defaults to 4: more in flight only queue inside it,
    # where nobody sees their turn and one caller's burst goes first.
    queue_generations_in_flight: int = setting(
        "queue.generations_in_flight",
        4,
        p.int_in(1, 1024),
        "generations each upstream runs at once (LM Studio's parallel predictions); "
        "the rest wait in one fair queue",
        form=FormField("Generations at once (per upstream)", FormKind.NUMBER, 10),
    )
    queue_max_waiting: int = setting(
        "queue.max_waiting",
        512,
        p.int_in(0, 100_000),
        "requests that may wait for a generation slot in total, per upstream "
        "(0 = none wait: 503 at once)",
    )
    queue_max_waiting_per_client: int = setting(
        "queue.max_waiting_per_client",
        32,
        p.int_in(0, 100_000),
        "requests one client address (an IPv6 /64) may have waiting at once, per upstream",
    )
    # As many as one address may: one credential reaching LM Gate from many addresses (a
    # tunnel, an IPv6 /48) must not fill the whole queue, yet gets no less than an address.
    queue_max_waiting_per_caller: int = setting(
        "queue.max_waiting_per_caller",
        32,
        p.int_in(0, 100_000),
        "requests one credential may have waiting at once, from all its addresses together, "
        "per upstream",
    )
    queue_max_wait: float = setting(
        "queue.max_wait",
        60.0,
        p.duration_in(0, 3600),
        "how long a request without streaming waits for its turn before 503",
    )
    queue_max_stream_wait: float = setting(
        "queue.max_stream_wait",
        600.0,
        p.duration_in(0, 86400),
        "how long a stream waits for its turn (it is told its position meanwhile)",
    )
    budget_device_tokens_per_day: int = setting(
        "budget.device_tokens_per_day",
        0,
        p.int_in(0, BUDGET_DEFAULT_MAX),
        "tokens per day a newly paired device gets (prompt + completion; 0 = no budget)",
        form=FormField("Paired device: tokens per day (0 = unlimited)", FormKind.NUMBER, 11),
    )
    budget_device_tokens_per_month: int = setting(
        "budget.device_tokens_per_month",
        0,
        p.int_in(0, BUDGET_DEFAULT_MAX),
        "tokens per month a newly paired device gets (0 = no budget)",
        form=FormField("Paired device: tokens per month", FormKind.NUMBER, 12),
    )
    budget_copied_key_tokens_per_day: int = setting(
        "budget.copied_key_tokens_per_day",
        0,
        p.int_in(0, BUDGET_DEFAULT_MAX),
        "tokens per day a key or curl snippet copied from the tray gets (0 = no budget)",
        form=FormField("Copied key: tokens per day (0 = unlimited)", FormKind.NUMBER, 13),
    )
    budget_copied_key_tokens_per_month: int = setting(
        "budget.copied_key_tokens_per_month",
        0,
        p.int_in(0, BUDGET_DEFAULT_MAX),
        "tokens per month a key or curl snippet copied from the tray gets (0 = no budget)",
        form=FormField("Copied key: tokens per month", FormKind.NUMBER, 14),
    )
    models_switch: ModelSwitch = setting(  # noqa: RUF009 - a field specifier, evaluated once
        "models.switch",
        ModelSwitch.WAIT,
        p.OneOf(ModelSwitch),
        "a request for a model LM Studio has not loaded, while other models generate: wait "
        "for them (then one load), refuse (503), or off (LM Studio may evict mid-answer)",
    )
    models_load_timeout: float = setting(
        "models.load_timeout",
        300.0,
        p.duration_in(1, 3600),
        "how long loading a model may take (warm-up, or the first request for it)",
    )
    limits_auth_failures_per_minute: int = setting(
        "limits.auth_failures_per_minute",
        10,
        p.int_in(1, 10_000),
        "failed authentications per minute per client address before 429",
    )
    limits_pairing_attempts_per_minute: int = setting(
        "limits.pairing_attempts_per_minute",
        5,
        p.int_in(1, 10_000),
        "failed pairing attempts per minute per client address",
    )
    # Proxies whose X-Forwarded-For is believed (nginx in front). The running tunnel's own
    # agent is trusted while it runs, without being listed: loopback alone proves nothing.
    server_trusted_proxies: tuple[str, ...] = setting(
        "server.trusted_proxies",
        (),
        p.networks,
        "proxies whose X-Forwarded-For is believed, e.g. nginx (the running tunnel's agent "
        "is trusted without being listed)",
    )
    cors_allowed_origins: tuple[str, ...] = setting(
        "cors.allowed_origins",
        (),
        p.origins,
        "other web origins allowed to call LM Gate from a browser",
    )
    # "" = the platform's user data directory
    storage_data_dir: str = setting(
        "storage.data_dir",
        "",
        p.path_or_default,
        "directory for LM Gate's database (empty = the platform's user data dir)",
        flag=Flag(
            "--data-dir",
            metavar="DIR",
            common=True,
            help="directory of LM Gate's database (default: the user data dir)",
        ),
    )
    # ---- shared state for several replicas (docs: README "Team gateway")
    state_backend: StateBackend = setting(  # noqa: RUF009 - a field specifier, evaluated once
        "state.backend",
        StateBackend.SQLITE,
        p.OneOf(StateBackend),
        "sqlite (one machine) or postgres (several replicas: PostgreSQL for records, Redis for "
        "limits; their URLs are the secrets state-database-url and state-redis-url)",
    )
    state_when_redis_is_down: WhenRedisIsDown = setting(  # noqa: RUF009 - a field specifier
        "state.when_redis_is_down",
        WhenRedisIsDown.CLOSED,
        p.OneOf(WhenRedisIsDown),
        "with state.backend = postgres, while Redis is unreachable: closed refuses requests "
        "(503), open lets them through without rate, concurrency or generation-slot limits "
        "and with budgets held by each replica alone",
    )
    state_database_pool_size: int = setting(
        "state.database_pool_size",
        8,
        p.int_in(1, 256),
        "PostgreSQL connections each replica keeps open",
    )
    # A replica that dies keeps its callers' places this long; a live one renews them.
    state_lease_seconds: float = setting(
        "state.lease_seconds",
        30.0,
        p.duration_in(3, 3600),
        "how long a crashed replica's concurrency leases outlive it in Redis",
    )
    secrets_store: SecretStoreKind = setting(  # noqa: RUF009 - a field specifier, evaluated once
        "secrets.store",
        SecretStoreKind.KEYRING,
        p.OneOf(SecretStoreKind),
        "where secrets live: the OS keyring, a private file, or LMGATE_SECRET_* variables",
        flag=Flag(
            "--secret-store", common=True, help="where secrets live (default: the OS keyring)"
        ),
    )
    # "" = <storage.data_dir>/secrets (only with secrets.store = "file")
    secrets_file_dir: str = setting(
        "secrets.file_dir",
        "",
        p.path_or_default,
        "directory for secrets when secrets.store = file (empty = <data dir>/secrets)",
    )
    # ---- going public
    tunnel_provider: TunnelProvider = setting(  # noqa: RUF009 - a field specifier, evaluated once
        "tunnel.provider",
        TunnelProvider.NONE,
        p.OneOf(TunnelProvider),
        "how `serve` goes public: none (this machine only), ngrok, lan, cloudflare-quick, "
        "cloudflare-named, tailscale-serve or tailscale-funnel",
        flag=Flag(
            "--tunnel",
            help="go public: cloudflare-quick (no account, needs cloudflared), ngrok (needs "
            "`lmgate tunnel set-token`), cloudflare-named (your domain), tailscale-serve "
            "(HTTPS on your tailnet), tailscale-funnel (public via Tailscale), lan (this "
            "network, unencrypted) or none (default: this machine only)",
        ),
        form=FormField(
            "Go public with",
            FormKind.CHOICE,
            2,
            choice_labels=(
                (TunnelProvider.NONE, "None (this computer only)"),
                (TunnelProvider.CLOUDFLARE_QUICK, "Cloudflare quick tunnel (no account)"),
                (TunnelProvider.NGROK, "ngrok (free account, anywhere)"),
                (TunnelProvider.CLOUDFLARE_NAMED, "Cloudflare named tunnel (your domain)"),
                (TunnelProvider.TAILSCALE_SERVE, "Tailscale Serve (your tailnet, HTTPS)"),
                (TunnelProvider.TAILSCALE_FUNNEL, "Tailscale Funnel (public, HTTPS)"),
                (TunnelProvider.LAN, "LAN (this network, not encrypted)"),
            ),
        ),
    )
    # "" = `ngrok` on PATH, or pyngrok's usual install location
    tunnel_ngrok_path: str = setting(
        "tunnel.ngrok_path",
        "",
        p.path_or_default,
        "the ngrok agent binary (empty = ngrok on PATH)",
    )
    # A reserved/dev domain keeps the URL (and QR code) across restarts.
    tunnel_ngrok_domain: str = setting(
        "tunnel.ngrok_domain",
        "",
        p.domain,
        "your reserved ngrok domain: the public URL and QR code stay the same",
        form=FormField(
            "Reserved ngrok domain",
            FormKind.TEXT,
            3,
            placeholder="your-name.ngrok-free.app (optional)",
        ),
    )
    # "" = ngrok's own download site for this system (pyngrok's table)
    tunnel_ngrok_download_url: str = setting(
        "tunnel.ngrok_download_url",
        "",
        p.download_url,
        "where `lmgate tunnel install-agent` downloads ngrok from (empty = ngrok's site)",
    )
    tunnel_ngrok_region: str = setting(
        "tunnel.ngrok_region", "", p.ngrok_region, "ngrok region code (empty = nearest)"
    )
    # "" = `cloudflared` on PATH
    tunnel_cloudflared_path: str = setting(
        "tunnel.cloudflared_path",
        "",
        p.path_or_default,
        "the cloudflared agent binary (empty = cloudflared on PATH)",
    )
    tunnel_cloudflare_hostname: str = setting(
        "tunnel.cloudflare_hostname",
        "",
        p.hostname,
        "the public hostname routed to your named Cloudflare tunnel (cloudflare-named)",
        flag=Flag(
            "--cloudflare-hostname",
            help="the public hostname routed to your named Cloudflare tunnel",
        ),
        form=FormField(
            "Cloudflare hostname",
            FormKind.TEXT,
            4,
            placeholder="chat.example.com (named tunnels only)",
        ),
    )
    # "" = `tailscale` on PATH
    tunnel_tailscale_path: str = setting(
        "tunnel.tailscale_path",
        "",
        p.path_or_default,
        "the tailscale command (empty = tailscale on PATH)",
    )
    tunnel_tailscale_https_port: int = setting(
        "tunnel.tailscale_https_port",
        443,
        p.int_in(1, 65535),
        "the HTTPS port Tailscale serves LM Gate on (Funnel allows 443, 8443 and 10000)",
    )
    tunnel_lan_address: str = setting(
        "tunnel.lan_address",
        "",
        p.optional_ip,
        "the LAN address to listen on in LAN mode (empty = detect)",
    )
    tunnel_lan_port: int = setting(
        "tunnel.lan_port",
        0,
        p.int_in(0, 65535),
        "port for LAN mode (0 = the gateway's own port)",
    )
    tunnel_health_interval: float = setting(
        "tunnel.health_interval",
        30.0,
        p.seconds(1, 3600),
        "seconds between checks that the public URL still works",
    )
    tunnel_go_public_at_start: bool = setting(
        "tunnel.go_public_at_start",
        False,
        p.boolean,
        "the tray app goes public as soon as it starts",
        form=FormField("Go public when LM Gate starts", FormKind.CHECKBOX, 9),
    )
    # Models the tray's pairing codes, snippets and app keys may use (empty = all).
    auth_allowed_models: tuple[str, ...] = setting(
        "auth.allowed_models",
        (),
        p.string_list,
        "models paired devices and copied curl snippets may use, checked on every request, "
        "and that keys copied from the tray are made with (empty = all)",
        form=FormField("Allowed models (none ticked = all)", FormKind.MODELS, 5),
    )
    # /api/chat sends the newest history that fits this many characters (~4 per token).
    chat_context_chars: int = setting(
        "chat.context_chars",
        16_000,
        p.int_in(500, 10_000_000),
        "characters of history /api/chat sends with a message (newest first)",
    )

    # Not a setting of its own: the config file's [upstreams.NAME] tables (see
    # config.upstreams), parsed once the other layers have decided upstream.url.
    upstreams: tuple[UpstreamEntry, ...] = ()

    @property
    def all_upstreams(self) -> tuple[UpstreamEntry, ...]:
        """Every upstream, ``local`` (upstream.url) first: a list of one without tables."""
        return self.upstreams or (UpstreamEntry(LOCAL, self.upstream_url),)


SETTINGS: tuple[Setting, ...] = declarations(Config)
# Config's fields that are tables of settings, each table's fields declared once in its own
# module (config.upstreams.FIELDS), not settings themselves.
TABLE_FIELDS = ("upstreams",)

SETTINGS_BY_KEY: Mapping[str, Setting] = {s.key: s for s in SETTINGS}


def default_config_path() -> Path:
    return user_config_dir() / "config.toml"


def _apply(values: dict[str, Any], key: str, raw: object, source: str) -> None:
    declared = SETTINGS_BY_KEY.get(key)
    if declared is None:
        known = ", ".join(sorted(SETTINGS_BY_KEY))
        raise ConfigError(key, f"unknown setting (known: {known})", source)
    try:
        values[declared.attribute] = declared.parse(raw)
    except ValueError as exc:
        raise ConfigError(key, str(exc), source) from None


def load_config(
    *,
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Build the effective config.

    ``path`` defaults to ``$LMGATE_CONFIG`` or the platform's user config dir; ``overrides`` are
    dotted keys from CLI flags. Raises :class:`ConfigError` naming the first bad key.
    """
    env = os.environ if environ is None else environ
    if path is None:
        path = Path(env[CONFIG_FILE_ENV]) if env.get(CONFIG_FILE_ENV) else default_config_path()
    values: dict[str, Any] = {}
    tables: dict[str, Any] = {}
    for key, raw in read_config_file(path).items():
        if is_upstream_key(key):
            tables[key] = raw
        else:
            _apply(values, key, raw, str(path))
    for declared in SETTINGS:
        if declared.env_var in env:
            _apply(values, declared.key, env[declared.env_var], declared.env_var)
    for key, raw in (overrides or {}).items():
        if raw is not None:
            _apply(values, key, raw, "command line")
    local_url = values.get("upstream_url") or Config().upstream_url
    upstreams = parse_upstreams(tables, local_url, str(path)) if tables else ()
    config = Config(**values, upstreams=upstreams)
    # Here, once: every way an address gets in (tables, upstream.url, its environment variable,
    # `serve --upstream`) ends up in this list.
    check_distinct_servers(config.all_upstreams, str(path))
    check_combinations(config)
    return config


def check_combinations(config: Config) -> None:
    """Settings that are fine alone but unsafe together."""
    if config.auth_dev_mode and not _is_loopback_host(config.server_host):
        raise ConfigError(
            "auth.dev_mode",
            "cannot be on while server.host is not a loopback "
            f"address ({config.server_host}): anyone could claim to be anyone",
        )


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def describe_settings() -> list[tuple[str, str, object, str]]:
    """(key, env var, default, help) for every setting, for ``config keys`` and the README."""
    defaults = Config()
    return [(s.key, s.env_var, getattr(defaults, s.attribute), s.help) for s in SETTINGS]


def format_default(value: object) -> str:
    """A default as a person would write it in TOML or an environment variable."""
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value) or "(none)"
    if value == "":
        return "(auto)"
    return str(value)


def ensure_public_exposure_allowed(config: Config) -> None:
    """Called before any tunnel or LAN bind opens: dev mode trusts a header, so it must never
    face the network."""
    if config.auth_dev_mode:
        raise ConfigError(
            "auth.dev_mode",
            "is on, so LM Gate refuses to open a tunnel or listen "
            "on the network; turn dev mode off to go public",
        )


def dump_settings(values: Mapping[str, object]) -> str:
    """TOML text for dotted keys (as the settings window saves them); values are validated."""
    for key, value in sorted(values.items()):
        if is_upstream_key(key):
            _check_upstream_key(key, value)
            continue
        declared = SETTINGS_BY_KEY.get(key)
        if declared is None:
            raise ConfigError(key, "unknown setting")
        try:
            declared.parse(value)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
    return toml_text(values)


def _check_upstream_key(key: str, value: object) -> None:
    name, _, field = key[len(UPSTREAM_PREFIX) :].partition(".")
    declared = UPSTREAM_FIELDS.get(field)
    try:
        check_name(name)
        if declared is None:
            raise ValueError("unknown upstream setting")
        declared.parse(value)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None
