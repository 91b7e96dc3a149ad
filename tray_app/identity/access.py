"""The one access policy: which scopes and models each kind of credential gets.

The model allowlist (``auth.allowed_models``, None = every model) reaches credentials in two
ways, and this is the only place that says which:

- what the tray hands out to be used by hand — paired devices and copied curl snippets —
  follows the allowlist *as it is now*, on every request, narrowed or widened, whatever its
  token recorded when it was made;
- an app key (Settings' OpenAI settings) is made with the allowlist of the moment and keeps
  it, like every credential made in the CLI keeps the models it was given.

A budget is different: every credential keeps the budget it was made with (stored with it,
changed later by `lmgate budget set`); the defaults below (``budget.device_tokens_per_*`` for
paired devices, ``budget.copied_key_tokens_per_*`` for what the tray copies) reach only
credentials made after them.

Pairing, the tray, the CLI and the token service ask this policy; the gateway asks
:func:`refused_model` about every model a request names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tray_app.identity.principal import (
    SCOPE_CHAT,
    SCOPE_EMBEDDINGS,
    SCOPE_MODELS,
    Budget,
    CredentialKind,
    Principal,
)
from tray_app.storage.budgets import NO_BUDGET

DEVICE_SCOPES = frozenset({SCOPE_CHAT, SCOPE_MODELS})
SNIPPET_SCOPES = frozenset({SCOPE_CHAT})
APP_KEY_SCOPES = frozenset({SCOPE_CHAT, SCOPE_MODELS, SCOPE_EMBEDDINGS})
# What `lmgate token create` and `lmgate key create` grant when no --scope is given.
CLI_TOKEN_SCOPES = frozenset({SCOPE_CHAT, SCOPE_MODELS})
CLI_KEY_SCOPES = frozenset({SCOPE_CHAT, SCOPE_MODELS, SCOPE_EMBEDDINGS})

_FOLLOW_THE_ALLOWLIST = frozenset({CredentialKind.DEVICE, CredentialKind.SNIPPET})


@dataclass(frozen=True, slots=True)
class Grant:
    """What a new credential is made with: its scopes, models (None = all) and budget."""

    scopes: frozenset[str]
    models: frozenset[str] | None
    budget: Budget = NO_BUDGET


def budget_from_settings(tokens_per_day: int, tokens_per_month: int) -> Budget:
    """The budget two settings describe, where 0 (their default) means no cap."""
    return Budget(tokens_per_day or None, tokens_per_month or None)


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    allowed_models: frozenset[str] | None = None
    device_budget: Budget = NO_BUDGET
    copied_key_budget: Budget = NO_BUDGET  # the tray's curl snippets and app keys

    @classmethod
    def with_allowlist(cls, models: Iterable[str]) -> AccessPolicy:
        """The policy for the setting's list (empty = every model)."""
        return cls(frozenset(models) or None)

    def with_budgets(self, *, device: Budget, copied_key: Budget) -> AccessPolicy:
        """This policy with the budgets new devices and copied keys and snippets get."""
        return dataclasses.replace(self, device_budget=device, copied_key_budget=copied_key)

    def for_device(self) -> Grant:
        return Grant(DEVICE_SCOPES, self.allowed_models, self.device_budget)

    def for_snippet(self) -> Grant:
        return Grant(SNIPPET_SCOPES, self.allowed_models, self.copied_key_budget)

    def for_app_key(self) -> Grant:
        return Grant(APP_KEY_SCOPES, self.allowed_models, self.copied_key_budget)

    def models_now(
        self, kind: CredentialKind, recorded: frozenset[str] | None
    ) -> frozenset[str] | None:
        """The models a credential of ``kind``, made with ``recorded``, may use today."""
        return self.allowed_models if kind in _FOLLOW_THE_ALLOWLIST else recorded


def refused_model(principal: Principal, named: Mapping[str, str | None]) -> tuple[str, str] | None:
    """The first (parameter, model) of ``named`` that ``principal`` may not use, if any.
    Every model a request names counts: the model, and the draft model for speculative
    decoding, which LM Studio loads too."""
    for param, model in named.items():
        if model is not None and not principal.may_use_model(model):
            return param, model
    return None
