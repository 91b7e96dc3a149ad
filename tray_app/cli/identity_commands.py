"""CLI commands for identity: tokens, API keys, pairing, devices, budgets, the signing key and
stored secrets (usage and the audit trail are in usage_commands). Secrets (tokens, keys) are
printed once, at creation, and never again; every change says it came from the CLI."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import re
import sys
from collections.abc import Sequence
from decimal import Decimal
from typing import IO
from urllib.parse import urlsplit

from tray_app.cli.client_settings import client_settings, loopback_host
from tray_app.cli.input_errors import InputError
from tray_app.cli.usage_commands import (
    USAGE_COMMANDS,
    Credential,
    add_usage_commands,
    credentials,
    run_usage_command,
    table,
    when,
)
from tray_app.config.settings import BUDGET_DEFAULT_MAX, Config, parse_duration
from tray_app.config.upstreams import is_token_secret_name
from tray_app.control.assembly import (
    Identity,
    open_identity,
    open_shared,
    rotate_signing_key_everywhere,
    secret_store_for,
)
from tray_app.control.shared_state import check_shared_secret, uses_shared_state
from tray_app.errors import SecretStoreError
from tray_app.gateway.server.identify import lmgate_listens
from tray_app.identity.access import CLI_KEY_SCOPES, CLI_TOKEN_SCOPES
from tray_app.identity.principal import ALL_SCOPES, Budget, PrincipalId
from tray_app.identity.signing_key import SIGNING_KEY, load_or_create_signing_key
from tray_app.qr_codes import terminal_qr
from tray_app.secret_store.base import (
    LMSTUDIO_API_TOKEN,
    STATE_DATABASE_URL,
    STATE_REDIS_URL,
    SecretStore,
)
from tray_app.storage.audit import AuditSource
from tray_app.storage.budgets import BudgetStore
from tray_app.storage.usage_history import Current, UsageHistory

SECRET_NAMES = (
    f"{LMSTUDIO_API_TOKEN}, upstream-token-NAME (an upstream's API token), or for a team "
    f"gateway {STATE_DATABASE_URL}, {STATE_REDIS_URL} and {SIGNING_KEY} (the same on every "
    "replica)"
)
# Secrets a team gateway's replicas read once, at start.
_READ_AT_START = (STATE_DATABASE_URL, STATE_REDIS_URL, SIGNING_KEY)


def _settable_secret(name: str) -> str:
    if name == "upstream-token-local":
        raise argparse.ArgumentTypeError(f"the local upstream's token is {LMSTUDIO_API_TOKEN}")
    if name not in _READ_AT_START and not is_token_secret_name(name):
        raise argparse.ArgumentTypeError(f"{name!r} is not a secret LM Gate keeps: {SECRET_NAMES}")
    return name


def add_identity_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    scope_help = f"scope to grant (repeat; any of {', '.join(sorted(ALL_SCOPES))})"

    token = commands.add_parser("token", help="JWT access tokens: create, list, revoke")
    token_actions = token.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = token_actions.add_parser("create", parents=[common], help="issue a token (shown once)")
    create.add_argument("name")
    create.add_argument("--scope", action="append", dest="scopes", metavar="SCOPE", help=scope_help)
    create.add_argument("--models", help="comma-separated models the token may use (default: all)")
    create.add_argument("--max-tokens", type=int, help="cap on output tokens per request")
    create.add_argument("--ttl", help="lifetime, e.g. 30m, 24h, 7d (default: auth.token_ttl)")
    _budget_arguments(create)
    token_actions.add_parser("list", parents=[common], help="list live tokens")
    revoke = token_actions.add_parser("revoke", parents=[common], help="revoke a token")
    revoke.add_argument("id", help="the token ID from `lmgate token list` (6+ characters)")

    key = commands.add_parser("key", help="API keys for scripts: create, list, revoke")
    key_actions = key.add_subparsers(dest="action", metavar="ACTION", required=True)
    kcreate = key_actions.add_parser("create", parents=[common], help="make a key (shown once)")
    kcreate.add_argument("name")
    kcreate.add_argument(
        "--scope", action="append", dest="scopes", metavar="SCOPE", help=scope_help
    )
    kcreate.add_argument("--models", help="comma-separated models the key may use")
    kcreate.add_argument("--ttl", help="lifetime, e.g. 90d (default: no expiry)")
    _budget_arguments(kcreate)
    key_actions.add_parser("list", parents=[common], help="list keys")
    krevoke = key_actions.add_parser("revoke", parents=[common], help="revoke a key")
    krevoke.add_argument("id")

    pair = commands.add_parser(
        "pair", parents=[common], help="make a one-time pairing code and show its QR code"
    )
    pair.add_argument("--device", help="name of the device that will pair")
    pair.add_argument(
        "--url",
        help="the gateway's address as the phone reaches it "
        "(default: http://<server.host>:<server.port>)",
    )

    device = commands.add_parser("device", help="paired devices: list, revoke")
    device_actions = device.add_subparsers(dest="action", metavar="ACTION", required=True)
    device_actions.add_parser("list", parents=[common], help="list paired devices")
    drevoke = device_actions.add_parser("revoke", parents=[common], help="revoke one device")
    drevoke.add_argument("id")
    device_actions.add_parser(
        "revoke-all", parents=[common], help="revoke every paired device (the kill switch)"
    )

    budget = commands.add_parser("budget", help="token budgets per credential: set, show")
    budget_actions = budget.add_subparsers(dest="action", metavar="ACTION", required=True)
    bset = budget_actions.add_parser(
        "set", parents=[common], help="change a credential's budget (its next request obeys it)"
    )
    bset.add_argument("who", metavar="WHO", help=_WHO_HELP)
    bset.add_argument("--day", metavar="N|none", help="tokens per UTC day, or none")
    bset.add_argument("--month", metavar="N|none", help="tokens per UTC month, or none")
    bshow = budget_actions.add_parser(
        "show", parents=[common], help="each live credential's budget and what it used"
    )
    bshow.add_argument("who", metavar="WHO", nargs="?", help=_WHO_HELP)

    add_usage_commands(commands, common)

    keys = commands.add_parser("keys", help="the token signing key")
    keys_actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    keys_actions.add_parser(
        "rotate", parents=[common], help="replace the signing key: every issued token stops working"
    )

    secret = commands.add_parser("secret", help="secrets LM Gate keeps for you")
    secret_actions = secret.add_subparsers(dest="action", metavar="ACTION", required=True)
    sset = secret_actions.add_parser(
        "set", parents=[common], help="store a secret (read from the terminal or stdin)"
    )
    sset.add_argument("name", type=_settable_secret, help=SECRET_NAMES)
    sdel = secret_actions.add_parser("delete", parents=[common], help="remove a secret")
    sdel.add_argument("name", type=_settable_secret, help=SECRET_NAMES)


_WHO_HELP = (
    "a principal (key:ab12..., device:..., token:...), a name, or the start of an ID "
    "(6+ characters)"
)

IDENTITY_COMMANDS = frozenset(
    {"token", "key", "pair", "device", "budget", "keys", "secret", *USAGE_COMMANDS}
)


def _budget_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget-day", metavar="N|none", help="tokens per UTC day (100k, 2M)")
    parser.add_argument("--budget-month", metavar="N|none", help="tokens per UTC month (100k, 2M)")


def _budget(args: argparse.Namespace) -> Budget:
    return Budget(
        _optional_budget("--budget-day", args.budget_day),
        _optional_budget("--budget-month", args.budget_month),
    )


def _budget_words(args: argparse.Namespace) -> str:
    """``, budget 50,000/day, no monthly cap`` for the creation note (nothing without one)."""
    budget = _budget(args)
    return f", budget {budget.words()}" if budget.limited else ""


def _optional_budget(what: str, raw: str | None) -> int | None:
    return None if raw is None else parse_budget_value(what, raw)


def _scopes(raw: Sequence[str] | None, default: frozenset[str]) -> frozenset[str]:
    if not raw:
        return default
    scopes = frozenset(s.strip() for item in raw for s in item.replace(",", " ").split())
    unknown = scopes - ALL_SCOPES
    if unknown:
        raise InputError(
            "--scope",
            f"unknown scope {', '.join(sorted(unknown))}; choose from "
            f"{', '.join(sorted(ALL_SCOPES))}",
        )
    return scopes


def _models(raw: str | None) -> frozenset[str] | None:
    if raw is None:
        return None
    models = frozenset(m.strip() for m in raw.split(",") if m.strip())
    if not models:
        raise InputError("--models", "give at least one model name")
    return models


def _first_model(raw: str | None) -> str | None:
    return next((m.strip() for m in (raw or "").split(",") if m.strip()), None)


def _ttl(raw: str | None, default: float | None) -> float | None:
    if raw is None:
        return default
    try:
        return parse_duration(raw)
    except ValueError as exc:
        raise InputError("--ttl", str(exc)) from None


def _open(config: Config, *, need_signing_key: bool, store: SecretStore | None = None) -> Identity:
    if uses_shared_state(config):
        # The replicas' database and key: the URL and the master are in the store.
        shared = open_shared(config, store or secret_store_for(config))
        return open_identity(config, shared.signing.current(), shared=shared)
    if need_signing_key:
        key = load_or_create_signing_key(store or secret_store_for(config))
    else:
        key = b"\0" * 32  # listing and revoking never sign anything
    return open_identity(config, key)


def run_identity_command(args: argparse.Namespace, config: Config, out: IO[str]) -> int:
    command: str = args.command
    action: str = getattr(args, "action", "") or ""
    if command == "secret":
        return _secret(args, config, out)
    if command == "keys":
        store = secret_store_for(config)
        identity = _open(config, need_signing_key=True, store=store)
        try:
            rotation = rotate_signing_key_everywhere(identity, store)
        finally:
            identity.close()
        where = (
            f"New signing key stored ({SIGNING_KEY})"
            if identity.shared_signing is None
            else "New signing key generation in the shared database (every replica derives it "
            f"from its {SIGNING_KEY})"
        )
        print(
            f"{where}. Every token issued before is invalid "
            f"now ({rotation.tokens_revoked} marked revoked) and every paired device "
            f"({rotation.devices_revoked}) must pair again. A running LM Gate picks up the new "
            "key within a second. API keys are not affected.",
            file=out,
        )
        return 0
    need_key = (command, action) == ("token", "create")
    identity = _open(config, need_signing_key=need_key)
    try:
        if command == "token":
            return _token(args, action, identity, config, out)
        if command == "key":
            return _key(args, action, identity, config, out)
        if command == "pair":
            return _pair(args, identity, config, out)
        if command == "device":
            return _device(args, action, identity, out)
        if command == "budget":
            return _budget_command(args, action, identity, out)
        return run_usage_command(args, identity, out)
    finally:
        identity.close()


def _token(
    args: argparse.Namespace, action: str, identity: Identity, config: Config, out: IO[str]
) -> int:
    if action == "create":
        name = args.name.strip()
        if not name:
            raise InputError("NAME", "a token needs a name")
        if args.max_tokens is not None and args.max_tokens <= 0:
            raise InputError("--max-tokens", "must be a positive number")
        ttl = _ttl(args.ttl, config.auth_token_ttl)
        assert ttl is not None
        issued = identity.tokens.issue(
            name=name,
            scopes=_scopes(args.scopes, CLI_TOKEN_SCOPES),
            ttl=ttl,
            models=_models(args.models),
            max_tokens=args.max_tokens,
            budget=_budget(args),
            source=AuditSource.CLI,
        )
        r = issued.record
        print(issued.token, file=out)
        print(
            f"\nToken {r.jti} for {r.name!r}: scopes {' '.join(sorted(r.scopes))}, "
            f"expires {when(r.expires)}{_budget_words(args)}. It is shown only now; keep it "
            "somewhere safe.",
            file=sys.stderr,
        )
        return 0
    if action == "list":
        rows = [
            (
                r.jti,
                r.name,
                r.kind,
                " ".join(sorted(r.scopes)),
                ",".join(sorted(r.models)) if r.models else "all",
                when(r.expires),
                "revoked" if r.revoked else "active",
            )
            for r in identity.tokens.list()
        ]
        table(out, ("ID", "NAME", "KIND", "SCOPES", "MODELS", "EXPIRES", "STATUS"), rows)
        return 0
    try:
        record = identity.tokens.revoke(args.id, source=AuditSource.CLI)
    except (LookupError, ValueError) as exc:
        raise InputError("", f"{exc} (`lmgate token list` shows the IDs)") from None
    print(f"Revoked token {record.jti} ({record.name}).", file=out)
    return 0


def _key(
    args: argparse.Namespace, action: str, identity: Identity, config: Config, out: IO[str]
) -> int:
    if action == "create":
        key, record = identity.api_keys.create(
            args.name,
            scopes=_scopes(args.scopes, CLI_KEY_SCOPES),
            models=_models(args.models),
            ttl=_ttl(args.ttl, None),
            budget=_budget(args),
            source=AuditSource.CLI,
        )
        print(key, file=out)
        expiry = f"expires {when(record.expires)}" if record.expires else "never expires"
        print(
            f"\nAPI key {record.id} for {record.name!r}: scopes "
            f"{' '.join(sorted(record.scopes))}, {expiry}{_budget_words(args)}. It is shown "
            "only now; LM Gate keeps just its hash.",
            file=sys.stderr,
        )
        local = f"http://{loopback_host(config.server_host)}:{config.server_port}"
        # The first model as typed: a key limited to models can use no other in Claude Code.
        first = _first_model(args.models)
        snippets = client_settings(
            local, key, messages_on=config.routes_enable_messages, model=first
        )
        print(
            "\nSettings to paste into an app on this computer (elsewhere, use the address it "
            f"reaches LM Gate at):\n\n{snippets}",
            file=sys.stderr,
        )
        if not asyncio.run(lmgate_listens(config.server_host, config.server_port)):
            # A serve started with --port (or only public) is not where server.port says.
            print(
                f"Note: no LM Gate answers at {local} now; these settings assume server.port "
                f"({config.server_port}). Use the address LM Gate runs at (its port, or its "
                "public URL) if that differs.",
                file=sys.stderr,
            )
        return 0
    if action == "list":
        rows = [
            (
                r.id,
                r.name,
                " ".join(sorted(r.scopes)),
                ",".join(sorted(r.models)) if r.models else "all",
                when(r.created),
                when(r.expires),
                when(r.last_used),
                "revoked" if r.revoked else "active",
            )
            for r in identity.api_keys.list()
        ]
        table(
            out,
            ("ID", "NAME", "SCOPES", "MODELS", "CREATED", "EXPIRES", "LAST USED", "STATUS"),
            rows,
        )
        return 0
    try:
        record = identity.api_keys.revoke(args.id, source=AuditSource.CLI)
    except LookupError as exc:
        raise InputError("", f"{exc} (`lmgate key list` shows the IDs)") from None
    print(f"Revoked API key {record.id} ({record.name}).", file=out)
    return 0


def gateway_address(raw: str) -> str:
    """A ``--url`` the phone can open: anything else made a QR code that led nowhere."""
    text = raw.strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in {"http", "https"}:
        rest = text.split("://", 1)[-1]
        like = f"http://{rest}" if rest else "https://calm-otter.ngrok.app"
        raise InputError("--url", f"must start with http:// or https:// (like {like}), got {raw!r}")
    try:
        host, _ = parts.hostname, parts.port
    except ValueError:
        raise InputError("--url", f"has an invalid port: {raw!r}") from None
    if not host:
        raise InputError("--url", f"has no host name: {raw!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        # The pairing code rides in the fragment; anything else there would garble it.
        raise InputError("--url", f"must be the gateway's address alone, got {raw!r}")
    return text


def _pair(args: argparse.Namespace, identity: Identity, config: Config, out: IO[str]) -> int:
    # Checked before a code is made: a refused address leaves no code behind.
    given = gateway_address(args.url) if args.url is not None else None
    code, expires = identity.pairing.create_code(device_name=args.device)
    base = given or f"http://{config.server_host}:{config.server_port}"
    url = f"{base}/#{code}"
    print(terminal_qr(url), file=out)
    print(f"Pairing URL: {url}", file=out)
    print(f"Valid until {when(expires)}, for one device.", file=out)
    if not args.url and config.server_host in {"127.0.0.1", "localhost", "::1"}:
        print(
            "Note: this address works only on this computer; a phone needs the public or LAN "
            "address (pass it with --url).",
            file=out,
        )
    return 0


def _device(args: argparse.Namespace, action: str, identity: Identity, out: IO[str]) -> int:
    if action == "list":
        rows = [
            (
                d.id,
                d.name,
                when(d.created),
                when(d.last_seen),
                "revoked" if d.revoked else "active",
            )
            for d in identity.pairing.devices()
        ]
        table(out, ("ID", "NAME", "PAIRED", "LAST SEEN", "STATUS"), rows)
        return 0
    if action == "revoke-all":
        count = identity.pairing.revoke_all_devices(source=AuditSource.CLI)
        print(f"Revoked {count} device(s); they must pair again.", file=out)
        return 0
    try:
        device = identity.pairing.revoke_device(args.id, source=AuditSource.CLI)
    except LookupError as exc:
        raise InputError("", f"{exc} (`lmgate device list` shows the IDs)") from None
    print(f"Revoked device {device.id} ({device.name}).", file=out)
    return 0


def _budget_command(args: argparse.Namespace, action: str, identity: Identity, out: IO[str]) -> int:
    store = BudgetStore(identity.db)
    if action == "show":
        chosen = [find_credential(identity, args.who)] if args.who else None
        shown = chosen or [c for c in credentials(identity) if c.live]
        current = UsageHistory(identity.db).current(identity.clock.time())
        budgets = store.all()
        rows = [
            (
                c.principal,
                c.name,
                c.kind.value,
                _limit(budgets.get(c.principal, Budget()).tokens_per_day),
                _limit(budgets.get(c.principal, Budget()).tokens_per_month),
                f"{current.get(c.principal, Current()).today.tokens:,}",
                f"{current.get(c.principal, Current()).month.tokens:,}",
            )
            for c in shown
        ]
        table(
            out,
            ("PRINCIPAL", "NAME", "KIND", "PER DAY", "PER MONTH", "USED TODAY", "THIS MONTH"),
            rows,
        )
        return 0
    if args.day is None and args.month is None:
        raise InputError("", "say what to change: --day N|none, --month N|none, or both")
    credential = find_credential(identity, args.who)
    if not credential.live:
        raise InputError(
            "",
            f"{credential.principal} ({credential.name}) is revoked or expired: it has no use "
            "for a budget",
        )
    before = store.get(credential.principal) or Budget()
    budget = Budget(
        before.tokens_per_day if args.day is None else parse_budget_value("--day", args.day),
        before.tokens_per_month
        if args.month is None
        else parse_budget_value("--month", args.month),
    )
    store.set(
        credential.principal,
        budget,
        now=identity.clock.time(),
        source=AuditSource.CLI,
        name=credential.name,
    )
    print(
        f"Budget of {credential.principal} ({credential.name}): {budget.words()} "
        f"(was {before.words()}). A running LM Gate applies it from the next request.",
        file=out,
    )
    return 0


def _limit(value: int | None) -> str:
    return "none" if value is None else f"{value:,}"


# Plain, grouped (100,000 as written, 100_000 as in Python) or with a k/M suffix. The digits are
# ASCII on purpose: int() would also take Arabic-Indic and other digits.
_PLAIN_TOKENS = re.compile(r"[0-9]+|[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+(?:_[0-9]+)+")
_SUFFIXED_TOKENS = re.compile(r"([0-9]+(?:\.[0-9]+)?)([km])", re.IGNORECASE)
_SUFFIX = {"k": 1_000, "m": 1_000_000}
_BUDGET_FORMS = "a number of tokens (100000, 100,000, 100k, 2M) or none"


def parse_budget_value(what: str, raw: str) -> int | None:
    """A budget as typed for ``what`` (``--day``, ``--budget-month``, ...): tokens, or None for
    no cap. 0 is refused, not read as "no cap": a stored 0 refuses every request while the
    settings' 0 means no budget, and a person typing it could mean either."""
    text = raw.strip()
    if text.lower() == "none":
        return None
    suffixed = _SUFFIXED_TOKENS.fullmatch(text)
    if _PLAIN_TOKENS.fullmatch(text):
        value = int(text.replace(",", "").replace("_", ""))
    elif suffixed:
        exact = Decimal(suffixed.group(1)) * _SUFFIX[suffixed.group(2).lower()]
        if exact != exact.to_integral_value():
            raise InputError(what, f"must be a whole number of tokens, got {raw!r}")
        value = int(exact)
    elif text.startswith("-"):
        raise InputError(what, f"must be a positive number of tokens, got {text}")
    else:
        raise InputError(what, f"must be {_BUDGET_FORMS}, got {raw!r}")
    if value == 0:
        raise InputError(
            what,
            "must be a positive number of tokens, got 0 (0 would refuse every request; "
            "none means no cap)",
        )
    if value > BUDGET_DEFAULT_MAX:
        raise InputError(
            what,
            f"must be at most {BUDGET_DEFAULT_MAX:,} tokens (as much as the tray's budget "
            f"fields hold), got {value:,}",
        )
    return value


