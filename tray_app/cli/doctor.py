"""``lmgate doctor``: checks what LM Gate needs and says, for each, what is wrong and how to fix it.

Exit code 0 only when every check passes (a check that does not apply — ngrok in LAN mode —
passes with a note).
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tray_app.config.parsers import TunnelProvider
from tray_app.config.settings import (
    CONFIG_FILE_ENV,
    Config,
    default_config_path,
    load_config,
)
from tray_app.config.upstreams import (
    LOCAL,
    TOKEN_SECRET_PREFIX,
    UpstreamEntry,
    token_secret_name,
)
from tray_app.control.assembly import data_dir, secret_store_for
from tray_app.errors import ConfigError, SecretStoreError, TunnelError
from tray_app.gateway.server.identify import lmgate_listens
from tray_app.gateway.server.runner import port_is_free
from tray_app.gateway.upstream.probe import probe_lmstudio
from tray_app.paths import user_log_dir
from tray_app.secret_store.base import (
    LMSTUDIO_API_TOKEN,
    ListingSecretStore,
    SecretStore,
    read_or_none,
)
from tray_app.secret_store.keyring_store import FileSecretStore, KeyringSecretStore
from tray_app.secret_store.upstream_tokens import TokenRead, read_token
from tray_app.tunnel.agent_binary import Agent
from tray_app.tunnel.agent_binary import find_agent as find_tunnel_agent
from tray_app.tunnel.cloudflare import (
    CLOUDFLARE_TUNNEL_TOKEN,
    CLOUDFLARED,
    check_tunnel_token_shape,
)
from tray_app.tunnel.ngrok import NGROK_AUTHTOKEN, check_token_shape
from tray_app.tunnel.ngrok_agent import SHIM, candidates, find_agent, is_pyngrok_shim
from tray_app.tunnel.tailscale import TAILSCALE, check_ready, public_url

PROBE_SECONDS = 5.0
MAX_CLOCK_SKEW = 120.0  # tokens carry times; a clock this far off breaks them
EARLIEST_SANE = 1_735_689_600  # 2025-01-01: a clock before this is surely wrong
LEFT_TOKENS = "removed upstreams' tokens"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


def log_dir() -> Path:
    return user_log_dir()


def config_file_in_use(path: Path | None) -> Path:
    """The file load_config reads: the flag's, else $LMGATE_CONFIG's, else the default."""
    if path is not None:
        return path
    named = os.environ.get(CONFIG_FILE_ENV)
    return Path(named) if named else default_config_path()


def _config(
    path: Path | None, overrides: Mapping[str, object] | None
) -> tuple[Check, Config | None]:
    where = config_file_in_use(path)
    try:
        config = load_config(path=path, overrides=overrides)
    except ConfigError as exc:
        return Check("config file", False, f"{exc} — fix it in {where}"), None
    exists = "found" if where.exists() else "none yet (defaults apply)"
    return Check("config file", True, f"{where}: {exists}, valid"), config


def _secrets(config: Config) -> tuple[Check, SecretStore | None]:
    try:
        store = secret_store_for(config)
    except SecretStoreError as exc:
        return Check("secret store", False, str(exc)), None
    if isinstance(store, KeyringSecretStore):
        where = store.backend_name
    elif isinstance(store, FileSecretStore):
        where = f"private files in {store.directory}"
    else:
        where = "LMGATE_SECRET_* environment variables"
    return Check("secret store", True, f"{config.secrets_store}: {where}"), store


async def _lmstudio(config: Config, store: SecretStore | None) -> list[Check]:
    token = read_or_none(store, LMSTUDIO_API_TOKEN)
    url = config.upstream_url
    if not config.all_upstreams[0].enabled:
        return [Check("LM Studio", True, f"{url}: disabled ([upstreams.local]), not asked")]
    probe = await probe_lmstudio(url, token, within=PROBE_SECONDS, identify=True)
    if not probe.answered:
        return [
            Check(
                "LM Studio",
                False,
                f"not reachable at {url} ({probe.reason}): start "
                "its server (Developer tab → Start Server, or `lms server start`) or fix "
                "upstream.url",
            )
        ]
    if probe.needs_token:
        return [
            Check(
                "LM Studio",
                False,
                f"{url} requires an API token and "
                + ("the stored one was refused" if token else "none is stored")
                + ": `lmgate secret set lmstudio-api-token`",
            )
        ]
    if probe.models is None:
        return [Check("LM Studio", False, f"{url}/v1/models answered {probe.status}")]
    version = f"version {probe.version} or newer" if probe.version else "version unknown"
    auth = "with LM Gate's token" if token else "no token needed"
    models = probe.models
    return [
        Check("LM Studio", True, f"reachable at {url}, {version}, {auth}"),
        Check(
            "models",
            bool(models),
            ", ".join(models) if models else "LM Studio offers no model: download or load one",
        ),
        _clock(probe.date),
    ]


async def _other_upstreams(config: Config, store: SecretStore | None) -> list[Check]:
    """One line for each upstream besides the local one (which the checks above cover), all
    asked at once, each with its own token: a slow machine delays no other's line."""
    others = [entry for entry in config.all_upstreams if entry.name != LOCAL]
    return list(await asyncio.gather(*(_upstream(entry, store) for entry in others)))


