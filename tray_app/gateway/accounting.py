"""Usage accounting: per-principal requests and tokens, written to SQLite in batches.

Counting happens in memory on the request path; a flush every few seconds (and at shutdown)
adds the batch to the database in one transaction. If a write fails (disk full, locked), the
batch stays in memory and is retried: nothing counted is lost while the process lives.

The flush runs in a thread while the loop keeps counting, so the batch is swapped out under a
lock; a batch being written still counts as pending until its write is over, so a budget
loading "database + pending" may count it twice for an instant but never misses it.

A serving process also keeps a journal (:mod:`tray_app.storage.usage_journal`): what a killed
process had counted and not written is written by the next one to start on its data directory.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from tray_app.clock import Clock
from tray_app.errors import StorageError
from tray_app.gateway.upstream.usage import Usage
from tray_app.identity.principal import CredentialKind, PrincipalId
from tray_app.storage.database import HOUR, Database, UsageRow
from tray_app.storage.usage_journal import META_PREFIX, REPLAYED, Orphan, UsageJournal, orphans

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
        self._journal: UsageJournal | None = None
        # Journals a write failed in: their lines stop short of what is counted here, so the
        # next flush that saves marks them replayed (else a restart would count them again).
        self._abandoned: list[UsageJournal] = []
        # One flush at a time: a final flush beside a periodic one still writing would take
        # its segments (and its batch, if that write fails) for saved.
        self._flushing = threading.Lock()

    def keep_journal(self, directory: Path) -> None:
        """Journal every request under ``directory`` from now on (once per process: a
        gateway started again keeps the journal it has), after writing what processes gone
        before left in their journals there."""
        if self._journal is not None:
            return
        try:
            journal = UsageJournal(directory)
            found = list(orphans(directory, mine=journal.journal_id))
        # A data directory that cannot hold it (read-only, another user's) must not keep the
        # gateway from starting: it counts in memory, as it did before journals.
        except OSError as exc:
            log.error("no usage journal can be kept, usage is kept in memory: %s", exc)
            return
        for orphan in found:
            try:
                self._replay(orphan)
            # The database may be down as the gateway starts (a replica's PostgreSQL): the
            # gateway starts all the same, and the next start writes it.
            except Exception as exc:
                orphan.release()
                log.error(
                    "usage a stopped LM Gate had not saved could not be written now, it "
                    "will be at the next start: %s",
                    _describe(exc),
                )
        with self._lock:
            self._journal = journal

    def close(self) -> None:
        """No more requests: the journal is closed, and removed if everything it holds is
        saved (else the next start writes it)."""
        with self._flushing, self._lock:
            journal, self._journal = self._journal, None
            saved = not self._pending and not self._writing
        if journal is not None and journal.close(saved=saved):
            with contextlib.suppress(Exception):  # a row left is harmless: nothing replays it
                self._db.forget_meta(META_PREFIX + journal.journal_id)

    def begin(self, principal: str) -> int | None:
        """A request of ``principal``'s is under way: its line in the journal, to pass to
        :meth:`record` (None without a journal)."""
        with self._lock:
            journal = self._journal
            if journal is None:
                return None
            try:
                return journal.begun(principal, self._clock.time())
            except OSError as exc:
                self._journal_failed(exc)
                return None

    def record(self, principal: str, usage: Usage | None, begun: int | None = None) -> None:
        now = self._clock.time()
        key = (principal, int(now) // HOUR * HOUR)
        who = PrincipalId.parse(principal)
        with self._lock:
            if self._journal is not None:
                try:
                    self._journal.ended(
                        principal,
                        now,
                        usage.prompt_tokens if usage is not None else 0,
                        usage.completion_tokens if usage is not None else 0,
                        begun,
                    )
                except OSError as exc:
                    self._journal_failed(exc)
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
        with self._flushing:
            return self._flush()

    def _flush(self) -> bool:
        with self._lock:
            if not self._pending:
                return True
            batch, self._pending = self._pending, {}
            self._writing = batch
            keys, self._key_last_used = self._key_last_used, {}
            devices, self._device_last_seen = self._device_last_seen, {}
            journal, marks, below = self._journal, [], 0
            if journal is not None:
                try:
                    through, below = journal.rotate()
                    marks.append((META_PREFIX + journal.journal_id, str(through)))
                except OSError as exc:
                    self._journal_failed(exc)
                    journal = None
            abandoned = list(self._abandoned)
            marks += [(META_PREFIX + a.journal_id, REPLAYED) for a in abandoned]
        rows = [
            UsageRow(p, c.requests, c.prompt_tokens, c.completion_tokens, c.last_seen, hour)
            for (p, hour), c in batch.items()
        ]
        try:
            self._db.add_usage(
                rows, key_last_used=keys, device_last_seen=devices, journal_marks=marks
            )
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
        if journal is not None:
            journal.written(below)
        for old in abandoned:
            self._abandoned.remove(old)
            if old.retire():
                with contextlib.suppress(Exception):  # a row left is harmless
                    self._db.forget_meta(META_PREFIX + old.journal_id)
        if recovered:
            log.info("usage is saved again")
        return True

    def _replay(self, orphan: Orphan) -> None:
        """Write what ``orphan``'s process had counted and not saved (once: the replay and
        its mark are one transaction), then remove the journal."""
        key = META_PREFIX + orphan.journal_id
        saved = self._db.meta(key)
        if saved != REPLAYED:
            through = int(saved) if saved and saved.isdigit() else 0
            rows = [
                UsageRow(e.principal, 1, e.prompt_tokens, e.completion_tokens, e.at, _hour(e.at))
                for e in orphan.ended
                if e.seq > through
            ]
            # Under way when the process ended: counted as requests, their tokens unknown.
            rows += [UsageRow(u.principal, 1, 0, 0, u.at, _hour(u.at)) for u in orphan.unfinished]
            self._db.add_usage(rows, journal_marks=[(key, REPLAYED)])
            saved_now = len(rows) - len(orphan.unfinished)
            if saved_now:
                log.info(
                    "usage of %d requests that LM Gate had counted but not saved when it "
                    "stopped is saved now",
                    saved_now,
                )
            if orphan.unfinished:
                log.warning(
                    "%d requests were under way when LM Gate stopped: they are counted as "
                    "requests, their tokens are not known",
                    len(orphan.unfinished),
                )
        if orphan.torn:
            log.warning("%d lines of a usage journal could not be read", orphan.torn)
        # The mark goes only with the journal: one left behind (a file that cannot be
        # removed) must find it at the next start, or it would be counted again.
        if orphan.discard():
            self._db.forget_meta(key)

    def _journal_failed(self, exc: OSError) -> None:
        # Counting goes on in memory; only a crash before the next flush would lose it now.
        # Under the lock.
        log.error("the usage journal could not be written, usage is kept in memory: %s", exc)
        journal, self._journal = self._journal, None
        if journal is not None:
            journal.abandon()
            self._abandoned.append(journal)

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


def _hour(at: float) -> int:
    return int(at) // HOUR * HOUR


def _describe(exc: Exception) -> str:
    """Our own StorageError says what failed in words fit for a log; anything else is named
    by its type only, since its message may quote the values it choked on."""
    return str(exc) if isinstance(exc, StorageError) else type(exc).__name__
