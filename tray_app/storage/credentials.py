"""The identity tables: API keys, issued tokens, paired devices and pairing codes.

Every statement the identity layer needs is one named method here, returning typed rows, so
that identity code reads as policy and no SQL (not even a fragment) leaves storage. Where one
change spans several rows or tables (a redemption, a device and its tokens, a key rotation) it
is one method and one transaction: it happens entirely or not at all. Every change to a
credential writes its audit entry (and a new credential its budget) in that same transaction;
a change that changes nothing (revoking what is revoked) writes none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from tray_app.storage.audit import AuditAction, AuditSource, record
from tray_app.storage.budgets import NO_BUDGET, Budget, write_budget
from tray_app.storage.database import (
    SIGNING_KEY_GENERATION,
    Connection,
    Database,
    Row,
    decode_list,
    encode_list,
)

# A code unused this long after it expired is purged when the next one is made.
_PURGE_CODES_AFTER = 86400.0

# What the audit trail names a key rotation by: it is no one credential's change.
SIGNING_KEY_PRINCIPAL = "signing-key"

# A device's tokens die with the device, even if revoking them was interrupted.
_WITH_DEVICE_STATE = (
    "SELECT t.*, d.revoked AS device_revoked FROM tokens t "
    "LEFT JOIN devices d ON d.id = t.device_id"
)


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    id: str
    name: str
    key_hash: str
    scopes: frozenset[str]
    models: frozenset[str] | None
    created: float
    expires: float | None
    last_used: float | None
    revoked: float | None


@dataclass(frozen=True, slots=True)
class TokenRow:
    jti: str
    sub: str
    name: str
    kind: str
    scopes: frozenset[str]
    models: frozenset[str] | None
    max_tokens: int | None
    created: float
    expires: float
    revoked: float | None
    device_id: str | None
    issued_sub: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceRow:
    id: str
    name: str
    created: float
    last_seen: float | None
    revoked: float | None


class CodeRefusal(Enum):
    """Why a pairing code could not be redeemed."""

    UNKNOWN = "unknown"
    USED = "used"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class RotationRevoked:
    tokens: int
    devices: int


def _scopes(text: str) -> frozenset[str]:
    return frozenset(text.split())


def _encode_scopes(scopes: frozenset[str]) -> str:
    return " ".join(sorted(scopes))


def _api_key(r: Row) -> ApiKeyRow:
    return ApiKeyRow(
        r["id"],
        r["name"],
        r["key_hash"],
        _scopes(r["scopes"]),
        decode_list(r["models"]),
        r["created"],
        r["expires"],
        r["last_used"],
        r["revoked"],
    )


def _token(r: Row) -> TokenRow:
    return TokenRow(
        jti=r["jti"],
        sub=r["sub"],
        name=r["name"],
        kind=r["kind"],
        scopes=_scopes(r["scopes"]),
        models=decode_list(r["models"]),
        max_tokens=r["max_tokens"],
        created=r["created"],
        expires=r["expires"],
        revoked=r["revoked"],
        device_id=r["device_id"],
        issued_sub=r["issued_sub"],
    )


def _device(r: Row) -> DeviceRow:
    return DeviceRow(r["id"], r["name"], r["created"], r["last_seen"], r["revoked"])


def _one(conn: Connection, sql: str, params: tuple[object, ...]) -> Row | None:
    """One row by column name, read inside the caller's transaction."""
    row: Row | None = conn.execute(sql, params).fetchone()
    return row


def _key_principal(key_id: str) -> str:
    return f"key:{key_id}"


def _device_principal(device_id: str) -> str:
    return f"device:{device_id}"


def _created_detail(scopes: frozenset[str], budget: Budget) -> str:
    return f"scopes {_encode_scopes(scopes)}; {budget.words()}"


def _expire_pending_codes(conn: Connection, now: float) -> None:
    conn.execute(
        "UPDATE pairing_codes SET expires = ? WHERE used IS NULL AND expires > ?", (now, now)
    )


