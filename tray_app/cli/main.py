"""``lmgate``: the command line. Every expected failure is one line on stderr, never a traceback.

Exit codes: 0 success, 1 runtime failure (LM Gate error), 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import IO

from tray_app import __version__
from tray_app.cli.identity_commands import (
    IDENTITY_COMMANDS,
    add_identity_commands,
    run_identity_command,
)
from tray_app.cli.input_errors import InputError
from tray_app.cli.state_commands import add_state_commands, run_state_command
from tray_app.cli.upstream_commands import add_upstream_commands, run_upstream_command
from tray_app.cli.warm_up import add_warm_up_command, run_warm_up
from tray_app.config.settings import (
    CONFIG_FILE_ENV,
    SETTINGS,
    Config,
    Setting,
    TunnelProvider,
    default_config_path,
    describe_settings,
    format_default,
    load_config,
)
from tray_app.control.assembly import Identity, data_dir, secret_store_for
from tray_app.control.service import (
    FIRST_KEY_NAME,
    GatewayService,
    Started,
    StopKind,
    StopRequests,
)
from tray_app.errors import ConfigError, LMGateError
from tray_app.garbage import settle_after_start
from tray_app.gateway.server.identify import lmgate_listens
from tray_app.gateway.upstream.pool import UpstreamView
from tray_app.gateway.upstream.probe import LMStudioProbe, probe_lmstudio
from tray_app.logs import configure_logging
from tray_app.qr_codes import terminal_qr
from tray_app.secret_store.base import LMSTUDIO_API_TOKEN, read_or_none
from tray_app.tunnel.manager import TunnelManager, TunnelState, TunnelStatus
from tray_app.tunnel.ngrok import NGROK_AUTHTOKEN, check_token_shape

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
BANNER_PROBE_SECONDS = 2.0


# The tray's flags (given before any command) land under their own names: argparse lets a
# subcommand's defaults overwrite what the top level parsed under the same name.
TRAY_PREFIX = "tray_"


def _add_setting_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    common: bool | None,
    prefix: str = "",
) -> None:
    """The flags the settings declare (the common ones, `serve`'s own, or with None all of
    them). A value stays a string, so the setting's parser words the error and names the key."""
    for setting in SETTINGS:
        flag = setting.flag
        if flag is None or (common is not None and flag.common != common):
            continue
        help_text = flag.help or _flag_help(setting)
        dest = prefix + flag.dest
        if flag.switch:
            parser.add_argument(
                flag.name, dest=dest, action="store_const", const="true", help=help_text
            )
        else:
            parser.add_argument(
                flag.name,
                dest=dest,
                # Named after the flag, not its dest (which may carry the tray's prefix).
                metavar=flag.metavar or (None if setting.choices else flag.dest.upper()),
                choices=setting.choices,
                help=help_text,
            )


def _flag_help(setting: Setting) -> str:
    if setting.flag is not None and setting.flag.switch:
        return f"turn on {setting.key}: {setting.help}"
    return f"{setting.help} (default {format_default(getattr(Config(), setting.attribute))})"


