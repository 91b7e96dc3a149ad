"""Pairing: a short one-time code (in a QR code) exchanged for a device token.

Codes are 24 base32 characters (120 random bits), valid for minutes, single use, and stored
only as hashes. The exchange is one conditional UPDATE, so two phones racing with the same code
cannot both win.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import sqlite3
from dataclasses import dataclass

from tray_app.clock import Clock
from tray_app.errors import AuthError
from tray_app.identity.principal import SCOPE_CHAT, SCOPE_MODELS
from tray_app.identity.tokens import IssuedToken, TokenService
from tray_app.storage.database import Database

CODE_BYTES = 15  # 120 bits -> 24 base32 characters
DEVICE_SCOPES = frozenset({SCOPE_CHAT, SCOPE_MODELS})
MAX_DEVICE_NAME = 64
_CODE_SHAPE = re.compile(r"^[A-Z2-7]{24}$")


class PairingError(AuthError):
    """A pairing code was refused; ``code`` says why (for the phone page's message)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message, status=401, code=code)


def normalise_code(raw: str) -> str:
    return re.sub(r"[\s-]", "", raw).upper()


def _clean_name(name: str) -> str:
    cleaned = "".join(ch for ch in " ".join(name.split()) if ch.isprintable())
    return cleaned[:MAX_DEVICE_NAME] or "device"


def _hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    name: str
    created: float
    last_seen: float | None
    revoked: float | None

    @property
    def principal_name(self) -> str:
        return f"device:{self.id}"


def _device(r: sqlite3.Row) -> Device:
    return Device(r["id"], r["name"], r["created"], r["last_seen"], r["revoked"])


class PairingService:
    def __init__(
        self,
        db: Database,
        tokens: TokenService,
        clock: Clock,
        *,
        code_ttl: float = 600.0,
        device_token_ttl: float = 30 * 86400.0,
        models: frozenset[str] | None = None,
    ) -> None:
        self._db = db
        self._tokens = tokens
        self._clock = clock
        self.code_ttl = code_ttl
        self.device_token_ttl = device_token_ttl
        # The allowlist when the device pairs, recorded in its token; the authenticator also
        # applies the allowlist of the moment to every request.
        self.models = models

    def create_code(
        self, *, ttl: float | None = None, device_name: str | None = None
    ) -> tuple[str, float]:
        """A fresh code and when it expires (epoch seconds); ``device_name`` names the device
        that will use it (otherwise the device names itself)."""
        code = base64.b32encode(secrets.token_bytes(CODE_BYTES)).decode()
        now = self._clock.time()
        expires = now + (self.code_ttl if ttl is None else ttl)
        with self._db.transaction() as conn:
            # Old codes are useless; keep the table small.
            conn.execute("DELETE FROM pairing_codes WHERE expires < ?", (now - 86400,))
            conn.execute(
                "INSERT INTO pairing_codes (code_hash, created, expires, device_name) "
                "VALUES (?, ?, ?, ?)",
                (_hash(code), now, expires, _clean_name(device_name) if device_name else None),
            )
        return code, expires

    def exchange(self, raw_code: str, device_name: str) -> IssuedToken:
        code = normalise_code(raw_code)
        name = _clean_name(device_name)
        if not _CODE_SHAPE.match(code):
            raise PairingError(
                "That is not a pairing code; scan the QR code again.", "pairing_code_invalid"
            )
        now = self._clock.time()
        device_id = secrets.token_hex(6)
        with self._db.transaction() as conn:
            claimed = conn.execute(
                "UPDATE pairing_codes SET used = ?, device_id = ? "
                "WHERE code_hash = ? AND used IS NULL AND expires > ?",
                (now, device_id, _hash(code), now),
            ).rowcount
            if claimed != 1:
                row = conn.execute(
                    "SELECT used, expires FROM pairing_codes WHERE code_hash = ?", (_hash(code),)
                ).fetchone()
                if row is None:
                    raise PairingError(
                        "This pairing code is unknown; ask for a new QR code.",
                        "pairing_code_invalid",
                    )
                if row[0] is not None:
                    raise PairingError(
                        "This pairing code was already used; ask for a new QR code.",
                        "pairing_code_used",
                    )
                raise PairingError(
                    "This pairing code has expired; ask for a new QR code.", "pairing_code_expired"
                )
            preset = conn.execute(
                "SELECT device_name FROM pairing_codes WHERE code_hash = ?", (_hash(code),)
            ).fetchone()
            if preset is not None and preset[0]:
                name = preset[0]
            conn.execute(
                "INSERT INTO devices (id, name, created, last_seen) VALUES (?, ?, ?, ?)",
                (device_id, name, now, now),
            )
        return self._tokens.issue(
            name=name,
            scopes=DEVICE_SCOPES,
            ttl=self.device_token_ttl,
            kind="device",
            device_id=device_id,
            models=self.models,
        )

    def devices(self) -> list[Device]:
        return [_device(r) for r in self._db.query("SELECT * FROM devices ORDER BY created")]

    def revoke_device(self, device_id: str) -> Device:
        rows = self._db.query("SELECT * FROM devices WHERE id = ?", (device_id,))
        if not rows:
            raise LookupError(f"no device with ID {device_id!r}")
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE devices SET revoked = ? WHERE id = ? AND revoked IS NULL",
                (self._clock.time(), device_id),
            )
        self._tokens.revoke_where("device_id = ?", (device_id,))
        return _device(self._db.query("SELECT * FROM devices WHERE id = ?", (device_id,))[0])

    def revoke_all_devices(self) -> int:
        """The kill switch: every paired device loses access at once, and no QR code shown
        before it can pair a new one."""
        now = self._clock.time()
        with self._db.transaction() as conn:
            count = conn.execute(
                "UPDATE devices SET revoked = ? WHERE revoked IS NULL", (now,)
            ).rowcount
            expire_pending_codes(conn, now)
        self._tokens.revoke_where("kind = 'device'", ())
        return count


def expire_pending_codes(conn: sqlite3.Connection, now: float) -> int:
    """End every pairing code not used yet (inside the caller's transaction)."""
    return conn.execute(
        "UPDATE pairing_codes SET expires = ? WHERE used IS NULL AND expires > ?", (now, now)
    ).rowcount
