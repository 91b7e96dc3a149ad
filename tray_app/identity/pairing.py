"""Pairing: a short one-time code (in a QR code) exchanged for a device token.

Codes are 24 base32 characters (120 random bits), valid for minutes, single use, and stored
only as hashes. The exchange is one conditional UPDATE (storage's ``redeem_pairing_code``), so
two phones racing with the same code cannot both win. What a device may do is the access
policy's (identity.access).
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass

from tray_app.clock import Clock
from tray_app.errors import AuthError
from tray_app.identity.access import DEVICE_SCOPES, AccessPolicy
from tray_app.identity.principal import CredentialKind, PrincipalId
from tray_app.identity.tokens import IssuedToken, TokenService
from tray_app.storage.audit import AuditSource
from tray_app.storage.credentials import CodeRefusal, CredentialStore, DeviceRow
from tray_app.storage.database import Database

__all__ = ["DEVICE_SCOPES", "Device", "PairingError", "PairingService", "normalise_code"]

CODE_BYTES = 15  # 120 bits -> 24 base32 characters
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
    def principal(self) -> PrincipalId:
        return PrincipalId(CredentialKind.DEVICE, self.id)

    @property
    def principal_name(self) -> str:
        return str(self.principal)


def _device(row: DeviceRow) -> Device:
    return Device(row.id, row.name, row.created, row.last_seen, row.revoked)


_REFUSALS = {
    CodeRefusal.UNKNOWN: (
        "This pairing code is unknown; ask for a new QR code.",
        "pairing_code_invalid",
    ),
    CodeRefusal.USED: (
        "This pairing code was already used; ask for a new QR code.",
        "pairing_code_used",
    ),
    CodeRefusal.EXPIRED: (
        "This pairing code has expired; ask for a new QR code.",
        "pairing_code_expired",
    ),
}


class PairingService:
    def __init__(
        self,
        db: Database,
        tokens: TokenService,
        clock: Clock,
        *,
        code_ttl: float = 600.0,
        device_token_ttl: float = 30 * 86400.0,
        access: AccessPolicy,
    ) -> None:
        self._store = CredentialStore(db)
        self._tokens = tokens
        self._clock = clock
        self.code_ttl = code_ttl
        self.device_token_ttl = device_token_ttl
        self._access = access

    def create_code(
        self, *, ttl: float | None = None, device_name: str | None = None
    ) -> tuple[str, float]:
        """A fresh code and when it expires (epoch seconds); ``device_name`` names the device
        that will use it (otherwise the device names itself)."""
        code = base64.b32encode(secrets.token_bytes(CODE_BYTES)).decode()
        now = self._clock.time()
        expires = now + (self.code_ttl if ttl is None else ttl)
        self._store.add_pairing_code(
            _hash(code), now, expires, _clean_name(device_name) if device_name else None
        )
        return code, expires

    def exchange(self, raw_code: str, device_name: str) -> IssuedToken:
        code = normalise_code(raw_code)
        name = _clean_name(device_name)
        if not _CODE_SHAPE.match(code):
            raise PairingError(
                "That is not a pairing code; scan the QR code again.", "pairing_code_invalid"
            )
        grant = self._access.for_device()
        device = self._store.redeem_pairing_code(
            _hash(code), self._clock.time(), secrets.token_hex(6), name, budget=grant.budget
        )
        if isinstance(device, CodeRefusal):
            raise PairingError(*_REFUSALS[device])
        return self._tokens.issue(
            name=device.name,
            scopes=grant.scopes,
            ttl=self.device_token_ttl,
            kind=CredentialKind.DEVICE,
            device_id=device.id,
            # Recorded in the token as the allowlist was; the policy holds it to today's.
            models=grant.models,
        )

    def devices(self) -> list[Device]:
        return [_device(row) for row in self._store.devices()]

    def revoke_device(self, device_id: str, *, source: AuditSource = AuditSource.CLI) -> Device:
        revoked = self._store.revoke_device(device_id, self._clock.time(), source=source)
        if revoked is None:
            raise LookupError(f"no device with ID {device_id!r}")
        self._tokens.reload()
        return _device(revoked)

    def revoke_all_devices(self, *, source: AuditSource = AuditSource.CLI) -> int:
        """The kill switch: every paired device loses access at once, and no QR code shown
        before it can pair a new one."""
        count = self._store.revoke_all_devices(self._clock.time(), source=source)
        self._tokens.reload()
        return count