def _config_help() -> str:
    return f"config file (default: ${CONFIG_FILE_ENV}, else {default_config_path()})"


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, metavar="PATH", help=_config_help())
    _add_setting_flags(common, common=True)
    return common


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmgate",
        description="Put your local LM Studio on the internet safely: an authenticating, "
        "default-deny gateway in front of its OpenAI-compatible server.",
    )
    parser.add_argument("--version", action="version", version=f"lmgate {__version__}")
    parser.add_argument("--go-public", action="store_true", help="(tray app) go public at once")
    parser.add_argument(
        "--show-qr",
        action="store_true",
        help="(tray app) go public and show the QR code for a phone",
    )
    tray = parser.add_argument_group(
        "settings for this run of the tray app (or of `serve`, without a desktop)",
        "Given before any command; each holds over the config file and LMGATE_* variables, "
        "also after Settings saves.",
    )
    tray.add_argument(
        "--config",
        dest=TRAY_PREFIX + "config",
        type=Path,
        metavar="PATH",
        help=_config_help(),
    )
    _add_setting_flags(tray, common=None, prefix=TRAY_PREFIX)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = _common_options()

    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="run the gateway headless (VPS, Docker, or a terminal)",
        description="Run the gateway in the foreground until Ctrl-C. Settings come from the "
        "config file, then LMGATE_* environment variables, then these flags.",
        epilog="Callers authenticate with an API key (`lmgate key create NAME`), a token "
        "(`lmgate token create NAME`) or a paired device's token (`lmgate pair`).",
    )
    _add_setting_flags(serve, common=False)

    tunnel = commands.add_parser("tunnel", help="tunnel agent tokens and the ngrok agent")
    tunnel_actions = tunnel.add_subparsers(dest="action", metavar="ACTION", required=True)
    token_provider = argparse.ArgumentParser(add_help=False)
    token_provider.add_argument(
        "--provider",
        choices=["ngrok", "cloudflare"],
        default="ngrok",
        help="whose token: ngrok's authtoken (default) or a named Cloudflare tunnel's token",
    )
    tunnel_actions.add_parser(
        "set-token",
        parents=[common, token_provider],
        help="store an agent's token (read from the terminal without echo, or from stdin)",
    )
    tunnel_actions.add_parser(
        "delete-token", parents=[common, token_provider], help="forget an agent's token"
    )
    install_agent = tunnel_actions.add_parser(
        "install-agent",
        parents=[common],
        help="download and install the ngrok agent (asks first)",
        description="Download ngrok's agent for this computer from ngrok's site (or the mirror "
        "in $LMGATE_TUNNEL_NGROK_DOWNLOAD_URL) into pyngrok's location, after saying what "
        "comes from where and asking; the program is proven by its --version first.",
    )
    install_agent.add_argument(
        "--yes", action="store_true", help="do not ask (needed when there is no terminal)"
    )

    # The common flags too: `config show` shows what --data-dir or --secret-store would make.
    config = commands.add_parser(
        "config", parents=[common], help="show the effective configuration"
    )
    config.add_argument(
        "action",
        choices=["show", "path", "keys"],
        help="show: effective values; path: the config file read; keys: every setting",
    )
    config.add_argument(
        "--markdown", action="store_true", help="keys: as the README's Markdown table"
    )

    commands.add_parser(
        "doctor", parents=[common], help="check what LM Gate needs and explain problems"
    )

    check = commands.add_parser("check", help="verify a running LM Gate end to end, from anywhere")
    check.add_argument("url", help="the gateway's address, e.g. https://calm-otter.ngrok-free.app")
    check.add_argument("token", help="an API key or token with the chat and models scopes")

    deploy = commands.add_parser("deploy", help="files for running LM Gate on a server")
    targets = deploy.add_subparsers(dest="target", metavar="TARGET", required=True)
    nginx = targets.add_parser("nginx", help="an nginx site (TLS, SSE-safe) and a systemd unit")
    nginx.add_argument("--domain", required=True, help="the server's domain, e.g. llm.example.com")
    nginx.add_argument("--port", type=int, default=8787, help="LM Gate's local port (8787)")
    nginx.add_argument("--user", default="lmgate", help="the unprivileged user to run as")
    nginx.add_argument("--upstream", default="http://127.0.0.1:1234", help="LM Studio's URL")
    nginx.add_argument("--output", type=Path, default=Path(), help="where to write the files")
    nginx.add_argument("--certificate", default="", help="TLS certificate (default: certbot's)")
    nginx.add_argument("--certificate-key", default="", help="TLS key (default: certbot's)")
    nginx.add_argument("--https-port", type=int, default=443)
    nginx.add_argument("--http-port", type=int, default=80)
    nginx.add_argument(
        "--replica",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="an LM Gate replica nginx spreads requests over (repeat; two or more make a team "
        "gateway sharing PostgreSQL and Redis; default: one on 127.0.0.1:--port)",
    )

    compose = targets.add_parser(
        "compose", help="a Docker Compose project: nginx, N replicas, PostgreSQL and Redis"
    )
    compose.add_argument(
        "--domain", required=True, help="the server's domain, e.g. llm.example.com"
    )
    compose.add_argument(
        "--replicas", type=int, default=2, help="LM Gate replicas behind nginx (1-8; default 2)"
    )
    compose.add_argument(
        "--upstream-url",
        default="http://host.docker.internal:1234",
        help="LM Studio's URL as the containers reach it (default: on the Docker host)",
    )
    compose.add_argument(
        "--image", default="lmgate", help="the LM Gate image (docker build -f packaging/Dockerfile)"
    )
    compose.add_argument(
        "--subnet",
        default="10.87.87.0/27",
        help="the private network of nginx and the replicas (default 10.87.87.0/27)",
    )
    compose.add_argument("--output", type=Path, required=True, help="the project's directory")

    add_identity_commands(commands, common)
    add_warm_up_command(commands, common)
    add_upstream_commands(commands, common)
    add_state_commands(commands, common)
    return parser


