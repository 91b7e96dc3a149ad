"""Whether the configured way of going public can be tried, and the options for the owner.

One place decides what "set up" means for each provider, so the tray's first-run guide, its
Go public and ``serve`` say the same thing; what only an attempt can find out (the agent's
version, a login, Funnel switched on) is said by the provider when it opens.
"""

from __future__ import annotations

from dataclasses import dataclass

from tray_app.config.parsers import TunnelProvider
from tray_app.config.settings import Config
from tray_app.secret_store.base import SecretStore, read_or_none
from tray_app.tunnel.choices import (
    CHOICES,
    CHOICES_BY_PROVIDER,
    COLUMNS,
    NO_ACCOUNT,
    TunnelChoice,
    cells,
    program_found,
)
from tray_app.tunnel.cloudflare import CLOUDFLARE_TUNNEL_TOKEN
from tray_app.tunnel.ngrok import NGROK_AUTHTOKEN

# The one-click choice of the first-run guide, and what to know before taking it.
NO_ACCOUNT_PROVIDER: str = NO_ACCOUNT.value
NO_ACCOUNT_NOTE: str = CHOICES_BY_PROVIDER[NO_ACCOUNT].note
# The comparison as the UI shows it (the UI reaches the tunnel layer only through here).
CHOICE_COLUMNS = COLUMNS
choice_cells = cells

CHOOSE = (
    "Choose how to go public in Settings: a Cloudflare quick tunnel needs no account (only "
    "cloudflared installed), ngrok a free authtoken, Tailscale your tailnet, LAN this network."
)


@dataclass(frozen=True, slots=True)
class ChoiceRow:
    """One way to go public, and whether its agent is on this computer."""

    choice: TunnelChoice
    program_found: bool


def _configured_path(config: Config, choice: TunnelChoice) -> str:
    if choice.path_setting is None:
        return ""
    return str(getattr(config, choice.path_setting.replace(".", "_")))


def choice_rows(config: Config) -> tuple[ChoiceRow, ...]:
    return tuple(
        ChoiceRow(choice, program_found(choice, _configured_path(config, choice)))
        for choice in CHOICES
    )


def missing_setup(config: Config, secrets: SecretStore) -> str | None:
    """What must be done before going public with the configured provider (one sentence), or
    None when it can be tried."""
    provider = TunnelProvider(config.tunnel_provider)  # a plain word from an older caller too
    if provider is TunnelProvider.NONE:
        return CHOOSE
    if provider is TunnelProvider.NGROK and not read_or_none(secrets, NGROK_AUTHTOKEN):
        return "Paste your ngrok authtoken in Settings (or run `lmgate tunnel set-token`)."
    if provider is TunnelProvider.CLOUDFLARE_NAMED:
        missing = []
        if not read_or_none(secrets, CLOUDFLARE_TUNNEL_TOKEN):
            missing.append(
                "paste your Cloudflare tunnel's token in Settings (or run "
                "`lmgate tunnel set-token --provider cloudflare`)"
            )
        if not config.tunnel_cloudflare_hostname:
            missing.append("enter the hostname routed to your Cloudflare tunnel in Settings")
        if missing:
            said = " and ".join(missing)
            return said[0].upper() + said[1:] + "."
    return None
