"""The audit trail: every change to a credential, when, and from where.

Rows are only ever added. ``record`` takes the connection of the transaction that makes the
change, so a change and its audit entry are written together or not at all; the identity
layer and the CLI call it, and ``lmgate audit`` reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from tray_app.storage.database import Connection, Database


class AuditAction(StrEnum):
    CREATED = "created"
    REVOKED = "revoked"
    ROTATED = "rotated"  # the signing key: every token and device revoked with it
    PAIRED = "paired"  # a device redeemed a pairing code
    BUDGET_CHANGED = "budget_changed"


class AuditSource(StrEnum):
    """Where a change was made."""

    CLI = "cli"
    TRAY = "tray"
    PAIRING = "pairing"  # the gateway's /pair, on a device's request
    GATEWAY = "gateway"  # the gateway itself (a first key at its first start)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    at: float
    action: AuditAction
    principal: str
    name: str | None
    source: AuditSource
    detail: str | None


def record(
    conn: Connection,
    *,
    at: float,
    action: AuditAction,
    principal: str,
    source: AuditSource,
    name: str | None = None,
    detail: str | None = None,
) -> None:
    """Add an entry inside the caller's transaction. ``detail`` is words, never a secret."""
    conn.execute(
        "INSERT INTO audit (at, action, principal, name, source, detail) VALUES (?, ?, ?, ?, ?, ?)",
        (at, action.value, principal, name, source.value, detail),
    )


class AuditLog:
    def __init__(self, db: Database) -> None:
        self._db = db

    def entries(self, since: float = 0.0, limit: int = 1000) -> list[AuditEntry]:
        """The newest ``limit`` entries from ``since`` on, oldest first."""
        rows = self._db.query(
            "SELECT * FROM (SELECT * FROM audit WHERE at >= ? ORDER BY id DESC LIMIT ?) "
            "AS recent ORDER BY id",
            (since, limit),
        )
        return [
            AuditEntry(
                r["at"],
                AuditAction(r["action"]),
                r["principal"],
                r["name"],
                AuditSource(r["source"]),
                r["detail"],
            )
            for r in rows
        ]