def _overrides(args: argparse.Namespace, prefix: str = "") -> dict[str, object]:
    """Dotted keys from the flags this command has; a flag not given is None (no change)."""
    return {
        setting.key: getattr(args, prefix + setting.flag.dest, None)
        for setting in SETTINGS
        if setting.flag is not None
    }


@dataclass(frozen=True)
class TrayLaunch:
    """What `lmgate` without a command asks of the tray app: what to do once it runs, and the
    config file and settings its flags name (None: not given)."""

    wishes: list[str]
    config_path: Path | None = None
    overrides: Mapping[str, object] = field(default_factory=dict)

    @property
    def flags_given(self) -> list[str]:
        """The setting flags given, as typed (for saying they cannot reach a running tray)."""
        named = {s.key: s.flag.name for s in SETTINGS if s.flag is not None}
        given = [named[key] for key, value in self.overrides.items() if value is not None]
        return (["--config"] if self.config_path is not None else []) + given


def _tray_flags_before_a_command(args: argparse.Namespace) -> list[str]:
    """The tray's flags (wishes included) given before a command, which reads none of them."""
    if not args.command:
        return []
    launch = _tray_launch(args)
    return [f"--{wish}" for wish in launch.wishes] + launch.flags_given


def _tray_launch(args: argparse.Namespace) -> TrayLaunch:
    wishes = [w for w, on in (("go-public", args.go_public), ("show-qr", args.show_qr)) if on]
    return TrayLaunch(wishes, getattr(args, TRAY_PREFIX + "config"), _overrides(args, TRAY_PREFIX))


# SIGHUP: the terminal serve ran in was closed; Windows has none.
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


