"""The ways to go public, side by side: declared once, shown by Settings, the first-run guide,
``lmgate doctor`` and the README's table (which a test keeps equal to :func:`markdown_table`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tray_app.config.parsers import TunnelProvider


@dataclass(frozen=True, slots=True)
class TunnelChoice:
    provider: TunnelProvider
    title: str
    account: str  # what the owner needs before the first click
    stable_url: str
    https: str
    tls_ends_at: str  # who can read the traffic in the clear, besides this computer
    reach: str
    program: str | None  # the agent it runs, found on PATH or at its setting
    path_setting: str | None
    note: str


CHOICES: tuple[TunnelChoice, ...] = (
    TunnelChoice(
        TunnelProvider.CLOUDFLARE_QUICK,
        "Cloudflare quick tunnel",
        "none",
        "no: a new random URL each time",
        "yes",
        "Cloudflare's edge",
        "anyone with the URL",
        "cloudflared",
        "tunnel.cloudflared_path",
        "for trying things out: no uptime promise, creation can be rate-limited",
    ),
    TunnelChoice(
        TunnelProvider.NGROK,
        "ngrok",
        "a free ngrok account (authtoken)",
        "with a reserved domain",
        "yes",
        "ngrok's edge",
        "anyone with the URL",
        "ngrok",
        "tunnel.ngrok_path",
        "the inspector is off: ngrok records no request",
    ),
    TunnelChoice(
        TunnelProvider.CLOUDFLARE_NAMED,
        "Cloudflare named tunnel",
        "a Cloudflare account, a domain on it and the tunnel's token",
        "yes: your hostname",
        "yes",
        "Cloudflare's edge",
        "anyone with the URL",
        "cloudflared",
        "tunnel.cloudflared_path",
        "route the hostname to http://127.0.0.1:<LM Gate's port> in Cloudflare's dashboard",
    ),
    TunnelChoice(
        TunnelProvider.TAILSCALE_SERVE,
        "Tailscale Serve",
        "Tailscale, signed in, with HTTPS certificates on",
        "yes: machine.tailnet.ts.net",
        "yes, a real certificate",
        "this computer (Tailscale's own certificate)",
        "only your tailnet's devices",
        "tailscale",
        "tunnel.tailscale_path",
        "HTTPS on your own devices: what phone apps want instead of LAN mode",
    ),
    TunnelChoice(
        TunnelProvider.TAILSCALE_FUNNEL,
        "Tailscale Funnel",
        "Tailscale, signed in, with HTTPS and Funnel enabled for the tailnet",
        "yes: machine.tailnet.ts.net",
        "yes, a real certificate",
        "this computer (Tailscale relays encrypted traffic)",
        "anyone with the URL",
        "tailscale",
        "tunnel.tailscale_path",
        "ports 443, 8443 or 10000 only",
    ),
    TunnelChoice(
        TunnelProvider.LAN,
        "LAN",
        "none",
        "while the computer keeps its address",
        "no",
        "nowhere: not encrypted",
        "devices on this network",
        None,
        None,
        "only on a network you trust",
    ),
)

CHOICES_BY_PROVIDER = {choice.provider: choice for choice in CHOICES}
NO_ACCOUNT = TunnelProvider.CLOUDFLARE_QUICK


def program_found(choice: TunnelChoice, configured: str = "") -> bool:
    """Whether the agent ``choice`` needs is there (a cheap look: nothing is run; opening the
    tunnel proves it by its version)."""
    if choice.program is None:
        return True
    if configured:
        path = Path(configured).expanduser()
        return path.is_file() and os.access(path, os.X_OK)
    return shutil.which(choice.program) is not None


# The comparison's columns, in every place that shows it (the README adds the setting's
# word and the agent's name).
COLUMNS = (
    "Go public with",
    "Account needed",
    "Stable URL",
    "HTTPS",
    "TLS ends at",
    "Who can reach it",
)


def cells(choice: TunnelChoice) -> tuple[str, ...]:
    """One row of the comparison, in :data:`COLUMNS`' order."""
    c = choice
    return (c.title, c.account, c.stable_url, c.https, c.tls_ends_at, c.reach)


def markdown_table() -> str:
    """The README's comparison, from the declarations above."""
    title, *rest = COLUMNS
    header = f"| {title} | `tunnel.provider` | " + " | ".join(rest) + " | Agent |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for c in CHOICES:
        agent = f"`{c.program}`" if c.program else "none"
        first, *others = cells(c)
        lines.append(f"| {first} | `{c.provider.value}` | " + " | ".join(others) + f" | {agent} |")
    return "\n".join(lines) + "\n"
