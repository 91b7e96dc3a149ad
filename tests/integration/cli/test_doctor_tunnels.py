"""`lmgate doctor` with a Tailscale provider configured: the real command, the fake `tailscale`
CLI first on PATH, a fake LM Studio answering, so the only thing that can fail is what the
provider itself checks before it goes public (signed in, the daemon, HTTPS certificates,
Funnel, the Funnel port), each with the provider's own sentence."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.fake_lmstudio import FakeLMStudio
from tests.helpers import Env

FAKE_DIR = Path(__file__).resolve().parents[2] / "fake_tailscale"


def doctor(env: Env, tmp_path: Path, lmstudio: FakeLMStudio, **extra: str) -> tuple[int, str]:
    result = env.run(
        "doctor",
        extra={
            "PATH": f"{FAKE_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
            "LMGATE_UPSTREAM_URL": lmstudio.url,
            "LMGATE_SERVER_PORT": "0",
            "XDG_STATE_HOME": str(tmp_path / "state"),
            **extra,
        },
    )
    return result.returncode, result.stdout


def row(out: str, name: str) -> tuple[str, str]:
    found = re.search(rf"^(ok|FAIL)\s+{re.escape(name)}\s+(.*)$", out, re.M)
    assert found, out
    return found.group(1), found.group(2)


FAILING = [
    # (provider, the environment, the provider's sentence)
    (
        "tailscale-funnel",
        {"FAKE_TAILSCALE_STATE": "NeedsLogin"},
        "Tailscale is not signed in on this computer: run `tailscale up` (or sign in from "
        "the Tailscale app), then go public again.",
    ),
    (
        "tailscale-serve",
        {"FAKE_TAILSCALE_STATE": "NoDaemon"},
        "Tailscale's service (tailscaled) is not running on this computer: start the "
        "Tailscale app (or `sudo systemctl start tailscaled`), then go public again.",
    ),
    (
        "tailscale-funnel",
        {"FAKE_TAILSCALE_FUNNEL": "off"},
        "Funnel is not enabled for this tailnet or device: add the `funnel` node attribute "
        "for this device in the access controls (https://login.tailscale.com/admin/acls; see "
        "https://tailscale.com/kb/1223/funnel), with HTTPS certificates on, then go public "
        "again.",
    ),
    (
        "tailscale-serve",
        {"FAKE_TAILSCALE_HTTPS": "off"},
        "HTTPS certificates are off for your tailnet, and Tailscale Serve needs them: enable "
        "them at https://login.tailscale.com/admin/dns, then go public again.",
    ),
    (
        "tailscale-funnel",
        {"LMGATE_TUNNEL_TAILSCALE_HTTPS_PORT": "47443"},
        "Tailscale Funnel serves only on ports 443, 8443, 10000, and "
        "tunnel.tailscale_https_port is 47443: set it to one of those.",
    ),
]


@pytest.mark.parametrize(
    ("provider", "variables", "sentence"),
    FAILING,
    ids=["signed-out", "no-daemon", "funnel-off", "https-off", "funnel-port"],
)
def test_doctor_fails_a_tailscale_setup_that_cannot_go_public(
    provider: str,
    variables: dict[str, str],
    sentence: str,
    env: Env,
    tmp_path: Path,
    lmstudio_thread: FakeLMStudio,
) -> None:
    code, out = doctor(env, tmp_path, lmstudio_thread, LMGATE_TUNNEL_PROVIDER=provider, **variables)
    assert (code, row(out, "Tailscale")) == (1, ("FAIL", sentence)), out
    assert row(out, "tailscale agent")[0] == "ok"
    assert out.rstrip().endswith("1 check(s) failed."), out
    assert "login.tailscale.com/a/" not in out, "the sign-in link is not shown"


@pytest.mark.parametrize(
    ("provider", "detail"),
    [
        (
            "tailscale-serve",
            "laptop.tail1234.ts.net: signed in, HTTPS certificates on; Serve (your tailnet "
            "only) will serve https://laptop.tail1234.ts.net",
        ),
        (
            "tailscale-funnel",
            "laptop.tail1234.ts.net: signed in, HTTPS certificates and Funnel on; Funnel "
            "(public) will serve https://laptop.tail1234.ts.net",
        ),
    ],
    ids=["serve", "funnel"],
)
def test_doctor_passes_a_tailscale_setup_that_can_and_names_the_machine(
    provider: str, detail: str, env: Env, tmp_path: Path, lmstudio_thread: FakeLMStudio
) -> None:
    code, out = doctor(
        env,
        tmp_path,
        lmstudio_thread,
        LMGATE_TUNNEL_PROVIDER=provider,
        FAKE_TAILSCALE_DNS_NAME="laptop.tail1234.ts.net.",
    )
    assert (code, row(out, "Tailscale")) == (0, ("ok", detail)), out
    assert "All checks passed." in out


def test_doctor_names_a_funnel_port_other_than_443(
    env: Env, tmp_path: Path, lmstudio_thread: FakeLMStudio
) -> None:
    code, out = doctor(
        env,
        tmp_path,
        lmstudio_thread,
        LMGATE_TUNNEL_PROVIDER="tailscale-funnel",
        LMGATE_TUNNEL_TAILSCALE_HTTPS_PORT="8443",
    )
    assert (code, row(out, "Tailscale")[0]) == (0, "ok"), out
    assert row(out, "Tailscale")[1].endswith("will serve https://localhost:8443"), out


def test_doctor_asks_nothing_of_tailscale_for_another_provider(
    env: Env, tmp_path: Path, lmstudio_thread: FakeLMStudio
) -> None:
    code, out = doctor(
        env,
        tmp_path,
        lmstudio_thread,
        LMGATE_TUNNEL_PROVIDER="lan",
        FAKE_TAILSCALE_STATE="NeedsLogin",
    )
    assert (code, "Tailscale" in out) == (0, False), out
