"""Who is calling and what they may do.

The gateway asks an :class:`Authenticator` for a :class:`Principal` and then consults the
principal for scopes and models; the identity layer (JWTs, API keys, pairing,
:mod:`tray_app.identity.authenticator`) is the one real authenticator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from tray_app.errors import AuthError

# Budgets are stored below this layer; the class is the identity layer's word for them too.
from tray_app.storage.budgets import Budget as Budget

# Scopes an access token can carry (routes name the one each needs).
SCOPE_CHAT = "chat"
SCOPE_EMBEDDINGS = "embeddings"
SCOPE_MODELS = "models"
SCOPE_METRICS = "metrics"

ALL_SCOPES = frozenset({SCOPE_CHAT, SCOPE_EMBEDDINGS, SCOPE_MODELS, SCOPE_METRICS})


class CredentialKind(StrEnum):
    """What kind of credential speaks for a principal; the value is how it is written."""

    TOKEN = "token"  # noqa: S105 (a kind, not a secret): a JWT from `lmgate token create`
    SNIPPET = "snippet"  # a JWT in a curl snippet the tray copied
    DEVICE = "device"  # a paired device (its JWTs speak for the device)
    KEY = "key"  # an API key
    DEV = "dev"  # dev mode's X-User-Id: a name, no credential at all


@dataclass(frozen=True, slots=True)
class PrincipalId:
    """Who a principal or credential is: ``kind:id`` on the wire, in logs, in the usage and
    conversation tables and in metrics (``token:<jti>``, ``snippet:<jti>``, ``key:<id>``,
    ``device:<id>``, ``dev:<user>``)."""

    kind: CredentialKind
    id: str

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.id}"

    @classmethod
    def parse(cls, text: str | None) -> PrincipalId | None:
        """The id ``text`` spells, or None if it is not one (a label such as ``owner``)."""
        kind, colon, ident = (text or "").partition(":")
        if not colon or not ident or kind not in _KIND_VALUES:
            return None
        return cls(CredentialKind(kind), ident)


_KIND_VALUES = frozenset(kind.value for kind in CredentialKind)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``models`` None means every model LM Studio offers.

    ``name`` is the principal's identity (conversations, limits and usage belong to it): one
    per issued credential, never shared by two; the identity layer writes it as a
    :class:`PrincipalId`. ``credential`` is the credential that authenticated the request, so
    that a running stream can be ended once it is revoked.
    """

    name: str
    scopes: frozenset[str]
    models: frozenset[str] | None = None
    max_tokens: int | None = None
    credential: PrincipalId | None = None
    # From the database's budgets table, never from a token's claims.
    budget: Budget | None = None

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    def may_use_model(self, model: str) -> bool:
        return self.models is None or model in self.models


class Authenticator(Protocol):
    def authenticate(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        """Return the caller's principal or raise :class:`AuthError` (401)."""
        ...

    def still_valid(self, principal: Principal) -> bool:
        """Whether the credential behind ``principal`` is still live (not revoked, not
        expired), reading changes other processes made; asked every few seconds for each
        running stream."""
        ...

    def check_state(self) -> None:
        """Raise :class:`StorageError` while credentials cannot be checked (their database
        out of reach); asked by the readiness check."""
        ...


def extract_credential(headers: Mapping[str, str]) -> str | None:
    """The bearer token or API key a request carries (never from the query string)."""
    authorization = headers.get("Authorization")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return _plain(value.strip())
        raise AuthError(
            "The Authorization header must look like 'Bearer <key>'.", code="invalid_authorization"
        )
    api_key = headers.get("X-API-Key")
    if api_key and api_key.strip():
        return _plain(api_key.strip())
    return None


def _plain(credential: str) -> str:
    # Every key and token LM Gate issues is printable ASCII; anything else is refused here,
    # as a counted failure, before hashing or JWT decoding could trip over it.
    if not (credential.isascii() and credential.isprintable()):
        raise AuthError(
            "The credential has characters no LM Gate key or token has.", code="invalid_api_key"
        )
    return credential


MISSING_CREDENTIAL = (
    "Missing API key. Send it as 'Authorization: Bearer <key>' (or the X-API-Key header)."
)
