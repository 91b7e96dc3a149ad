"""Choosing and starting the tunnel provider that `serve` (and later the tray) goes public with."""

from __future__ import annotations

from pathlib import Path

from tray_app.config import Config, ensure_public_exposure_allowed
from tray_app.errors import TunnelError
from tray_app.lan_provider import LanProvider
from tray_app.ngrok_provider import NgrokProvider, silence_pyngrok_logs
from tray_app.secrets import SecretStore
from tray_app.server import GatewayServer
from tray_app.tunnels import StatusListener, TunnelManager, TunnelProvider


def make_provider(
    config: Config, server: GatewayServer, secrets: SecretStore, state_dir: Path
) -> TunnelProvider:
    if config.tunnel_provider == "ngrok":
        silence_pyngrok_logs()
        return NgrokProvider(
            secrets,
            state_dir / "ngrok",
            ngrok_path=config.ngrok_path,
            domain=config.ngrok_domain,
            region=config.ngrok_region,
        )
    if config.tunnel_provider == "lan":
        return LanProvider(server, address=config.lan_address, port=config.lan_port)
    raise TunnelError(f"unknown tunnel provider {config.tunnel_provider!r}")


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
    manager = TunnelManager(
        provider, server.port, on_change=on_change, health_interval=config.tunnel_health_interval
    )
    await manager.start()
    return manager
