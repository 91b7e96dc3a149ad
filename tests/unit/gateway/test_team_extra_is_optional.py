"""redis-py and psycopg are the `team` extra's: an install without them (the desktop app, the
Docker image built from packaging/requirements.lock) must still start the gateway and the CLI."""

from __future__ import annotations

import subprocess
import sys

# Importing a module whose entry in sys.modules is None raises ImportError: as if not installed.
_WITHOUT_TEAM_EXTRA = """
import sys
for name in ("redis", "psycopg", "psycopg_pool"):
    sys.modules[name] = None
import tray_app.cli.main, tray_app.control.service, tray_app.gateway.app
import tray_app.storage.postgres
"""


def test_the_gateway_and_cli_import_without_redis_or_psycopg() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TEAM_EXTRA], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_the_check_notices_a_module_that_needs_redis() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TEAM_EXTRA + "import tray_app.gateway.shared_limits\n"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "redis" in result.stderr


def test_opening_postgres_without_psycopg_says_which_extra_to_install() -> None:
    check = (
        "from tray_app.errors import StorageError\n"
        "from tray_app.storage.postgres import PostgresDatabase\n"
        "try:\n"
        "    PostgresDatabase.connect('postgresql://u:pw@127.0.0.1:1/db')\n"
        "except StorageError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TEAM_EXTRA + check],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'lmgate[team]'" in result.stdout and "pw" not in result.stdout
