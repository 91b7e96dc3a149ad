"""Each upstream's API token, bound to the server it was given for.

A token is kept under the upstream's name (``upstream-token-NAME``), and names outlive
machines: a table removed by hand leaves its token in the store, and a table added by hand
under the same name, for another machine, would otherwise be sent the old machine's token.
So next to each token the store keeps ``upstream-server-NAME``: the server it was given for
(``scheme://host:port``) and a fingerprint of the token. A token is sent only to that server.

A token the store has no binding for (one stored before bindings existed) is bound to the
server it is first read for. A token whose fingerprint is not the bound one was set since
(``lmgate secret set upstream-token-NAME``: the owner gave it for the address the upstream
has now), so it is bound there. The local upstream's ``lmstudio-api-token`` is not bound: it
has always followed upstream.url wherever the owner points it, and the tray's LM Studio
watcher sets it.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

from tray_app.config.upstreams import LOCAL, server_identity, token_secret_name
from tray_app.errors import LMGateError, SecretStoreError
from tray_app.secret_store.base import SecretStore

BINDING_PREFIX = "upstream-server-"


@dataclass(frozen=True, slots=True)
class TokenRead:
    """What may be sent to an upstream (``token``: None for none), and when a stored token
    is not sent, why and what to do (``refused``)."""

    token: str | None
    refused: str | None = None


def binding_name(upstream: str) -> str:
    return BINDING_PREFIX + upstream


def fingerprint(token: str) -> str:
    # Not the token itself: the binding is a secret-store entry of its own, listed by name.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:16]


def bind_token(store: SecretStore, upstream: str, url: str, token: str) -> None:
    """Bind ``upstream``'s ``token`` to the server at ``url``. Raises SecretStoreError."""
    if upstream != LOCAL:
        store.set(binding_name(upstream), f"{server_identity(url)} {fingerprint(token)}")


def forget_binding(store: SecretStore, upstream: str) -> None:
    # Best effort: a binding left behind binds a token that is gone, and a new token replaces it.
    with contextlib.suppress(LMGateError, OSError):
        store.delete(binding_name(upstream))


def read_token(store: SecretStore, upstream: str, url: str) -> TokenRead:
    """``upstream``'s token, if it may be sent to ``url``. Raises what the store's ``get``
    raises for the token itself. A binding that cannot be read, or reads as no binding at
    all, refuses the token: the binding is what says where it may go."""
    secret = token_secret_name(upstream)
    token = store.get(secret)
    if token is None or upstream == LOCAL:
        return TokenRead(token)
    server = server_identity(url)
    mend = (
        f"Store this server's token with `lmgate secret set {secret}` (or delete it with "
        f"`lmgate secret delete {secret}` if the server needs none)."
    )
    try:
        bound = store.get(binding_name(upstream))
    except SecretStoreError:
        return TokenRead(
            None,
            f"where the token stored as {secret} may be sent cannot be read from the secret "
            f"store, so LM Gate does not send it. {mend}",
        )
    if bound is not None:
        bound_server, _, bound_print = bound.partition(" ")
        if not bound_server or len(bound_print) != len(fingerprint(token)):
            return TokenRead(
                None,
                f"{binding_name(upstream)} in the secret store is not a binding LM Gate "
                f"wrote, so the token stored as {secret} is not sent. {mend}",
            )
        if bound_print == fingerprint(token):
            if bound_server == server:
                return TokenRead(token)
            return TokenRead(
                None,
                f"the token stored as {secret} was given for {bound_server}, not for "
                f"{server}, where upstream {upstream} is now: LM Gate does not send it there. "
                + mend,
            )
    with contextlib.suppress(SecretStoreError):
        bind_token(store, upstream, url, token)  # a read-only store: sent, not bound
    return TokenRead(token)