async def _upstream(entry: UpstreamEntry, store: SecretStore | None) -> Check:
    name, url = f"upstream {entry.name}", entry.url
    if not entry.enabled:
        return Check(name, True, f"{url}: disabled, not asked")
    read = _token_read(store, entry)
    if read.refused is not None:
        return Check(name, False, read.refused)
    token = read.token
    probe = await probe_lmstudio(url, token, within=PROBE_SECONDS)
    if not probe.answered:
        return Check(
            name,
            False,
            f"not reachable at {url} ({probe.reason}): start its server or fix "
            f"upstreams.{entry.name}.url",
        )
    if probe.needs_token:
        why = "the stored token was refused" if token else "it requires an API token"
        return Check(
            name,
            False,
            f"{url}: {why} ({probe.status}): `lmgate secret set {token_secret_name(entry.name)}`",
        )
    if probe.models is None:
        return Check(name, False, f"{url}/v1/models answered {probe.status}")
    if not probe.models:
        return Check(name, False, f"reachable at {url}, but it offers no model: load one there")
    count = len(probe.models)
    return Check(name, True, f"reachable at {url}, {count} model{'' if count == 1 else 's'}")


def _token_read(store: SecretStore | None, entry: UpstreamEntry) -> TokenRead:
    if store is None:
        return TokenRead(None)
    try:
        return read_token(store, entry.name, entry.url)
    except SecretStoreError:
        return TokenRead(None)


def _left_tokens(config: Config, store: SecretStore | None) -> list[Check]:
    """Tokens of upstreams no longer configured (a table removed by hand): each is bound to
    its server, so none is sent elsewhere, but the owner should know they are there."""
    if store is None:
        return []
    if not isinstance(store, ListingSecretStore):
        return [
            Check(
                LEFT_TOKENS,
                True,
                "not checked for tokens of removed upstreams: the OS keyring cannot list "
                "its entries",
            )
        ]
    try:
        names = store.names()
    except (OSError, SecretStoreError) as exc:
        return [Check(LEFT_TOKENS, True, f"not checked: the store cannot be listed ({exc})")]
    configured = {entry.name for entry in config.all_upstreams}
    left = [
        name
        for name in names
        if name.startswith(TOKEN_SECRET_PREFIX)
        and name.removeprefix(TOKEN_SECRET_PREFIX) not in configured
    ]
    if not left:
        return []  # the common case: no line for it
    deletes = " and ".join(f"`lmgate secret delete {name}`" for name in left)
    return [
        Check(
            LEFT_TOKENS,
            False,
            f"{', '.join(left)} belong{'s' if len(left) == 1 else ''} to no configured "
            f"upstream (a table removed by hand?): {deletes}",
        )
    ]


def _clock(date_header: str | None) -> Check:
    now = time.time()
    if now < EARLIEST_SANE:
        return Check("clock", False, "this computer's clock is in the past; set the date")
    if not date_header:
        return Check("clock", True, "plausible (no second clock to compare with)")
    try:
        other = email.utils.parsedate_to_datetime(date_header).timestamp()
    except (TypeError, ValueError):
        return Check("clock", True, "plausible (LM Studio's Date header was unreadable)")
    skew = now - other
    if abs(skew) > MAX_CLOCK_SKEW:
        return Check(
            "clock",
            False,
            f"differs from LM Studio's by {skew:+.0f} s; tokens may be "
            "refused: turn on automatic time",
        )
    return Check("clock", True, f"agrees with LM Studio's within {abs(skew):.0f} s")


def _ngrok(config: Config, store: SecretStore | None) -> list[Check]:
    used = config.tunnel_provider == "ngrok"
    try:
        # Runs only a candidate that is not pyngrok's downloader, and only with --version.
        agent = find_agent(config.tunnel_ngrok_path)
    except TunnelError as exc:
        if not used:
            # How to install a program no one needs now is noise on a passing row; that the
            # `ngrok` on PATH is pyngrok's downloader is worth knowing before going public.
            note = f"not needed (tunnel.provider is {config.tunnel_provider})"
            shims = [str(path) for path in candidates() if is_pyngrok_shim(path)]
            if shims:
                note += f": {', '.join(shims)} is {SHIM}, not the agent"
            return [Check("ngrok agent", True, note)]
        return [Check("ngrok agent", False, str(exc))]
    checks = [Check("ngrok agent", True, f"{agent.path}: ngrok version {agent.version}")]
    token = read_or_none(store, NGROK_AUTHTOKEN)
    if token is None:
        checks.append(
            Check(
                "ngrok authtoken",
                not used,
                "not set: `lmgate tunnel set-token`" + ("" if used else " (not needed now)"),
            )
        )
    else:
        try:
            check_token_shape(token)
            checks.append(Check("ngrok authtoken", True, "stored, well-formed"))
        except TunnelError as exc:
            checks.append(Check("ngrok authtoken", False, str(exc)))
    return checks