async def _serve(config: Config, out: IO[str]) -> int:
    service = GatewayService(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    requests = StopRequests()

    def on_signal(signum: signal.Signals) -> None:
        # A logout's SIGTERM and SIGHUP are one stop; a second Ctrl-C is a second.
        if requests.signal(signum) is StopKind.AT_ONCE:
            _end_at_once(service, signum, out)
        stop.set()

    # Before the start: a Ctrl-C or SIGTERM while LM Studio is probed (up to 5 s) or the
    # tunnel opens is kept, and stops everything gracefully once the step in progress ends;
    # one before the tunnel's turn skips it.
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        # A key is made (and shown) only for a terminal: journald keeps whatever serve prints.
        started = await service.start(first_key=out.isatty())
        probe = None
        token = None
        if not started.lmstudio_reachable and _any_enabled(config):
            # Asked again only when something is wrong, to say what: down, or wanting a token.
            # (Never a server the owner switched off: nothing is sent there.)
            token = read_or_none(service.secrets, LMSTUDIO_API_TOKEN)
            probe = await probe_lmstudio(
                config.upstream_url, token, within=BANNER_PROBE_SECONDS, list_models=False
            )
        _print_started(
            started, config, service.identity, out, probe, token_stored=token is not None
        )
        settle_after_start()
        if config.tunnel_provider != "none" and not stop.is_set():
            print(f"Going public with {config.tunnel_provider}...", file=out, flush=True)
            manager = await service.go_public(on_change=_status_printer(out))
            _print_public(manager, service.identity, out)
        print("Press Ctrl-C to stop.", file=out, flush=True)
        await stop.wait()
        _say_while_stopping("Stopping: letting running requests finish...", out)
    finally:
        try:
            await service.stop()
        finally:
            # Only now: a second signal during the stop must still reach on_signal (by
            # default SIGTERM would end serve with the agent, in its own session, left behind).
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
    _say_while_stopping("Stopped.", out)
    return EXIT_OK


def _print_upstreams(views: Sequence[UpstreamView], out: IO[str]) -> None:
    """Several upstreams: each one's state after the start's probe, one line each."""
    print(f"Upstreams:   {len(views)}, each probed in the background:", file=out)
    for view in views:
        if view.state == "up":
            said = f"up, {len(view.models)} model(s)"
        elif view.state == "down":
            said = f"DOWN: {view.down_reason}; it gets nothing until it answers"
        else:
            said = view.state
        print(f"             {view.name:<12} {view.url}  {said}", file=out)


def _say_while_stopping(text: str, out: IO[str]) -> None:
    # After SIGHUP the terminal may be gone: writing to it fails, the stop must not.
    with contextlib.suppress(OSError):
        print(text, file=out, flush=True)


def _end_at_once(service: GatewayService, signum: signal.Signals, out: IO[str]) -> None:
    """A second stop signal: running requests are not waited for; the tunnel's agent still
    stops (no signal sent to serve reaches it). Never returns."""
    try:
        _say_while_stopping("Stopping at once: running requests are cut off.", out)
        service.stop_agent_now()
    finally:
        # Not an exception: it would unwind into the stop under way, which waits on.
        os._exit(128 + signum)


def _any_enabled(config: Config) -> bool:
    return any(entry.enabled for entry in config.all_upstreams)


def _print_started(
    started: Started,
    config: Config,
    identity: Identity,
    out: IO[str],
    probe: LMStudioProbe | None = None,
    *,
    token_stored: bool = False,
) -> None:
    url = started.url
    print(f"LM Gate {__version__} is running.", file=out)
    print(f"Listening on {url}  (OpenAI base URL: {url}/v1)", file=out)
    if not _any_enabled(config):
        print(
            "Upstreams:   every one is switched off (enabled = false): requests get 503 "
            "upstream_disabled until one is switched on.",
            file=out,
        )
    elif started.upstreams:
        _print_upstreams(started.upstreams, out)
    elif started.lmstudio_reachable:
        print(f"LM Studio:   {config.upstream_url} is reachable.", file=out)
    elif probe is not None and probe.needs_token:
        said, copy = (
            ("refused the stored token", "the current one")
            if token_stored
            else ("wants a token", "it")
        )
        print(
            f"LM Studio:   {config.upstream_url} {said} (it answered {probe.status}). "
            f"Copy {copy} from LM Studio's Developer tab (Server Settings -> Require "
            "Authentication) and store it with `lmgate secret set lmstudio-api-token`; "
            "requests get 502 until then.",
            file=out,
        )
    else:
        print(
            f"LM Studio:   NOT reachable at {config.upstream_url}. Start its server "
            "(Developer tab -> Start Server, or `lms server start`); requests get 502 "
            "until then.",
            file=out,
        )
    print(f"Data:        {data_dir(config)}", file=out)
    if started.store_problem:
        print(f"Secrets:     {started.store_problem}", file=out)
    if started.key_warning:
        print(f"Warning:     {started.key_warning}", file=out)
    shown_key = "<key>"
    if started.first_key is not None:
        shown_key = started.first_key
        print(f"API key:     {started.first_key}", file=out)
        print(
            f"             (your first key, '{FIRST_KEY_NAME}', with every scope; shown only now)",
            file=out,
        )
    elif not identity.api_keys.list():
        print("API keys:    none yet; create one with `lmgate key create NAME`.", file=out)
    print(
        f'Try:         curl {url}/v1/models -H "Authorization: Bearer {shown_key}"',
        file=out,
    )


def _tunnel_command(args: argparse.Namespace, config: Config, out: IO[str]) -> int:
    from tray_app.errors import TunnelError
    from tray_app.tunnel.cloudflare import (
        CLOUDFLARE_TUNNEL_TOKEN,
        NOTHING_READ,
        check_tunnel_token_shape,
    )

    if args.action == "install-agent":
        return _tunnel_install_agent(args.yes, config, out)
    if args.provider == "cloudflare":
        key, name, check = (
            CLOUDFLARE_TUNNEL_TOKEN,
            "Cloudflare tunnel token",
            check_tunnel_token_shape,
        )
        hostname = config.tunnel_cloudflare_hostname
        next_step = (
            f"`lmgate serve --tunnel cloudflare-named` (tunnel.cloudflare_hostname is {hostname})"
            if hostname
            else "`lmgate serve --tunnel cloudflare-named --cloudflare-hostname HOSTNAME`, "
            "HOSTNAME being the public hostname you routed to the tunnel (or set "
            "tunnel.cloudflare_hostname)"
        )
    else:
        key, name, check = NGROK_AUTHTOKEN, "ngrok authtoken", check_token_shape
        next_step = "`lmgate serve --tunnel ngrok`"
    store = secret_store_for(config)
    if args.action == "delete-token":
        store.delete(key)
        print(f"The {name} was removed.", file=out)
        return EXIT_OK
    at_terminal = sys.stdin.isatty()
    try:
        raw = getpass.getpass(f"{name}: ") if at_terminal else sys.stdin.readline()
    except EOFError:  # Ctrl-D at the prompt: getpass ends no line then
        if at_terminal:
            print(file=sys.stderr)
        raw = ""
    if not raw.strip():
        raise TunnelError(NOTHING_READ)  # nothing stored, nothing deleted
    store.set(key, check(raw))
    print(f"The {name} is stored ({config.secrets_store}). Go public with {next_step}.", file=out)
    return EXIT_OK


def _tunnel_install_agent(assume_yes: bool, config: Config, out: IO[str]) -> int:
    """`lmgate tunnel install-agent`: say what comes from where, ask, install, prove."""
    from tray_app.tunnel.ngrok_agent import find_agent
    from tray_app.tunnel.ngrok_install import (
        BY_HAND,
        default_target,
        install_ngrok_agent,
        ngrok_download_url,
    )

    url, target = ngrok_download_url(config.tunnel_ngrok_download_url), default_target()
    with contextlib.suppress(LMGateError):
        current = find_agent(config.tunnel_ngrok_path)
        print(f"LM Gate already finds ngrok {current.version} at {current.path}.", file=out)
    replacing = " (replacing the one there)" if target.exists() else ""
    print(f"This downloads the ngrok agent from {url}", file=out)
    print(f"and installs it as {target}{replacing}.", file=out)
    if not assume_yes:
        if not sys.stdin.isatty():
            raise InputError(
                "",
                "there is no terminal to ask on, so nothing was downloaded: run "
                f"`lmgate tunnel install-agent --yes` to agree, or {BY_HAND}",
            )
        out.write("Download and install it? [y/N] ")
        out.flush()
        if sys.stdin.readline().strip().lower() not in {"y", "yes"}:
            print("Nothing was downloaded.", file=out)
            return EXIT_FAILURE
    agent = install_ngrok_agent(
        target, download_url=url, on_progress=lambda line: print(line, file=out, flush=True)
    )
    print(f"Installed ngrok {agent.version} at {agent.path}.", file=out)
    try:
        used = find_agent(config.tunnel_ngrok_path)
    except LMGateError:
        used = agent  # a configured tunnel.ngrok_path that is broken says so when it is used
    if used.path != agent.path:
        why = "tunnel.ngrok_path names it" if config.tunnel_ngrok_path else "it is on your PATH"
        print(
            f"LM Gate still uses ngrok {used.version} at {used.path} ({why}): set "
            f"tunnel.ngrok_path to {agent.path} to use the new one.",
            file=out,
        )
    print(
        "Next: `lmgate tunnel set-token` (your authtoken from dashboard.ngrok.com), then "
        "`lmgate serve --tunnel ngrok`.",
        file=out,
    )
    return EXIT_OK


def _print_public(manager: TunnelManager, identity: Identity, out: IO[str]) -> None:
    status = manager.status
    url = status.public_url or ""
    print(f"Public URL:  {url}  (OpenAI base URL: {url}/v1)", file=out)
    if status.warning:
        print(f"Warning:     {status.warning}", file=out)
    if not out.isatty():
        # Anyone who reads this output (journald, a log file) could pair with the code before
        # the phone does; no code is made, so none is left lying about.
        print(
            f"Pair a phone: run `lmgate pair --url {url}` in a terminal (the one-time pairing "
            "code is not written to logs).",
            file=out,
        )
        return
    code, expires = identity.pairing.create_code()
    pairing_url = f"{url}/#{code}"
    print(
        "Pair a phone: scan this QR code (one device, valid "
        f"{round((expires - time.time()) / 60)} minutes; `lmgate pair --url {url}` makes "
        "another):",
        file=out,
    )
    print(terminal_qr(pairing_url), file=out)
    print(f"Pairing URL: {pairing_url}", file=out)


def _status_printer(out: IO[str]) -> Callable[[TunnelStatus], None]:
    shown: list[str] = []  # the public URLs said so far, the current one last

    def show(status: TunnelStatus) -> None:
        if status.state is TunnelState.RECONNECTING:
            print(
                f"Tunnel:      reconnecting (attempt {status.attempt}): {status.message}",
                file=out,
                flush=True,
            )
        elif status.state is TunnelState.PUBLIC and status.streaming is not None:
            # The stream check's figures, published after "public" as a status of its own.
            print(f"Tunnel:      {status.streaming.describe()}", file=out, flush=True)
        elif status.state is TunnelState.PUBLIC:
            url = status.public_url or ""
            if shown and url != shown[-1]:
                # A quick tunnel comes back at a new random URL: the old one, and every phone
                # paired through it, no longer reaches LM Gate.
                print(
                    f"Public URL changed: {url} (the old one no longer works; pair phones again "
                    f"with `lmgate pair --url {url}`)",
                    file=out,
                    flush=True,
                )
            else:
                print(f"Tunnel:      public at {url}", file=out, flush=True)
            shown.append(url)
        elif status.state is TunnelState.FAILED:
            print(f"Tunnel:      failed: {status.message}", file=out, flush=True)

    return show


def _config_command(args: argparse.Namespace, out: IO[str]) -> int:
    if args.action == "path":
        from tray_app.cli.doctor import config_file_in_use

        print(config_file_in_use(args.config), file=out)
        return EXIT_OK
    if args.action == "keys" and args.markdown:
        from tray_app.config.reference import markdown_table

        print(markdown_table(), end="", file=out)
        return EXIT_OK
    if args.action == "keys":
        for key, env_var, default, help_text in describe_settings():
            print(
                f"{key:34} {env_var:42} default {format_default(default)!r:26} {help_text}",
                file=out,
            )
        return EXIT_OK
    config = load_config(path=args.config, overrides=_overrides(args))
    for setting in SETTINGS:
        value = getattr(config, setting.attribute)
        # A kind prints as the word written in the file, not as Python's enum repr.
        shown = str(value) if isinstance(value, StrEnum) else value
        print(f"{setting.key} = {shown!r}", file=out)
    return EXIT_OK


def _no_display() -> bool:
    if sys.platform != "linux" or os.environ.get("QT_QPA_PLATFORM"):
        return False
    return not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _no_tray(launch: TrayLaunch) -> int:
    print("lmgate: this build has no tray app; run `lmgate serve`.", file=sys.stderr)
    return EXIT_FAILURE


def _tray_or_headless(
    args: argparse.Namespace, out: IO[str], run_tray: Callable[[TrayLaunch], int]
) -> int:
    launch = _tray_launch(args)
    if _no_display():
        print(
            "No desktop display here: running headless (`lmgate serve`). "
            "`lmgate --help` lists every command.",
            file=out,
            flush=True,
        )
        config = load_config(path=launch.config_path, overrides=launch.overrides)
        # A plain launch stays private, as the tray does until "Go public"; an explicit
        # --tunnel is a wish to go public too.
        if not launch.wishes and launch.overrides.get("tunnel.provider") is None:
            config = replace(config, tunnel_provider=TunnelProvider.NONE)
        configure_logging(config.log_level, format=config.log_format)
        return _serve_or_say_it_runs(config, out)
    return run_tray(launch)


def _serve_or_say_it_runs(config: Config, out: IO[str]) -> int:
    try:
        return asyncio.run(_serve(config, out))
    except ConfigError as exc:
        # A taken port is no config mistake when LM Gate itself holds it: it runs already.
        host, port = config.server_host, config.server_port
        if exc.key != "server.port" or not asyncio.run(lmgate_listens(host, port)):
            raise
    print(
        f"lmgate: LM Gate is running already on {host}:{port}; stop it before starting "
        "another, or choose another port with --port",
        file=sys.stderr,
    )
    return EXIT_CONFIG


def _takes_a_value() -> frozenset[str]:
    names = {s.flag.name for s in SETTINGS if s.flag is not None and not s.flag.switch}
    return frozenset({"--config", *names})


def _after_the_command(args: argparse.Namespace, argv: Sequence[str]) -> list[str]:
    """What was typed after the command's name, to keep it in the corrected line."""
    valued = _takes_a_value()
    for at, word in enumerate(argv):
        if word == args.command and (at == 0 or argv[at - 1] not in valued):
            return list(argv[at + 1 :])
    return []


def _misplaced_advice(
    args: argparse.Namespace, misplaced: list[str], argv: Sequence[str] | None
) -> str:
    said = f"{' '.join(misplaced)} before `{args.command}` would do nothing"
    launch = _tray_launch(args)
    if args.command == "serve" and not launch.wishes:
        # serve takes every setting flag: the same flags after its name are the fix.
        moved = [] if launch.config_path is None else ["--config", str(launch.config_path)]
        for setting in SETTINGS:
            value = launch.overrides.get(setting.key)
            if setting.flag is None or value is None:
                continue
            moved += [setting.flag.name] if setting.flag.switch else [setting.flag.name, str(value)]
        rest = _after_the_command(args, sys.argv[1:] if argv is None else argv)
        fixed = shlex.join(["lmgate", "serve", *moved, *rest])
        return f"{said} (flags before a command are the tray app's); run `{fixed}`"
    name = " ".join(
        word for word in (args.command, getattr(args, "action", None)) if isinstance(word, str)
    )
    return (
        f"{said}: flags before a command are the tray app's; give them after it "
        f"(`lmgate {name} --help` lists those it takes)"
    )


def main(
    argv: Sequence[str] | None = None, *, run_tray: Callable[[TrayLaunch], int] | None = None
) -> int:
    """Run one ``lmgate`` command. ``run_tray`` starts the tray app when there is a desktop; the
    entry point (:mod:`tray_app.main`) passes it in, so the CLI never imports the UI."""
    run_tray = run_tray or _no_tray
    parser = _parser()
    args = parser.parse_args(argv)
    if misplaced := _tray_flags_before_a_command(args):
        # One line, not argparse's usage screen: the fix is all the person needs.
        print(f"lmgate: {_misplaced_advice(args, misplaced, argv)}", file=sys.stderr)
        return EXIT_CONFIG
    out = sys.stdout
    try:
        if args.command == "serve":
            config = load_config(path=args.config, overrides=_overrides(args))
            configure_logging(config.log_level, format=config.log_format)
            return _serve_or_say_it_runs(config, out)
        if args.command == "config":
            return _config_command(args, out)
        if args.command == "doctor":
            from tray_app.cli.doctor import doctor

            report, ok = doctor(args.config, _overrides(args))
            print(report, file=out)
            return EXIT_OK if ok else EXIT_FAILURE
        if args.command == "check":
            from tray_app.cli.remote_check import check

            report, ok = check(args.url, args.token)
            print(report, file=out)
            return EXIT_OK if ok else EXIT_FAILURE
        if args.command == "deploy" and args.target == "compose":
            from tray_app.cli import deploy_compose

            project = deploy_compose.ComposeDeployment(
                domain=args.domain,
                replicas=args.replicas,
                upstream_url=args.upstream_url,
                image=args.image,
                subnet=args.subnet,
            )
            _, kept = deploy_compose.write(project, args.output)
            print(deploy_compose.instructions(project, args.output, kept), file=out)
            return EXIT_OK
        if args.command == "deploy":
            from tray_app.cli.deploy import Deployment, instructions, write

            deployment = Deployment(
                domain=args.domain,
                port=args.port,
                user=args.user,
                upstream=args.upstream,
                certificate=args.certificate,
                certificate_key=args.certificate_key,
                https_port=args.https_port,
                http_port=args.http_port,
                replicas=tuple(args.replica),
            )
            site, unit = write(deployment, args.output)
            print(instructions(deployment, site, unit), file=out)
            return EXIT_OK
        if args.command == "tunnel":
            config = load_config(path=args.config, overrides=_overrides(args))
            return _tunnel_command(args, config, out)
        if args.command == "upstream":
            return run_upstream_command(args, _overrides(args), out)
        if args.command == "state":
            config = load_config(path=args.config, overrides=_overrides(args))
            return run_state_command(args, config, out)
        if args.command == "warm-up":
            config = load_config(path=args.config, overrides=_overrides(args))
            return run_warm_up(args, config, out)
        if args.command in IDENTITY_COMMANDS:
            config = load_config(path=args.config, overrides=_overrides(args))
            return run_identity_command(args, config, out)
        return _tray_or_headless(args, out, run_tray)
    except InputError as exc:
        print(f"lmgate: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as exc:
        print(f"lmgate: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LMGateError as exc:
        print(f"lmgate: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into something that stopped reading (`| head`): not an error to report.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
