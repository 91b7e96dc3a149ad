"""Choosing and starting the tunnel provider that `serve` (and later the tray) goes public with."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from tray_app.config.parsers import TunnelProvider as TunnelKind
from tray_app.config.settings import Config, ensure_public_exposure_allowed
from tray_app.errors import TunnelError
from tray_app.gateway.app import Gateway
from tray_app.gateway.server.runner import GatewayServer
from tray_app.secret_store.base import SecretStore
from tray_app.tunnel.cloudflare import CloudflareProvider
from tray_app.tunnel.lan import LanProvider
from tray_app.tunnel.manager import (
    StatusListener,
    TunnelManager,
    TunnelProvider,
    TunnelState,
    TunnelStatus,
)
from tray_app.tunnel.ngrok import NgrokProvider, silence_pyngrok_logs
from tray_app.tunnel.tailscale import TailscaleProvider

_CLOSED = frozenset({TunnelState.STOPPED, TunnelState.FAILED, TunnelState.RECONNECTING})


class GatewayFollower:
    """Keeps the gateway told which tunnel runs: only then may requests be addressed to its
    public host, and only then is its agent believed about the client's address.

    It is the manager's first status listener, so it runs on the loop thread, as the gateway
    requires; stopping, failing and reconnecting (no agent runs then) all withdraw the trust.
    """

    def __init__(self, gateway: Gateway, forwarded_header: str | None) -> None:
        self._gateway = gateway
        self._header = forwarded_header

    def status(self, status: TunnelStatus) -> None:
        if status.state is TunnelState.PUBLIC and status.public_url:
            self._gateway.tunnel_opened(status.public_url, self._header)
        elif status.state in _CLOSED:
            self._gateway.tunnel_closed()


class AgentProvider(TunnelProvider, Protocol):
    """A provider that runs an agent process of ours, which a PID file names."""

    def stop_stale_agent(self) -> bool: ...


def make_provider(
    config: Config, server: GatewayServer, secrets: SecretStore, state_dir: Path
) -> TunnelProvider:
    if config.tunnel_provider == "lan":
        return LanProvider(server, address=config.tunnel_lan_address, port=config.tunnel_lan_port)
    if config.tunnel_provider == "ngrok":
        silence_pyngrok_logs()
    provider = _agent_provider(config, secrets, state_dir)
    if provider is None:
        raise TunnelError(f"unknown tunnel provider {config.tunnel_provider!r}")
    return provider


def _agent_provider(config: Config, secrets: SecretStore, state_dir: Path) -> AgentProvider | None:
    """The configured provider if it runs an agent; None for LAN and none."""
    kind = TunnelKind(config.tunnel_provider)  # a plain word from an older caller too
    if kind is TunnelKind.NGROK:
        return _ngrok_provider(config, secrets, state_dir)
    if kind in {TunnelKind.CLOUDFLARE_QUICK, TunnelKind.CLOUDFLARE_NAMED}:
        return CloudflareProvider(
            secrets,
            state_dir / "cloudflared",
            named=kind is TunnelKind.CLOUDFLARE_NAMED,
            agent_path=config.tunnel_cloudflared_path,
            hostname=config.tunnel_cloudflare_hostname,
        )
    if kind in {TunnelKind.TAILSCALE_SERVE, TunnelKind.TAILSCALE_FUNNEL}:
        return TailscaleProvider(
            state_dir / "tailscale",
            funnel=kind is TunnelKind.TAILSCALE_FUNNEL,
            agent_path=config.tunnel_tailscale_path,
            https_port=config.tunnel_tailscale_https_port,
        )
    return None


def _ngrok_provider(config: Config, secrets: SecretStore, state_dir: Path) -> NgrokProvider:
    return NgrokProvider(
        secrets,
        state_dir / "ngrok",
        ngrok_path=config.tunnel_ngrok_path,
        domain=config.tunnel_ngrok_domain,
        region=config.tunnel_ngrok_region,
    )


# How long the URL may take to answer once the agent says it is open: Tailscale fetches the
# machine's certificate on the first HTTPS connection, which can take most of a minute.
VERIFY_SECONDS = 20.0
FIRST_CERTIFICATE_SECONDS = 60.0
LONGEST_VERIFY = max(VERIFY_SECONDS, FIRST_CERTIFICATE_SECONDS)


def verify_seconds(config: Config) -> float:
    if config.tunnel_provider in {TunnelKind.TAILSCALE_SERVE, TunnelKind.TAILSCALE_FUNNEL}:
        return FIRST_CERTIFICATE_SECONDS
    return VERIFY_SECONDS


def stop_agent_now(config: Config, secrets: SecretStore, state_dir: Path) -> bool:
    """Stop the tunnel agent that ``config`` runs from ``state_dir``, from any thread and
    whatever its orderly close is doing: by its PID file, as a crash's leftover is stopped at
    the next start. For a second stop signal, which ends LM Gate without waiting; True if an
    agent was stopped."""
    provider = _agent_provider(config, secrets, state_dir)
    if provider is None:
        return False
    stopped = provider.stop_stale_agent()
    if isinstance(provider, NgrokProvider):
        # The authtoken's only copy outside the secret store goes with the agent, as on a close.
        provider.config_path.unlink(missing_ok=True)
    return stopped


def tunnel_manager(
    provider: TunnelProvider,
    server: GatewayServer,
    on_change: StatusListener | None = None,
    **options: Any,
) -> TunnelManager:
    """A manager for ``provider`` that keeps ``server``'s gateway told which tunnel runs, and
    checks after each open, with the gateway's own probe token, that its URL streams."""
    # Imported here: nothing else in this module needs them.
    from functools import partial

    from tray_app.tunnel.stream_check import check_stream

    if server.port is None:
        raise TunnelError("the gateway is not running")
    options.setdefault(
        "stream_check", partial(check_stream, token=server.gateway.stream_probe_token)
    )
    follower = GatewayFollower(server.gateway, provider.forwarded_header)
    manager = TunnelManager(
        provider,
        server.port,
        on_change=follower.status,
        **options,
    )
    if on_change is not None:
        # After the follower: whoever is told "public" may rely on the gateway knowing it.
        manager.add_listener(on_change)
    return manager


async def go_public(
    config: Config,
    server: GatewayServer,
    secrets: SecretStore,
    state_dir: Path,
    on_change: StatusListener | None = None,
) -> TunnelManager:
    """Open and prove the public URL. Refuses (fail closed) while dev mode is on."""
    ensure_public_exposure_allowed(config)
    if server.port is None:
        raise TunnelError("the gateway is not running")
    provider = make_provider(config, server, secrets, state_dir)
    manager = tunnel_manager(
        provider,
        server,
        on_change,
        health_interval=config.tunnel_health_interval,
        verify_timeout=verify_seconds(config),
    )
    await manager.start()
    return manager
