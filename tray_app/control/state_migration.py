"""`lmgate state migrate --to postgres`: this machine's SQLite database into the team
gateway's PostgreSQL, whose URL is the secret state-database-url (never argv)."""

from __future__ import annotations

from pathlib import Path

from tray_app.config.settings import Config
from tray_app.control.assembly import data_dir
from tray_app.control.shared_state import shared_secret
from tray_app.errors import StorageError
from tray_app.secret_store.base import STATE_DATABASE_URL, SecretStore
from tray_app.storage.copy import CopyReport, copy_database
from tray_app.storage.database import Database
from tray_app.storage.postgres import PostgresDatabase


def sqlite_file(config: Config) -> Path:
    return data_dir(config) / "lmgate.db"


def migrate_to_postgres(config: Config, store: SecretStore) -> CopyReport:
    """Copy the SQLite database in the data directory into the shared PostgreSQL (which must
    be empty); StorageError or SecretStoreError saying what is missing."""
    source_path = sqlite_file(config)
    if not source_path.is_file():  # opening it would make a new, empty one
        raise StorageError(f"There is no LM Gate database at {source_path} to copy.")
    url = shared_secret(store, STATE_DATABASE_URL)
    source = Database(source_path)
    try:
        destination = PostgresDatabase.connect(url, pool_size=2)
        try:
            return copy_database(source, destination)
        finally:
            destination.close()
    finally:
        source.close()
