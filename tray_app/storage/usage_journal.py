"""What was counted and is not in the database yet, in a file that outlives the process.

The usage recorder writes its batch every few seconds; a process killed in between (SIGKILL, a
crash, the OOM killer, a power cut on a replica) took that batch with it. So each request also
leaves a line here, written with one ``write`` to a file opened for appending: the kernel holds
it from that moment, whatever happens to the process. A line says a request began (``b``) or
ended with its usage (``d``, naming the line it began with).

Each process writes under a directory of its own, named by a random id and locked (``flock``)
for as long as it runs. A flush starts a new segment file first, with the requests still
running carried over; the database records, in the same transaction as the usage, the last
line that batch holds (``meta`` key ``usage-journal:<id>``), and then the older segments are
deleted. A process that finds another's directory unlocked (its owner gone) replays it once:
the ended requests after the recorded line are added with their own hours, and those that
began and never ended are counted as requests whose tokens are unknown, and said so in the log.
The replay and its mark ``replayed`` are one transaction, so a replay cut short is not counted
twice.
"""

from __future__ import annotations

import fcntl
import json
import logging
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


@dataclass(frozen=True, slots=True)
class Orphan:
    """A journal whose process is gone: what it holds, read once its lock was taken."""

    journal_id: str
    directory: Path
    ended: tuple[Ended, ...]
    unfinished: tuple[Unfinished, ...]
    torn: int  # lines that could not be read (one cut short by the end of the disk)
    _lock: int

    def discard(self) -> None:
        """Remove the journal (replayed, or nothing in it to keep) and let its lock go."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self.release()

    def release(self) -> None:
        """Leave the journal as it is, for another process to replay."""
        os.close(self._lock)


class UsageJournal:
    """This process's journal under ``directory`` (made 0700; files 0600)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.journal_id = secrets.token_hex(8)
        self.directory = directory / self.journal_id
        self.directory.mkdir(mode=0o700)
        lock = _locked(self.directory)
        assert lock is not None  # a directory just made is nobody else's
        self._lock = lock
        self._seq = 0
        self._segment = 0
        self._open: dict[int, bytes] = {}  # begun, not ended: carried into each new segment
        self._fd = self._new_segment()

    def begun(self, principal: str, at: float) -> int:
        self._seq += 1
        line = b"%d b %s %r\n" % (self._seq, _name(principal), at)
        self._open[self._seq] = line
        os.write(self._fd, line)
        return self._seq

    def ended(
        self, principal: str, at: float, prompt: int, completion: int, begun: int | None
    ) -> int:
        self._seq += 1
        if begun is not None:
            self._open.pop(begun, None)
        os.write(
            self._fd,
            b"%d d %s %r %d %d %d\n"
            % (self._seq, _name(principal), at, prompt, completion, begun or 0),
        )
        return self._seq

    def rotate(self) -> int:
        """Start a new segment (the requests running carried into it); the last line the
        older segments hold: what the batch being written covers."""
        through = self._seq
        old = self._fd
        self._fd = self._new_segment()
        os.close(old)
        return through

    def written(self) -> None:
        """The batch of the last :meth:`rotate` is in the database: the older segments go."""
        current = self._segment_path(self._segment)
        for path in self.directory.glob(f"*{SEGMENT_SUFFIX}"):
            if path != current:
                path.unlink(missing_ok=True)

    def close(self, *, saved: bool) -> bool:
        """At the end: with everything ``saved`` and no request unfinished the journal is
        removed (True); else it stays for the next start to replay."""
        os.close(self._fd)
        keep = not saved or bool(self._open)
        if not keep:
            shutil.rmtree(self.directory, ignore_errors=True)
        os.close(self._lock)
        return not keep

    def _new_segment(self) -> int:
        self._segment += 1
        fd = os.open(
            self._segment_path(self._segment),
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
            0o600,
        )
        if self._open:
            os.write(fd, b"".join(self._open.values()))
        return fd

    def _segment_path(self, number: int) -> Path:
        return self.directory / f"{number:08d}{SEGMENT_SUFFIX}"


def orphans(directory: Path, *, mine: str | None = None) -> Iterator[Orphan]:
    """The journals under ``directory`` whose process is gone (their lock is free), each
    read and held locked until discarded."""
    if not directory.is_dir():
        return
    for path in sorted(directory.iterdir()):
        if not path.is_dir() or path.name == mine:
            continue
        lock = _locked(path)
        if lock is None:
            continue  # a running process's
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
        for line in segment.read_bytes().split(b"\n"):
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
    try:
        parts = line.split(b" ")
        seq = int(parts[0])
        principal = json.loads(parts[2])
        if not isinstance(principal, str):
            return None
        at = float(parts[3])
        if parts[1] == b"b" and len(parts) == 4:
            return Unfinished(seq, principal, at)
        if parts[1] == b"d" and len(parts) == 7:
            return Ended(seq, principal, at, int(parts[4]), int(parts[5]), int(parts[6]))
    except (ValueError, IndexError, UnicodeDecodeError):
        pass
    return None


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
