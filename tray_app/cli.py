"""``lmgate``: the command line. Every expected failure is one line on stderr, never a traceback.

Exit codes: 0 success, 1 runtime failure (LM Gate error), 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets as stdlib_secrets
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import aiohttp

from tray_app import __version__
from tray_app.access_log import configure_logging
from tray_app.auth import MIN_STATIC_KEY_LENGTH, StaticKeyAuthenticator
from tray_app.config import (
    SETTINGS_BY_KEY,
    Config,
    default_config_path,
    describe_settings,
    load_config,
)
from tray_app.errors import ConfigError, LMGateError
from tray_app.gateway import Gateway
from tray_app.secrets import GATEWAY_API_KEY, EnvSecretStore, SecretStore
from tray_app.server import GatewayServer

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

# CLI flag -> dotted config key. Values stay strings so the config validator words the error.
_SERVE_FLAGS: Mapping[str, str] = {
    "host": "server.host",
    "port": "server.port",
    "upstream": "upstream.url",
    "idle_timeout": "upstream.idle_timeout",
    "heartbeat": "streaming.heartbeat_interval",
    "max_body_bytes": "limits.max_body_bytes",
    "log_level": "log.level",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmgate",
        description="Put your local LM Studio on the internet safely: an authenticating, "
        "default-deny gateway in front of its OpenAI-compatible server.",
    )
    parser.add_argument("--version", action="version", version=f"lmgate {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the gateway headless (VPS, Docker, or a terminal)",
        description="Run the gateway in the foreground until Ctrl-C. Settings come from the "
        "config file, then LMGATE_* environment variables, then these flags.",
        epilog="The API key is read from LMGATE_SECRET_GATEWAY_API_KEY; without it a random "
        "key is made for this run and shown once (only on a terminal).",
    )
    serve.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help=f"config file (default: {default_config_path()})",
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", help="port to listen on (default 8787; 0 = any free port)")
    serve.add_argument(
        "--upstream", metavar="URL", help="LM Studio server URL (default http://127.0.0.1:1234)"
    )
    serve.add_argument(
        "--idle-timeout",
        metavar="SECONDS",
        help="how long LM Studio may stay silent before a request fails",
    )
    serve.add_argument(
        "--heartbeat",
        metavar="SECONDS",
        help="SSE keep-alive interval while a prompt is processed (0 = off)",
    )
    serve.add_argument("--max-body-bytes", metavar="N", help="largest accepted request body")
    serve.add_argument(
        "--enable-responses",
        action="store_const",
        const="true",
        help="also forward POST /v1/responses (MCP tools removed)",
    )
    serve.add_argument(
        "--enable-messages",
        action="store_const",
        const="true",
        help="also forward POST /v1/messages (MCP tools removed)",
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    config = commands.add_parser("config", help="show the effective configuration")
    config.add_argument(
        "action",
        choices=["show", "path", "keys"],
        help="show: effective values; path: the config file; keys: every setting",
    )
    config.add_argument("--config", type=Path, metavar="PATH", help="config file to read")
    return parser


def _serve_overrides(args: argparse.Namespace) -> dict[str, object]:
    overrides: dict[str, object] = {key: getattr(args, flag) for flag, key in _SERVE_FLAGS.items()}
    overrides["routes.enable_responses"] = args.enable_responses
    overrides["routes.enable_messages"] = args.enable_messages
    return overrides


def _api_key(store: SecretStore) -> tuple[str, bool]:
    """The configured key, or a fresh one for this run (True when generated)."""
    key = store.get(GATEWAY_API_KEY)
    if key is not None:
        if len(key) < MIN_STATIC_KEY_LENGTH:
            raise ConfigError(
                EnvSecretStore.variable_for(GATEWAY_API_KEY),
                f"the API key must be at least {MIN_STATIC_KEY_LENGTH} characters",
            )
        return key, False
    return "lmg_" + stdlib_secrets.token_urlsafe(32), True


async def _check_lmstudio(gateway: Gateway) -> bool:
    async with aiohttp.ClientSession() as session:
        return await gateway.lmstudio_reachable(session)


async def _serve(config: Config, secret_store: SecretStore, out: IO[str]) -> int:
    key, generated = _api_key(secret_store)
    gateway = Gateway(config, StaticKeyAuthenticator(key), secrets=secret_store)
    server = GatewayServer(gateway)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        reachable = await _check_lmstudio(gateway)
        print(f"LM Gate {__version__} is running.", file=out)
        print(f"Listening on {server.url}  (OpenAI base URL: {server.url}/v1)", file=out)
        if reachable:
            print(f"LM Studio:   {config.upstream_url} is reachable.", file=out)
        else:
            print(
                f"LM Studio:   NOT reachable at {config.upstream_url}. Start its server "
                "(Developer tab -> Start Server, or `lms server start`); requests get 502 "
                "until then.",
                file=out,
            )
        shown_key = "$LMGATE_SECRET_GATEWAY_API_KEY"
        if generated and out.isatty():
            shown_key = key
            print(f"API key:     {key}", file=out)
            print(
                "             (made for this run only; set LMGATE_SECRET_GATEWAY_API_KEY to "
                "keep one)",
                file=out,
            )
        elif generated:
            shown_key = "<key>"
            print(
                "API key:     a random key was made for this run but is not printed because "
                "this is not a terminal; set LMGATE_SECRET_GATEWAY_API_KEY.",
                file=out,
            )
        print(
            f'Try:         curl {server.url}/v1/models -H "Authorization: Bearer {shown_key}"',
            file=out,
        )
        print("Press Ctrl-C to stop.", file=out, flush=True)
        await stop.wait()
        print("Stopping: letting running requests finish...", file=out, flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop()
    print("Stopped.", file=out, flush=True)
    return EXIT_OK


def _config_command(args: argparse.Namespace, out: IO[str]) -> int:
    if args.action == "path":
        print(args.config or default_config_path(), file=out)
        return EXIT_OK
    if args.action == "keys":
        for key, env_var, default, help_text in describe_settings():
            print(f"{key:32} {env_var:40} default {default!r:24} {help_text}", file=out)
        return EXIT_OK
    config = load_config(path=args.config)
    for key, setting in SETTINGS_BY_KEY.items():
        print(f"{key} = {getattr(config, setting.field)!r}", file=out)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = sys.stdout
    try:
        if args.command == "serve":
            config = load_config(path=args.config, overrides=_serve_overrides(args))
            configure_logging(config.log_level)
            return asyncio.run(_serve(config, EnvSecretStore(), out))
        if args.command == "config":
            return _config_command(args, out)
        _parser().print_help(out)
        return EXIT_OK
    except ConfigError as exc:
        print(f"lmgate: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LMGateError as exc:
        print(f"lmgate: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
