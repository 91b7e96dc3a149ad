"""Usage accounting: per-principal requests and tokens, written to SQLite in batches.

Counting happens in memory on the request path; a flush every few seconds (and at shutdown)
adds the batch to the database in one transaction. If a write fails (disk full, locked), the
batch stays in memory and is retried: nothing counted is lost while the process lives.

The flush runs in a thread while the loop keeps counting, so the batch is swapped out under a
lock; a batch being written still counts as pending until its write is over, so a budget
loading "database + pending" may count it twice for an instant but never misses it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from tray_app.clock import Clock
from tray_app.errors import StorageError
from tray_app.gateway.upstream.usage import Usage
from tray_app.identity.principal import CredentialKind, PrincipalId
from tray_app.storage.database import HOUR, Database, UsageRow

log = logging.getLogger("lmgate.accounting")


@dataclass(slots=True)
class _Pending:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_seen: float = 0.0


class UsageRecorder:
    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock
        # Per principal and UTC hour: the hour buckets a budget is counted from after a restart.
        self._pending: dict[tuple[str, int], _Pending] = {}
        self._writing: dict[tuple[str, int], _Pending] = {}
        self._lock = threading.Lock()
        self._key_last_used: dict[str, float] = {}
        self._device_last_seen: dict[str, float] = {}
        self._failing = False

    def record(self, principal: str, usage: Usage | None) -> None:
        now = self._clock.time()
        key = (principal, int(now) // HOUR * HOUR)
        who = PrincipalId.parse(principal)
        with self._lock:
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = _Pending()
            pending.requests += 1
            pending.last_seen = now
            if usage is not None:
                pending.prompt_tokens += usage.prompt_tokens
                pending.completion_tokens += usage.completion_tokens
            if who is None:
                return  # a label (a static key's owner), no key or device to mark as used
            if who.kind is CredentialKind.KEY:
                self._key_last_used[who.id] = now
            elif who.kind is CredentialKind.DEVICE:
                self._device_last_seen[who.id] = now

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def pending_tokens(self, principal: str, since: float) -> int:
        """Tokens counted for ``principal`` in hours from ``since`` on that are not in the
        database yet (a budget adds them to what it reads from there)."""
        with self._lock:
            return sum(
                c.prompt_tokens + c.completion_tokens
                for batch in (self._pending, self._writing)
                for (who, hour), c in batch.items()
                if who == principal and hour >= since
            )

    def flush(self) -> bool:
        """Write what was counted; False (and kept for the next try) if the write failed."""
        with self._lock:
            if not self._pending:
                return True
            batch, self._pending = self._pending, {}
            self._writing = batch
            keys, self._key_last_used = self._key_last_used, {}
            devices, self._device_last_seen = self._device_last_seen, {}
        rows = [
            UsageRow(p, c.requests, c.prompt_tokens, c.completion_tokens, c.last_seen, hour)
            for (p, hour), c in batch.items()
        ]
        try:
            self._db.add_usage(rows, key_last_used=keys, device_last_seen=devices)
        # Not only StorageError: a value SQLite refuses (OverflowError) or any other surprise
        # must not lose every principal's usage in the batch, nor end the periodic flush.
        except Exception as exc:
            with self._lock:
                self._writing = {}
                self._keep(batch, keys, devices)
                first_failure, self._failing = not self._failing, True
            if first_failure:  # once per outage, not every few seconds until it ends
                log.error("usage could not be saved, will retry: %s", _describe(exc))
            return False
        with self._lock:
            self._writing = {}
            recovered, self._failing = self._failing, False
        if recovered:
            log.info("usage is saved again")
        return True

    def _keep(
        self,
        batch: dict[tuple[str, int], _Pending],
        keys: dict[str, float],
        devices: dict[str, float],
    ) -> None:
        for key, counted in batch.items():
            into = self._pending.setdefault(key, _Pending())
            into.requests += counted.requests
            into.prompt_tokens += counted.prompt_tokens
            into.completion_tokens += counted.completion_tokens
            into.last_seen = max(into.last_seen, counted.last_seen)
        for k, t in keys.items():
            self._key_last_used.setdefault(k, t)
        for d, t in devices.items():
            self._device_last_seen.setdefault(d, t)


def _describe(exc: Exception) -> str:
    """Our own StorageError says what failed in words fit for a log; anything else is named
    by its type only, since its message may quote the values it choked on."""
    return str(exc) if isinstance(exc, StorageError) else type(exc).__name__
