"""An upstream's table and its token change together, in one order, for `lmgate upstream`
and the Settings window alike.

The store is written first: a store that cannot keep the token leaves the config file as it
was. Added without a token, an upstream forgets a token left under its name by an earlier
upstream: that one is another machine's, and must not be sent to this one.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tray_app.config import upstream_edit
from tray_app.config.upstreams import UpstreamEntry, token_secret_name
from tray_app.errors import LMGateError
from tray_app.secret_store.base import SecretStore, read_or_none
from tray_app.secret_store.upstream_tokens import bind_token, forget_binding


def add_with_token(
    path: Path,
    entry: UpstreamEntry,
    configured: Iterable[UpstreamEntry],
    store: SecretStore | None,
    token: str | None,
) -> bool:
    """Add ``entry`` to the config file at ``path``, its ``token`` (if any) to ``store``
    first; whether a token left from an earlier upstream of the name was forgotten. Raises
    ValueError (name in use, server configured already) before anything is written."""
    configured = tuple(configured)
    upstream_edit.ensure_unused(path, entry.name)
    upstream_edit.ensure_new_server(entry, configured)
    secret = token_secret_name(entry.name)
    forgot = False
    if token:
        if store is None:
            raise LMGateError("no secret store can keep the token; nothing was changed")
        store.set(secret, token)
        # Given for this server: sent to no other one that takes the name later.
        bind_token(store, entry.name, entry.url, token)
    elif store is not None:
        forgot = forget_token(store, secret)
        if read_or_none(store, secret) is None:
            # Only once the token is gone: a token left unbound would be bound to, and sent
            # to, the next server given its name.
            forget_binding(store, entry.name)
    upstream_edit.add_upstream(path, entry, configured)
    return forgot


def remove_with_token(path: Path, name: str, store: SecretStore | None) -> bool:
    """Take ``name``'s table out of the file at ``path`` and forget its token; whether it
    had one."""
    upstream_edit.remove_upstream(path, name)
    if store is None:
        return False
    forgot = forget_token(store, token_secret_name(name))
    if read_or_none(store, token_secret_name(name)) is None:
        forget_binding(store, name)  # after the token, as in add_with_token
    return forgot


def forget_token(store: SecretStore, secret: str) -> bool:
    """Delete ``secret`` if the store has it; whether it had. A store that cannot delete
    (read-only environment variables) has nothing of ours to forget."""
    if read_or_none(store, secret) is None:
        return False
    try:
        store.delete(secret)
    except LMGateError:
        return False
    return True
