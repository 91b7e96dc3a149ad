"""What was counted and is not in the database yet, in a file that outlives the process.

The usage recorder writes its batch every few seconds; a process killed in between (SIGKILL, a
crash, the OOM killer, a power cut on a replica) took that batch with it. So each request also
leaves a line here, written with one ``write`` to a file opened for appending: the kernel holds
it from that moment, whatever happens to the process (not to the machine: nothing is synced to
the disk, so a power cut loses what the page cache held). A line says a request began (``b``) or
ended with its usage (``d``, naming the line it began with).

Each process writes under a directory of its own, named by a random id and locked (``flock``)
for as long as it runs; it is made and locked under a hidden name first, so no other process
ever sees it unlocked. A flush starts a new segment file first, with the requests still
running carried over; the database records, in the same transaction as the usage, the last
line that batch holds (``meta`` key ``usage-journal:<id>``), and then the older segments are
deleted. A process that finds another's directory unlocked (its owner gone) replays it once:
the ended requests after the recorded line are added with their own hours, and those that
began and never ended are counted as requests whose tokens are unknown, and said so in the log.
The replay and its mark ``replayed`` are one transaction, so a replay cut short is not counted
twice; the mark goes only once the directory is gone. A replay trusts only directories, never
links, and only whole lines of decimal counts.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import math
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("lmgate.accounting")

SEGMENT_SUFFIX = ".journal"
LOCK_NAME = "lock"
META_PREFIX = "usage-journal:"
REPLAYED = "replayed"


@dataclass(frozen=True, slots=True)
class Ended:
    seq: int
    principal: str
    at: float
    prompt_tokens: int
    completion_tokens: int
    begun: int  # the line it began with, 0 if none


@dataclass(frozen=True, slots=True)
class Unfinished:
    seq: int
    principal: str
    at: float


@dataclass(slots=True)
class Orphan:
    """A journal whose process is gone: what it holds, read once its lock was taken."""

    journal_id: str
    directory: Path
    ended: tuple[Ended, ...]
    unfinished: tuple[Unfinished, ...]
    torn: int  # lines that could not be read (one cut short by the end of the disk)
    _lock: int

    def discard(self) -> bool:
        """Remove the journal (replayed, or nothing in it to keep) and let its lock go;
        whether it is gone."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self.release()
        return not os.path.lexists(self.directory)

    def release(self) -> None:
        """Leave the journal as it is, for another process to replay (a second call does
        nothing: the descriptor's number may be another file's by then)."""
        lock, self._lock = self._lock, -1
        if lock >= 0:
            os.close(lock)


class UsageJournal:
    """This process's journal under ``directory`` (made 0700; files 0600)."""

    def __init__(self, directory: Path) -> None:
        """Raises OSError if it cannot be made."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.journal_id = secrets.token_hex(8)
        making = directory / f".{self.journal_id}"
        making.mkdir(mode=0o700)
        lock = _locked(making)
        if lock is None:  # nobody else knows the hidden name
            raise OSError(f"{making} is locked by another process")
        self._lock = lock
        self.directory = directory / self.journal_id
        making.rename(self.directory)
        self._seq = 0
        self._segment = 0
        self._open: dict[int, bytes] = {}  # begun, not ended: carried into each new segment
        self._fd = self._new_segment()

    def begun(self, principal: str, at: float) -> int:
        self._seq += 1
        line = b"%d b %s %r\n" % (self._seq, _name(principal), at)
        self._open[self._seq] = line
        _write(self._fd, line)
        return self._seq

    def ended(
        self, principal: str, at: float, prompt: int, completion: int, begun: int | None
    ) -> int:
        self._seq += 1
        if begun is not None:
            self._open.pop(begun, None)
        _write(
            self._fd,
            b"%d d %s %r %d %d %d\n"
            % (self._seq, _name(principal), at, prompt, completion, begun or 0),
        )
        return self._seq

    def rotate(self) -> tuple[int, int]:
        """Start a new segment (the requests running carried into it). Returns the last
        line the older segments hold (what the batch being written covers) and the new
        segment's number, for :meth:`written`."""
        through = self._seq
        old = self._fd
        self._fd = self._new_segment()
        os.close(old)
        return through, self._segment

    def written(self, below: int) -> None:
        """The batch of the :meth:`rotate` that returned ``below`` is in the database: the
        segments before that one go (not later ones: another flush's may be unsaved)."""
        for path in self.directory.glob(f"*{SEGMENT_SUFFIX}"):
            number = path.name.removesuffix(SEGMENT_SUFFIX)
            if number.isdigit() and int(number) < below:
                path.unlink(missing_ok=True)

    def close(self, *, saved: bool) -> bool:
        """At the end: with everything ``saved`` and no request unfinished the journal is
        removed (True); else it stays for the next start to replay."""
        self._close_segment()
        keep = not saved or bool(self._open)
        if not keep:
            shutil.rmtree(self.directory, ignore_errors=True)
        lock, self._lock = self._lock, -1
        if lock >= 0:
            os.close(lock)
        return not keep and not os.path.lexists(self.directory)

    def abandon(self) -> None:
        """After a write failed: stop writing, and let the lock go once its lines are in
        the database (:meth:`retire`) or the process ends."""
        self._close_segment()

    def retire(self) -> bool:
        """An abandoned journal whose every line is in the database now (marked replayed
        there): removed, requests under way and all; whether it is gone."""
        self._open.clear()
        return self.close(saved=True)

    def _close_segment(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):  # it failed already: nothing more to learn
                os.close(fd)

    def _new_segment(self) -> int:
        self._segment += 1
        fd = os.open(
            self._segment_path(self._segment),
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
            0o600,
        )
        try:
            if self._open:
                _write(fd, b"".join(self._open.values()))
        except OSError:
            os.close(fd)
            raise
        return fd

    def _segment_path(self, number: int) -> Path:
        return self.directory / f"{number:08d}{SEGMENT_SUFFIX}"


