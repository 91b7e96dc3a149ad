"""``lmgate upstream list|add|remove|test``: the model servers behind the gateway.

They live in the config file (``[upstreams.NAME]`` tables, see config.upstreams), so these
commands edit that file, through the same parsers as every other setting; an upstream's API
token goes to the secret store, read from stdin (never argv, where any user can see it). A
running gateway reads the file when it starts: the commands say so.

Exit codes: 0 done, 1 a test found an upstream down, 2 a bad name, URL or value.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

from tray_app.cli.doctor import config_file_in_use
from tray_app.clock import SystemClock
from tray_app.config.settings import Config, load_config
from tray_app.config.upstream_edit import ensure_new_server, ensure_unused, new_entry
from tray_app.config.upstreams import WEIGHT_MAX, token_secret_name
from tray_app.control.assembly import secret_store_for
from tray_app.control.upstream_changes import add_with_token, remove_with_token
from tray_app.errors import ConfigError, SecretStoreError
from tray_app.gateway.upstream.health import probe_once
from tray_app.gateway.upstream.pool import UpstreamSpec
from tray_app.logs import printable_list
from tray_app.secret_store.base import SecretStore, read_or_none
from tray_app.secret_store.upstream_tokens import TokenRead, read_token

EXIT_OK = 0
EXIT_DOWN = 1
EXIT_INPUT = 2
RESTART_NOTE = "A running LM Gate uses it after a restart."


def add_upstream_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    upstream = commands.add_parser(
        "upstream",
        help="the model servers behind LM Gate (list, add, remove, test)",
        description="Several machines behind one LM Gate: each upstream is an OpenAI-compatible "
        "server (LM Studio, llama.cpp, Ollama, vLLM). upstream.url is the one named 'local'.",
    )
    actions = upstream.add_subparsers(dest="upstream_command", required=True)
    actions.add_parser("list", parents=[common], help="the upstreams in the config file")
    add = actions.add_parser("add", parents=[common], help="add an upstream")
    add.add_argument("name", metavar="NAME", help="1-31 of a-z, 0-9 and '-'")
    add.add_argument("url", metavar="URL", help="the server's root URL, like http://10.0.0.5:1234")
    add.add_argument(
        "--weight", type=int, default=1, help=f"1-{WEIGHT_MAX}: preferred among equally busy"
    )
    add.add_argument("--disabled", action="store_true", help="configured, sent nothing")
    add.add_argument(
        "--token-stdin",
        action="store_true",
        help="read its API token from stdin (asked for on a terminal) into the secret store",
    )
    remove = actions.add_parser("remove", parents=[common], help="remove an upstream")
    remove.add_argument("name", metavar="NAME")
    test = actions.add_parser("test", parents=[common], help="ask each upstream now")
    test.add_argument("name", metavar="NAME", nargs="?", help="only this one")


def run_upstream_command(
    args: argparse.Namespace, overrides: Mapping[str, object], out: IO[str]
) -> int:
    """``overrides``: the common flags (--secret-store, --data-dir), as every command takes
    them; the file edited is the one they and $LMGATE_CONFIG name."""
    path = config_file_in_use(args.config)

    def load() -> Config:
        return load_config(path=path, overrides=overrides)

    try:
        if args.upstream_command == "list":
            return _list(load(), out)
        if args.upstream_command == "add":
            return _add(args, path, load, out)
        if args.upstream_command == "remove":
            return _remove(args.name, path, load, out)
        return asyncio.run(_test(load(), args.name, out))
    except (ConfigError, ValueError) as exc:
        print(f"lmgate: {exc}", file=sys.stderr)
        return EXIT_INPUT


def _list(config: Config, out: IO[str]) -> int:
    store = _store_or_none(config)
    print(f"{'NAME':<16} {'URL':<36} {'WEIGHT':>6}  {'ENABLED':<7}  TOKEN", file=out)
    for entry in config.all_upstreams:
        token = "?" if store is None else _token_word(store, entry.name)
        print(
            f"{entry.name:<16} {entry.url:<36} {entry.weight:>6}  "
            f"{'yes' if entry.enabled else 'no':<7}  {token}",
            file=out,
        )
    return EXIT_OK


def _add(args: argparse.Namespace, path: Path, load: Callable[[], Config], out: IO[str]) -> int:
    entry = new_entry(args.name, args.url, args.weight, not args.disabled)
    ensure_unused(path, entry.name)
    config = load()  # the file is valid before it is changed
    ensure_new_server(entry, config.all_upstreams)
    token = _read_token(entry.name) if args.token_stdin else None
    # A token needs a store that works (it raises, saying why); without one, any store.
    store = secret_store_for(config) if token else _store_or_none(config)
    forgot = add_with_token(path, entry, config.all_upstreams, store, token)
    said = f"Added upstream {entry.name} at {entry.url}"
    print(f"{said}{' with its token' if token else ''}. {RESTART_NOTE}", file=out)
    if forgot:
        secret = token_secret_name(entry.name)
        print(
            f"A token stored earlier as {secret} was deleted: it may be another machine's. "
            f"Give this one's with --token-stdin or `lmgate secret set {secret}`.",
            file=out,
        )
    return EXIT_OK


def _remove(name: str, path: Path, load: Callable[[], Config], out: IO[str]) -> int:
    store = _store_or_none(load())
    had_token = remove_with_token(path, name, store)
    print(
        f"Removed upstream {name}{' and its token' if had_token else ''}. {RESTART_NOTE}",
        file=out,
    )
    secret = token_secret_name(name)
    if store is None or read_or_none(store, secret) is not None:
        # A token left behind would be sent to whatever machine takes the name next, were it
        # not bound to its server: still, the owner should not have to find it by chance.
        why = "the secret store could not be opened" if store is None else "it could not be deleted"
        print(
            f"Warning: {why}, so a token stored as {secret}, if any, was kept; delete it with "
            f"`lmgate secret delete {secret}` once the store works.",
            file=sys.stderr,
        )
    return EXIT_OK


async def _test(config: Config, only: str | None, out: IO[str]) -> int:
    entries = [e for e in config.all_upstreams if only is None or e.name == only]
    if not entries:
        raise ValueError(f"no upstream is named {only!r} (`lmgate upstream list` shows them)")
    store = _store_or_none(config)
    specs = [UpstreamSpec(e.name, e.url, e.weight, True) for e in entries]
    reads = {e.name: _token_read(store, e.name, e.url) for e in entries}

    def token_of(name: str) -> str | None:
        return reads[name].token

    down = False
    for view in await probe_once(specs, token_of, SystemClock()):
        refused = reads[view.name].refused
        if refused is not None:
            print(f"{view.name}: its token is not sent: {refused}", file=out)
        if view.up:
            loaded = f", loaded: {printable_list(view.loaded)}" if view.loaded else ""
            print(f"{view.name}: up, {len(view.models)} models{loaded}", file=out)
        else:
            down = True
            print(f"{view.name}: down: {view.down_reason}", file=out)
    return EXIT_DOWN if down else EXIT_OK


def _read_token(name: str) -> str:
    prompt = f"API token of upstream {name}: "
    token = (getpass.getpass(prompt) if sys.stdin.isatty() else sys.stdin.readline()).strip()
    if not token:
        raise ValueError("no token was given on stdin")
    return token


def _store_or_none(config: Config) -> SecretStore | None:
    try:
        return secret_store_for(config)
    except Exception:  # listing and testing work without the store; they say "?"
        return None


def _token_read(store: SecretStore | None, name: str, url: str) -> TokenRead:
    if store is None:
        return TokenRead(None)
    try:
        return read_token(store, name, url)
    except SecretStoreError:
        return TokenRead(None)


def _token_word(store: SecretStore, name: str) -> str:
    return "set" if read_or_none(store, token_secret_name(name)) else "none"