# A token ID prefix must be this long, as for `lmgate token revoke`.
_MIN_PREFIX = 6


def find_credential(identity: Identity, who: str) -> Credential:
    """The one credential ``who`` names: its principal (or a principal's start, such as
    ``key:ab12``), its name, or the start of its ID. Live credentials win over revoked ones
    with the same name; several still matching is an error naming them."""
    text = who.strip()
    every = credentials(identity)
    named = PrincipalId.parse(text)
    if named is not None:
        matches = [c for c in every if c.principal.startswith(text)]
    else:
        matches = [
            c
            for c in every
            if c.name == text or (len(text) >= _MIN_PREFIX and c.ident.startswith(text))
        ]
    exact = [c for c in matches if c.principal == text]
    if exact:
        return exact[0]
    live = [c for c in matches if c.live]
    candidates = live or matches
    if not candidates:
        raise InputError("", f"no credential is called {who!r} (`lmgate budget show` lists them)")
    if len(candidates) > 1:
        listed = ", ".join(f"{c.principal} ({c.name})" for c in candidates[:5])
        raise InputError(
            "", f"{who!r} could be {len(candidates)} credentials: {listed}; give its principal"
        )
    return candidates[0]


def _secret(args: argparse.Namespace, config: Config, out: IO[str]) -> int:
    store = secret_store_for(config)
    if args.action == "delete":
        store.delete(args.name)
        print(f"Removed {args.name}.", file=out)
        return 0
    value = getpass.getpass(f"{args.name}: ") if sys.stdin.isatty() else sys.stdin.readline()
    value = value.strip()
    if not value:
        raise SecretStoreError("nothing was entered; the secret was not changed")
    check_shared_secret(args.name, value)
    store.set(args.name, value)
    print(f"Stored {args.name} in the {config.secrets_store} store.", file=out)
    if args.name in _READ_AT_START:
        print("Replicas read it when they start: restart them to use it.", file=out)
    elif args.name != LMSTUDIO_API_TOKEN:
        print(
            "A running LM Gate uses it from its next probe of that upstream (within a minute).",
            file=out,
        )
    elif args.name == LMSTUDIO_API_TOKEN:
        # The tray's LM Studio watcher restarts its gateway with a changed token; `serve`
        # reads it once at start, so it is told rather than left using the old one.
        print(
            "A running tray app switches to it within seconds once LM Studio refuses "
            "the old one; restart a running "
            "`lmgate serve` to use it.",
            file=out,
        )
    return 0
