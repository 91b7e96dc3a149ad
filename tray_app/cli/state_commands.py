"""``lmgate state migrate --to postgres``: moving one machine's records into a team gateway.

Exit codes: 0 copied and checked, 1 refused or failed (nothing was changed)."""

from __future__ import annotations

import argparse
from typing import IO

from tray_app.config.settings import Config
from tray_app.control.assembly import secret_store_for
from tray_app.control.state_migration import migrate_to_postgres, sqlite_file

EXIT_OK = 0


def add_state_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    state = commands.add_parser("state", help="where LM Gate keeps its records")
    actions = state.add_subparsers(dest="action", metavar="ACTION", required=True)
    migrate = actions.add_parser(
        "migrate",
        parents=[common],
        help="copy this machine's database into a team gateway's PostgreSQL",
        description="Copy the SQLite database in the data directory (keys, tokens, devices, "
        "budgets, usage, the audit trail, conversations) into the empty PostgreSQL named by "
        "the secret state-database-url (`lmgate secret set state-database-url`), in one "
        "transaction, then compare counts and a sample of every table.",
    )
    migrate.add_argument(
        "--to",
        required=True,
        choices=["postgres"],
        help="the backend to copy into (its URL is a secret, never an argument)",
    )


def run_state_command(args: argparse.Namespace, config: Config, out: IO[str]) -> int:
    report = migrate_to_postgres(config, secret_store_for(config))
    print(f"Copied {sqlite_file(config)} into the shared database:", file=out)
    width = max(len(table) for table in report.copied)
    for table, rows in report.copied.items():
        print(f"  {table:<{width}}  {rows:>8} rows", file=out)
    print(
        f"Checked: every table's rows counted on both sides, {report.sampled} rows compared "
        "value by value.\nAPI keys and budgets work on every replica as they are. Tokens and "
        "paired phones were signed with this machine's key, not the replicas' shared one: "
        "they must be issued and paired again (`lmgate token create`, `lmgate pair`). Set "
        "state.backend = postgres to use it.",
        file=out,
    )
    return EXIT_OK