# The agents other than ngrok's, by the providers that run them: proven only when used (a
# program no one needs now is noise on a passing row).
_AGENTS = {
    TunnelProvider.CLOUDFLARE_QUICK: (CLOUDFLARED, "tunnel_cloudflared_path"),
    TunnelProvider.CLOUDFLARE_NAMED: (CLOUDFLARED, "tunnel_cloudflared_path"),
    TunnelProvider.TAILSCALE_SERVE: (TAILSCALE, "tunnel_tailscale_path"),
    TunnelProvider.TAILSCALE_FUNNEL: (TAILSCALE, "tunnel_tailscale_path"),
}


def _tunnel_agent(config: Config, store: SecretStore | None) -> list[Check]:
    """The configured provider's agent (proven by its version, never downloaded) and what
    else it needs before going public."""
    used = _AGENTS.get(config.tunnel_provider)
    if used is None:
        return []
    kind, attribute = used
    name = f"{kind.program} agent"
    try:
        agent = find_tunnel_agent(kind, str(getattr(config, attribute)))
    except TunnelError as exc:
        return [Check(name, False, str(exc))]
    checks = [Check(name, True, f"{agent.path}: {kind.program} {agent.version}")]
    if kind is TAILSCALE:
        checks.append(_tailscale(config, agent))
    if config.tunnel_provider == TunnelProvider.CLOUDFLARE_NAMED:
        token = read_or_none(store, CLOUDFLARE_TUNNEL_TOKEN)
        if token is None:
            detail = "not set: `lmgate tunnel set-token --provider cloudflare`"
            checks.append(Check("Cloudflare tunnel token", False, detail))
        else:
            try:
                check_tunnel_token_shape(token)
                checks.append(Check("Cloudflare tunnel token", True, "stored, well-formed"))
            except TunnelError as exc:
                checks.append(Check("Cloudflare tunnel token", False, str(exc)))
        hostname = config.tunnel_cloudflare_hostname
        checks.append(
            Check(
                "Cloudflare hostname",
                bool(hostname),
                hostname or "not set: set tunnel.cloudflare_hostname to your tunnel's hostname",
            )
        )
    return checks


def _tailscale(config: Config, agent: Agent) -> Check:
    """What the Tailscale provider checks before it runs the CLI (signed in, MagicDNS, HTTPS
    certificates, Funnel, the port), with its own sentence."""
    funnel = config.tunnel_provider == TunnelProvider.TAILSCALE_FUNNEL
    port = config.tunnel_tailscale_https_port
    try:
        name = check_ready(agent, funnel=funnel, https_port=port)
    except TunnelError as exc:
        return Check("Tailscale", False, str(exc))
    enabled = "HTTPS certificates and Funnel" if funnel else "HTTPS certificates"
    verb = "Funnel (public)" if funnel else "Serve (your tailnet only)"
    return Check(
        "Tailscale",
        True,
        f"{name}: signed in, {enabled} on; {verb} will serve {public_url('https', name, port)}",
    )


async def _port(config: Config) -> Check:
    if config.server_port == 0:
        return Check("port", True, "any free port (server.port = 0)")
    if port_is_free(config.server_host, config.server_port):
        return Check("port", True, f"{config.server_host}:{config.server_port} is free")
    if await lmgate_listens(config.server_host, config.server_port):
        return Check(
            "port",
            True,
            f"{config.server_host}:{config.server_port} is LM Gate's: it is running already "
            "(stop it before starting another, or set server.port)",
        )
    return Check(
        "port",
        False,
        f"{config.server_host}:{config.server_port} is in use (another "
        "LM Gate, or another program): stop it or set server.port",
    )


def _places(config: Config) -> Check:
    places = {"data": data_dir(config), "logs": log_dir()}
    for name, place in places.items():
        try:
            place.mkdir(parents=True, exist_ok=True)
            probe = place / ".lmgate-doctor"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            return Check("data and logs", False, f"{name} directory {place}: {exc.strerror}")
    return Check("data and logs", True, f"data {places['data']}, logs {places['logs']}")


async def run_checks(
    config_path: Path | None = None, overrides: Mapping[str, object] | None = None
) -> list[Check]:
    first, config = _config(config_path, overrides)
    if config is None:
        return [first]
    secrets_check, store = _secrets(config)
    return [
        first,
        secrets_check,
        *(await _lmstudio(config, store)),
        *(await _other_upstreams(config, store)),
        *_left_tokens(config, store),
        *_ngrok(config, store),
        *_tunnel_agent(config, store),
        await _port(config),
        _places(config),
    ]


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'ok  ' if c.ok else 'FAIL'}  {c.name.ljust(width)}  {c.detail}" for c in checks]
    failed = sum(not c.ok for c in checks)
    lines.append("")
    lines.append("All checks passed." if not failed else f"{failed} check(s) failed.")
    return "\n".join(lines)


def doctor(
    config_path: Path | None = None, overrides: Mapping[str, object] | None = None
) -> tuple[str, bool]:
    """``overrides``: dotted keys from the command line (``--data-dir``, ``--secret-store``)."""
    checks = asyncio.run(run_checks(config_path, overrides))
    return render(checks), all(c.ok for c in checks)