@dataclass(frozen=True, slots=True)
class _Revocable:
    """A table whose rows are revoked by setting ``revoked``, and the principal a row's audit
    entry names."""

    table: str
    key: str
    principal: Callable[[Row], str]


_API_KEYS = _Revocable("api_keys", "id", lambda r: _key_principal(r["id"]))
_TOKENS = _Revocable("tokens", "jti", lambda r: r["sub"])  # a device's token: its device
_DEVICES = _Revocable("devices", "id", lambda r: _device_principal(r["id"]))


def _audit_revoked(
    conn: Connection,
    now: float,
    principal: str,
    name: str,
    source: AuditSource,
    detail: str | None = None,
) -> None:
    record(
        conn,
        at=now,
        action=AuditAction.REVOKED,
        principal=principal,
        source=source,
        name=name,
        detail=detail,
    )


def _revoke(
    conn: Connection,
    kind: _Revocable,
    ident: str,
    now: float,
    source: AuditSource,
    detail: str | None = None,
) -> Row | None:
    """Revoke one row (one revoked before keeps its first revocation time) with its audit
    entry, written only if this revoked it; the row as it is then, None if there is none."""
    changed = conn.execute(
        f"UPDATE {kind.table} SET revoked = ? WHERE {kind.key} = ? AND revoked IS NULL",  # noqa: S608
        (now, ident),
    ).rowcount
    row = _one(conn, f"SELECT * FROM {kind.table} WHERE {kind.key} = ?", (ident,))  # noqa: S608
    if changed and row is not None:
        _audit_revoked(conn, now, kind.principal(row), row["name"], source, detail)
    return row


class CredentialStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    # ---- API keys -----------------------------------------------------------------------

    def api_keys(self) -> list[ApiKeyRow]:
        return [
            _api_key(r) for r in self._db.query("SELECT * FROM api_keys ORDER BY created, rowid")
        ]

    def api_key(self, key_id: str) -> ApiKeyRow | None:
        rows = self._db.query("SELECT * FROM api_keys WHERE id = ?", (key_id,))
        return _api_key(rows[0]) if rows else None

    def api_key_by_hash(self, key_hash: str) -> ApiKeyRow | None:
        rows = self._db.query("SELECT * FROM api_keys WHERE key_hash = ?", (key_hash,))
        return _api_key(rows[0]) if rows else None

    def add_api_key(self, key: ApiKeyRow, *, budget: Budget, source: AuditSource) -> None:
        with self._db.transaction(notify=True) as conn:
            conn.execute(
                "INSERT INTO api_keys (id, name, key_hash, scopes, models, created, expires) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    key.id,
                    key.name,
                    key.key_hash,
                    _encode_scopes(key.scopes),
                    encode_list(key.models),
                    key.created,
                    key.expires,
                ),
            )
            write_budget(conn, _key_principal(key.id), budget, key.created)
            record(
                conn,
                at=key.created,
                action=AuditAction.CREATED,
                principal=_key_principal(key.id),
                source=source,
                name=key.name,
                detail=_created_detail(key.scopes, budget),
            )

    def revoke_api_key(self, key_id: str, now: float, *, source: AuditSource) -> ApiKeyRow | None:
        """Mark the key revoked (one revoked before keeps its first revocation time); the key
        as it is then, None if there is no such key."""
        with self._db.transaction(notify=True) as conn:
            row = _revoke(conn, _API_KEYS, key_id, now, source)
        return None if row is None else _api_key(row)

    # ---- tokens -------------------------------------------------------------------------

    def add_token(
        self, token: TokenRow, *, budget: Budget | None, source: AuditSource | None
    ) -> None:
        """Record an issued token with its budget and audit entry; both None for a device's
        token, whose budget is the device's and whose entry is the device's pairing."""
        with self._db.transaction(notify=True) as conn:
            conn.execute(
                "INSERT INTO tokens (jti, sub, name, kind, scopes, models, max_tokens, created, "
                "expires, revoked, device_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                (
                    token.jti,
                    token.sub,
                    token.name,
                    token.kind,
                    _encode_scopes(token.scopes),
                    encode_list(token.models),
                    token.max_tokens,
                    token.created,
                    token.expires,
                    token.device_id,
                ),
            )
            if budget is not None:
                write_budget(conn, token.sub, budget, token.created)
            if source is not None:
                record(
                    conn,
                    at=token.created,
                    action=AuditAction.CREATED,
                    principal=token.sub,
                    source=source,
                    name=token.name,
                    detail=_created_detail(token.scopes, budget or NO_BUDGET),
                )

    def live_tokens(self, expiring_after: float) -> list[TokenRow]:
        """Tokens neither revoked nor belonging to a revoked device, that expire after
        ``expiring_after``."""
        rows = self._db.query(
            _WITH_DEVICE_STATE + " WHERE t.revoked IS NULL AND d.revoked IS NULL AND t.expires > ?",
            (expiring_after,),
        )
        return [_token(r) for r in rows]

    def token(self, jti: str) -> tuple[TokenRow, bool] | None:
        """The token ``jti`` and whether it is live (neither it nor its device revoked)."""
        rows = self._db.query(_WITH_DEVICE_STATE + " WHERE t.jti = ?", (jti,))
        if not rows:
            return None
        token = _token(rows[0])
        return token, token.revoked is None and rows[0]["device_revoked"] is None

    def tokens(self, *, expiring_after: float | None = None) -> list[TokenRow]:
        """Every token (or those expiring after ``expiring_after``), oldest first."""
        if expiring_after is None:
            rows = self._db.query("SELECT * FROM tokens ORDER BY created, rowid")
        else:
            rows = self._db.query(
                "SELECT * FROM tokens WHERE expires > ? ORDER BY created, rowid",
                (expiring_after,),
            )
        return [_token(r) for r in rows]

    def tokens_with_prefix(self, jti_prefix: str) -> list[TokenRow]:
        # A plain comparison, not LIKE: '%' and '_' typed at the CLI are characters, not
        # wildcards that would pick a token the owner did not name.
        rows = self._db.query(
            "SELECT * FROM tokens WHERE substr(jti, 1, ?) = ? ORDER BY rowid",
            (len(jti_prefix), jti_prefix),
        )
        return [_token(r) for r in rows]

    def revoke_token(self, jti: str, now: float, *, source: AuditSource) -> None:
        with self._db.transaction(notify=True) as conn:
            # A device's token is named by its device, and the detail says which one.
            _revoke(conn, _TOKENS, jti, now, source, detail=f"token {jti}")

    # ---- pairing codes and devices -----------------------------------------------------

    def add_pairing_code(
        self, code_hash: str, now: float, expires: float, device_name: str | None
    ) -> None:
        with self._db.transaction(notify=True) as conn:
            # Old codes are useless; keep the table small.
            conn.execute("DELETE FROM pairing_codes WHERE expires < ?", (now - _PURGE_CODES_AFTER,))
            conn.execute(
                "INSERT INTO pairing_codes (code_hash, created, expires, device_name) "
                "VALUES (?, ?, ?, ?)",
                (code_hash, now, expires, device_name),
            )

    def redeem_pairing_code(
        self,
        code_hash: str,
        now: float,
        device_id: str,
        device_name: str,
        *,
        budget: Budget = NO_BUDGET,
    ) -> DeviceRow | CodeRefusal:
        """Use the code once and record the device it pairs (named as the code says, else
        ``device_name``) with its budget and its audit entry. One conditional UPDATE claims
        the code, so of two redemptions racing for it exactly one wins; the loser learns why
        it lost. A code that cannot be claimed is refused by a read alone: a guess must not
        write, nor make every other replica read all credentials again."""
        seen = self._db.query(
            "SELECT used, expires FROM pairing_codes WHERE code_hash = ?", (code_hash,)
        )
        if not seen:
            return CodeRefusal.UNKNOWN
        if seen[0][0] is not None:
            return CodeRefusal.USED
        if seen[0][1] <= now:
            return CodeRefusal.EXPIRED
        with self._db.transaction(notify=True) as conn:
            claimed = conn.execute(
                "UPDATE pairing_codes SET used = ?, device_id = ? "
                "WHERE code_hash = ? AND used IS NULL AND expires > ?",
                (now, device_id, code_hash, now),
            ).rowcount
            row = conn.execute(
                "SELECT used, device_name FROM pairing_codes WHERE code_hash = ?", (code_hash,)
            ).fetchone()
            if claimed != 1:
                if row is None:
                    return CodeRefusal.UNKNOWN
                return CodeRefusal.USED if row[0] is not None else CodeRefusal.EXPIRED
            name = row[1] or device_name
            conn.execute(
                "INSERT INTO devices (id, name, created, last_seen) VALUES (?, ?, ?, ?)",
                (device_id, name, now, now),
            )
            write_budget(conn, _device_principal(device_id), budget, now)
            record(
                conn,
                at=now,
                action=AuditAction.PAIRED,
                principal=_device_principal(device_id),
                source=AuditSource.PAIRING,
                name=name,
                detail=budget.words(),
            )
        return DeviceRow(device_id, name, now, now, None)

    def devices(self) -> list[DeviceRow]:
        return [_device(r) for r in self._db.query("SELECT * FROM devices ORDER BY created, rowid")]

    def device(self, device_id: str) -> DeviceRow | None:
        rows = self._db.query("SELECT * FROM devices WHERE id = ?", (device_id,))
        return _device(rows[0]) if rows else None

    def revoke_device(self, device_id: str, now: float, *, source: AuditSource) -> DeviceRow | None:
        """Revoke the device and every token it holds, together; the device as it is then,
        None if there is no such device."""
        with self._db.transaction(notify=True) as conn:
            tokens = conn.execute(
                "UPDATE tokens SET revoked = ? WHERE revoked IS NULL AND device_id = ?",
                (now, device_id),
            ).rowcount
            detail = f"{tokens} token(s) with it"
            row = _revoke(conn, _DEVICES, device_id, now, source, detail=detail)
        return None if row is None else _device(row)

    def revoke_all_devices(self, now: float, *, source: AuditSource) -> int:
        """Revoke every device and device token, and end every code not used yet; how many
        devices were live. Each device revoked gets its own audit entry."""
        with self._db.transaction(notify=True) as conn:
            live = conn.execute(
                "SELECT id, name FROM devices WHERE revoked IS NULL ORDER BY rowid"
            ).fetchall()
            count = conn.execute(
                "UPDATE devices SET revoked = ? WHERE revoked IS NULL", (now,)
            ).rowcount
            for device_id, name in live:
                _audit_revoked(
                    conn, now, _device_principal(device_id), name, source, "every device revoked"
                )
            _expire_pending_codes(conn, now)
            conn.execute(
                "UPDATE tokens SET revoked = ? WHERE revoked IS NULL AND kind = 'device'", (now,)
            )
        return count

    def revoke_for_key_rotation(
        self, now: float, *, source: AuditSource = AuditSource.CLI
    ) -> RotationRevoked:
        """Every token and device revoked, every pending code ended and the signing key's
        generation bumped, in one transaction: a running gateway sees all of it at once. The
        audit trail gets one entry with the counts, not one per token."""
        with self._db.transaction(notify=True) as conn:
            tokens = conn.execute(
                "UPDATE tokens SET revoked = ? WHERE revoked IS NULL", (now,)
            ).rowcount
            devices = conn.execute(
                "UPDATE devices SET revoked = ? WHERE revoked IS NULL", (now,)
            ).rowcount
            _expire_pending_codes(conn, now)  # a QR code shown before must not pair after
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, '1') ON CONFLICT (key) DO UPDATE "
                "SET value = CAST(CAST(meta.value AS INTEGER) + 1 AS TEXT)",
                (SIGNING_KEY_GENERATION,),
            )
            record(
                conn,
                at=now,
                action=AuditAction.ROTATED,
                principal=SIGNING_KEY_PRINCIPAL,
                source=source,
                detail=f"{tokens} token(s) and {devices} device(s) revoked",
            )
        return RotationRevoked(tokens, devices)