def orphans(directory: Path, *, mine: str | None = None) -> Iterator[Orphan]:
    """The journals under ``directory`` whose process is gone (their lock is free), each
    read and held locked until discarded."""
    if not directory.is_dir():
        return
    for path in sorted(directory.iterdir()):
        # Hidden: one being made. A link is nobody's journal: it is not followed.
        if path.name.startswith(".") or path.name == mine or path.is_symlink():
            continue
        if not path.is_dir():
            continue
        try:
            lock = _locked(path)
            if lock is None:
                continue  # a running process's
        except OSError as exc:
            log.error("a usage journal could not be opened, it is left as it is: %s", exc)
            continue
        try:
            orphan = _read(path, lock)
        except OSError as exc:
            os.close(lock)
            log.error("a usage journal could not be read, it is left as it is: %s", exc)
            continue
        yield orphan


def _read(path: Path, lock: int) -> Orphan:
    ended: dict[int, Ended] = {}
    begun: dict[int, Unfinished] = {}  # a running request's line is in every later segment
    torn = 0
    for segment in sorted(path.glob(f"*{SEGMENT_SUFFIX}")):
        if segment.is_symlink():
            torn += 1
            continue
        *lines, rest = segment.read_bytes().split(b"\n")
        torn += bool(rest)  # a last line cut short: its numbers may be cut too
        for line in lines:
            if not line:
                continue
            parsed = _parse(line)
            if parsed is None:
                torn += 1
            elif isinstance(parsed, Ended):
                ended[parsed.seq] = parsed
            else:
                begun[parsed.seq] = parsed
    closed = {e.begun for e in ended.values()}
    unfinished = tuple(u for seq, u in sorted(begun.items()) if seq not in closed)
    return Orphan(path.name, path, tuple(ended[s] for s in sorted(ended)), unfinished, torn, lock)


def _parse(line: bytes) -> Ended | Unfinished | None:
    parts = line.split(b" ")
    counts = [parts[0], *parts[4:]]
    if not all(part.isdigit() for part in counts):
        return None  # a count is a decimal without sign: never a refund
    try:
        seq = int(parts[0])
        principal = json.loads(parts[2])
        if not isinstance(principal, str):
            return None
        at = float(parts[3])
        if not math.isfinite(at) or at < 0:
            return None  # nan, inf or 1e400: no hour to count it in
        if parts[1] == b"b" and len(parts) == 4:
            return Unfinished(seq, principal, at)
        if parts[1] == b"d" and len(parts) == 7:
            return Ended(seq, principal, at, int(parts[4]), int(parts[5]), int(parts[6]))
    except (ValueError, IndexError, UnicodeDecodeError):
        pass
    return None


def _write(fd: int, data: bytes) -> None:
    if os.write(fd, data) != len(data):  # a full disk writes part of it
        raise OSError(f"the usage journal took {len(data)} bytes only in part")


@functools.lru_cache(maxsize=1024)  # the same few principals, two lines per request each
def _name(principal: str) -> bytes:
    # JSON, ASCII only: a space, a newline or any character a label may hold stays inside.
    return json.dumps(principal).encode().replace(b" ", b"\\u0020")


def _locked(path: Path) -> int | None:
    """A lock on ``path``'s lock file held by this process, or None if another holds it."""
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
