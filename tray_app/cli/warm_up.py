"""``lmgate warm-up MODEL``: load a model into LM Studio before people arrive, so the first
request for it neither waits for the load nor (with the guard off) swaps models under others.

It asks LM Studio at upstream.url (or the upstream ``--on`` names) with that upstream's token
from the secret store, as the gateway does, and loads through the same guard (once, and never
a second copy of a loaded model). Exit codes: 0 loaded (or loaded already), 1 LM Studio
unreachable or the load failed, 2 a model LM Studio does not have (the downloaded ones are
listed) or no upstream of that name.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import IO

from tray_app.clock import SystemClock
from tray_app.config.settings import Config, ModelSwitch
from tray_app.config.upstreams import LOCAL, token_secret_name
from tray_app.control.assembly import secret_store_for
from tray_app.errors import SecretStoreError
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.server.identify import lmgate_listens
from tray_app.gateway.upstream.model_api import ModelStates, own_model_api
from tray_app.gateway.upstream.model_guard import ModelGuard
from tray_app.logs import printable, printable_list
from tray_app.secret_store.base import SecretStore, read_or_none

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_UNKNOWN_MODEL = 2
AUTH_ADVICE = "Store LM Studio's token with `lmgate secret set lmstudio-api-token`."


def add_warm_up_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    warm_up = commands.add_parser(
        "warm-up",
        parents=[common],
        help="load a model into LM Studio before people arrive",
        description="Load MODEL into LM Studio now (within models.load_timeout). LM Studio may "
        "unload another model to make room, so run it before people use that one.",
    )
    warm_up.add_argument("model", metavar="MODEL", help="the model's id, as LM Studio lists it")
    warm_up.add_argument(
        "--upstream", metavar="URL", help="LM Studio's URL, as `serve --upstream` takes it"
    )
    warm_up.add_argument(
        "--on",
        metavar="NAME",
        default=LOCAL,
        help="the upstream to load it on, by name (`lmgate upstream list`; default: local)",
    )
    warm_up.add_argument(
        "--force",
        action="store_true",
        help="load even while an LM Gate serves: this command cannot see its running answers",
    )


def run_warm_up(args: argparse.Namespace, config: Config, out: IO[str]) -> int:
    # --upstream reached `config` as serve's flag does (one declaration, upstream.url).
    return asyncio.run(warm_up(config, args.model, out, sys.stderr, force=args.force, on=args.on))


async def warm_up(
    config: Config,
    model: str,
    out: IO[str],
    err: IO[str],
    *,
    force: bool = False,
    on: str = LOCAL,
) -> int:
    entry = next((e for e in config.all_upstreams if e.name == on), None)
    if entry is None:
        known = ", ".join(e.name for e in config.all_upstreams)
        print(f"lmgate: no upstream is named {on!r} (configured: {known}).", file=err)
        return EXIT_UNKNOWN_MODEL
    url = entry.url
    token = read_or_none(_store(config), token_secret_name(entry.name))
    async with own_model_api(url, token) as api:
        try:
            states = await api.loaded()
        except ApiError as exc:
            return _failed(exc, err)
        if (refusal := _cannot_load(entry.name, url, model, states, err)) is not None:
            return refusal
        assert states is not None
        if model in states.loaded:
            print(f"{model} is loaded already.", file=out)
            return EXIT_OK
        others = sorted(states.loaded)
        if others and not force and await lmgate_listens(config.server_host, config.server_port):
            # Its model guard would wait for the answers it streams; this process cannot see
            # them, and LM Studio's unload would cut them off (LM Studio #671).
            print(
                f"lmgate: an LM Gate is serving on port {config.server_port}, and loading {model} "
                f"may make LM Studio unload {printable_list(others)}, cutting off answers it is "
                "streaming, which this command cannot see. Use the tray's Warm up a model… "
                "(it waits for them), or stop LM Gate and run this again, or add --force if "
                "nobody is receiving an answer from another model now.",
                file=err,
            )
            return EXIT_FAILURE
        if others:
            print(f"LM Studio may unload {printable_list(others)} to make room.", file=out)
        print(f"Loading {model}…", end="", file=out, flush=True)
        guard = ModelGuard(
            api,
            policy=ModelSwitch.WAIT,
            load_timeout=config.models_load_timeout,
            clock=SystemClock(),
        )
        try:
            seconds = await guard.warm_up(model)
        except ApiError as exc:
            print(" failed.", file=out, flush=True)
            return _failed(exc, err)
        print(f" loaded in {seconds:.1f} s.", file=out)
        return EXIT_OK


def _store(config: Config) -> SecretStore | None:
    try:
        return secret_store_for(config)
    except SecretStoreError:
        return None  # no store, no token: LM Studio says whether it needs one


def _cannot_load(
    name: str, url: str, model: str, states: ModelStates | None, err: IO[str]
) -> int | None:
    if states is None:
        print(
            f"lmgate: {name} ({url}) has no LM Studio model API (GET /api/v0/models): "
            "it is not LM Studio, or not its server. Other servers (llama.cpp, Ollama, vLLM) "
            "load their models themselves: there is nothing to warm up there.",
            file=err,
        )
        return EXIT_FAILURE
    if model not in states.downloaded:
        downloaded = printable_list(sorted(states.downloaded)) or "none (download one in LM Studio)"
        print(
            f"lmgate: LM Studio has no model {printable(model)!r}. Downloaded: {downloaded}.",
            file=err,
        )
        return EXIT_UNKNOWN_MODEL
    return None


def _failed(exc: ApiError, err: IO[str]) -> int:
    print(f"lmgate: {printable(exc.message, 300)}", file=err)
    if exc.code == "upstream_auth_failed":
        print(f"lmgate: {AUTH_ADVICE}", file=err)
    return EXIT_FAILURE
