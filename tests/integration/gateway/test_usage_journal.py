"""The usage journal: what a process killed with SIGKILL had counted and not saved is saved by
the next one to start on its data directory, exactly once, and requests that were under way
are counted and said to be (issue 19: usage sums exactly with a replica killed mid-load).

The processes killed here are real ones (a recorder in a child Python, SIGKILLed after it
printed what it counted), so what survives is what the kernel kept, not what a test wrote.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tray_app.clock import SystemClock
from tray_app.gateway.accounting import UsageRecorder
from tray_app.gateway.upstream.usage import Usage
from tray_app.storage.database import Database
from tray_app.storage.usage_journal import META_PREFIX, REPLAYED, UsageJournal, orphans

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tray_app.clock import SystemClock
    from tray_app.gateway.accounting import UsageRecorder
    from tray_app.gateway.upstream.usage import Usage
    from tray_app.storage.database import Database

    home = Path(sys.argv[1])
    flushed, unflushed, running = (int(n) for n in sys.argv[2:5])
    recorder = UsageRecorder(Database.in_directory(home / "data"), SystemClock())
    recorder.keep_journal(home / "data" / "usage-journal")
    for n in range(flushed + unflushed):
        begun = recorder.begin("key:a" if n % 2 else "device:b")
        recorder.record("key:a" if n % 2 else "device:b", Usage(10 + n, 2 * n), begun)
        if n + 1 == flushed:
            assert recorder.flush()
    for _ in range(running):
        recorder.begin("key:a")
    print("counted", flush=True)
    time.sleep(60)
    """
)


def killed_child(home: Path, flushed: int, unflushed: int, running: int) -> None:
    """A recorder that counted ``flushed`` requests and saved them, ``unflushed`` more it
    did not save, and ``running`` under way, SIGKILLed."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(home), str(flushed), str(unflushed), str(running)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])},
    )
    assert child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "counted"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        child.stdout.close()


def disk_full(fd: int) -> None:
    """Every write to ``fd`` from now on fails as on a full disk (ENOSPC)."""
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, fd)
    os.close(full)


def expected(requests: int) -> dict[str, tuple[int, int, int]]:
    totals: dict[str, list[int]] = {}
    for n in range(requests):
        counted = totals.setdefault("key:a" if n % 2 else "device:b", [0, 0, 0])
        counted[0] += 1
        counted[1] += 10 + n
        counted[2] += 2 * n
    return {name: (r, p, c) for name, (r, p, c) in totals.items()}


def stored(db: Database) -> dict[str, tuple[int, int, int]]:
    return {r.principal: (r.requests, r.prompt_tokens, r.completion_tokens) for r in db.usage()}


def hour_totals(db: Database) -> tuple[int, int]:
    rows = db.query("SELECT SUM(requests) AS r, SUM(prompt_tokens) AS p FROM usage_hours")
    return rows[0]["r"], rows[0]["p"]


def next_start(home: Path) -> tuple[UsageRecorder, Database]:
    db = Database.in_directory(home / "data")
    recorder = UsageRecorder(db, SystemClock())
    recorder.keep_journal(home / "data" / "usage-journal")
    return recorder, db


def test_a_killed_process_usage_is_saved_exactly_once_by_the_next(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    killed_child(tmp_path, flushed=7, unflushed=13, running=0)
    db = Database.in_directory(tmp_path / "data")
    assert stored(db) == expected(7)  # what the kill took: the 13 not saved
    db.close()

    with caplog.at_level(logging.INFO, logger="lmgate.accounting"):
        _, db = next_start(tmp_path)
    assert stored(db) == expected(20)
    assert hour_totals(db) == (20, sum(10 + n for n in range(20)))
    assert "usage of 13 requests that LM Gate had counted but not saved" in caplog.text
    # Replayed once: the journal is gone, and a third start adds nothing.
    journals = list((tmp_path / "data" / "usage-journal").iterdir())
    assert len(journals) == 1  # the second start's own
    assert db.query("SELECT key FROM meta WHERE key LIKE 'usage-journal:%'") == []
    db.close()
    _, db = next_start(tmp_path)
    assert stored(db) == expected(20)
    db.close()


def test_requests_under_way_at_the_kill_are_counted_and_said_to_be(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    killed_child(tmp_path, flushed=4, unflushed=0, running=3)
    with caplog.at_level(logging.INFO, logger="lmgate.accounting"):
        _, db = next_start(tmp_path)
    saved = expected(4)
    r, p, c = saved["key:a"]
    assert stored(db) == {**saved, "key:a": (r + 3, p, c)}  # requests, tokens not known
    assert "3 requests were under way when LM Gate stopped" in caplog.text
    assert "counted but not saved" not in caplog.text
    db.close()


def test_a_request_running_across_flushes_is_carried_into_each_segment(tmp_path: Path) -> None:
    db = Database.in_directory(tmp_path / "data")
    recorder = UsageRecorder(db, SystemClock())
    recorder.keep_journal(tmp_path / "journal")
    long = recorder.begin("key:long")
    assert long is not None
    for _ in range(3):
        recorder.record("key:short", Usage(1, 1), recorder.begin("key:short"))
        assert recorder.flush()
    # Only the current segment is left, and it still knows the long request began.
    (own,) = (tmp_path / "journal").iterdir()
    (segment,) = own.glob("*.journal")
    assert segment.read_bytes().startswith(b"%d b " % long)
    recorder.record("key:long", Usage(5, 5), long)
    assert recorder.flush()
    (segment,) = own.glob("*.journal")
    assert segment.read_bytes() == b""  # nothing running: nothing carried
    db.close()


def test_a_running_process_journal_is_never_replayed(tmp_path: Path) -> None:
    db = Database.in_directory(tmp_path / "data")
    first = UsageRecorder(db, SystemClock())
    first.keep_journal(tmp_path / "journal")
    first.record("key:a", Usage(3, 4), first.begin("key:a"))
    second = UsageRecorder(db, SystemClock())
    second.keep_journal(tmp_path / "journal")  # the first still runs: its lock is held
    assert stored(db) == {}
    assert len(list((tmp_path / "journal").iterdir())) == 2
    assert first.flush()
    assert stored(db) == {"key:a": (1, 3, 4)}
    db.close()


def test_a_replay_cut_short_after_its_commit_is_not_counted_twice(tmp_path: Path) -> None:
    killed_child(tmp_path, flushed=0, unflushed=5, running=1)
    (orphan_dir,) = (tmp_path / "data" / "usage-journal").iterdir()
    db = Database.in_directory(tmp_path / "data")
    # As if a replay had committed and died before removing the journal.
    db.add_usage([], journal_marks=[(META_PREFIX + orphan_dir.name, REPLAYED)])
    _, db = next_start(tmp_path)
    assert stored(db) == {}
    assert not orphan_dir.exists()
    db.close()


def test_a_database_down_at_the_start_leaves_the_journal_for_the_next(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    killed_child(tmp_path, flushed=0, unflushed=2, running=0)
    db = Database.in_directory(tmp_path / "data")
    recorder = UsageRecorder(db, SystemClock())
    db.close()  # every call fails now, as PostgreSQL gone would
    with caplog.at_level(logging.ERROR, logger="lmgate.accounting"):
        recorder.keep_journal(tmp_path / "data" / "usage-journal")
    assert "will be at the next start" in caplog.text
    _, db = next_start(tmp_path)
    assert stored(db) == expected(2)
    db.close()


def test_a_failed_flush_keeps_the_journal_until_one_succeeds(tmp_path: Path) -> None:
    db = Database.in_directory(tmp_path / "data")
    recorder = UsageRecorder(db, SystemClock())
    recorder.keep_journal(tmp_path / "journal")
    recorder.record("key:a", Usage(1, 2), recorder.begin("key:a"))
    real = db.add_usage

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    db.add_usage = refuse  # type: ignore[method-assign]
    assert not recorder.flush()
    recorder.record("key:a", Usage(1, 2), recorder.begin("key:a"))
    (own,) = (tmp_path / "journal").iterdir()
    assert len(list(own.glob("*.journal"))) == 2  # the failed batch's segment is kept
    db.add_usage = real  # type: ignore[method-assign]
    assert recorder.flush()
    assert len(list(own.glob("*.journal"))) == 1
    assert stored(db) == {"key:a": (2, 2, 4)}
    db.close()


def test_a_journal_that_cannot_be_written_leaves_counting_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database.in_directory(tmp_path / "data")
    recorder = UsageRecorder(db, SystemClock())
    recorder.keep_journal(tmp_path / "journal")
    journal = recorder._journal
    assert journal is not None
    disk_full(journal._fd)
    with caplog.at_level(logging.ERROR, logger="lmgate.accounting"):
        recorder.record("key:a", Usage(1, 2), recorder.begin("key:a"))
    assert "the usage journal could not be written" in caplog.text
    assert recorder.begin("key:a") is None
    assert recorder.flush()
    assert stored(db) == {"key:a": (1, 1, 2)}
    db.close()


@pytest.mark.parametrize(
    "line",
    [b"", b"x", b"1 b", b'1 b "k"', b'1 q "k" 1.0', b"1 b 5 1.0", b'1 d "k" 1.0 1 2', b"\xff"],
)
def test_lines_that_cannot_be_read_are_counted_as_torn(tmp_path: Path, line: bytes) -> None:
    journal = UsageJournal(tmp_path)
    journal.ended("key:a", 1.0, 1, 2, None)
    os.write(journal._fd, line + b"\n")
    journal.close(saved=False)
    (orphan,) = orphans(tmp_path)
    assert [e.principal for e in orphan.ended] == ["key:a"]
    assert orphan.torn == (1 if line else 0)
    orphan.discard()


def test_principals_of_any_spelling_survive_the_journal(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path)
    names = ["owner with spaces", "line\nbreak", "é ü 東京", 'quote " back\\slash']
    for name in names:
        journal.ended(name, 2.5, 1, 1, journal.begun(name, 2.0))
    journal.close(saved=False)
    (orphan,) = orphans(tmp_path)
    assert [e.principal for e in orphan.ended] == names
    assert [e.at for e in orphan.ended] == [2.5] * 4
    assert orphan.unfinished == ()
    orphan.discard()


def test_a_clean_close_removes_the_journal_and_an_unsaved_one_keeps_it(tmp_path: Path) -> None:
    saved = UsageJournal(tmp_path / "a")
    saved.ended("k", 1.0, 1, 1, None)
    assert saved.close(saved=True)
    assert list((tmp_path / "a").iterdir()) == []
    running = UsageJournal(tmp_path / "b")
    running.begun("k", 1.0)
    assert not running.close(saved=True)  # a request still under way
    unsaved = UsageJournal(tmp_path / "c")
    assert not unsaved.close(saved=False)
    for kept in ("b", "c"):
        assert len(list((tmp_path / kept).iterdir())) == 1
    assert os.stat(next((tmp_path / "b").iterdir())).st_mode & 0o777 == 0o700


def test_the_journal_is_kept_once_per_process(tmp_path: Path) -> None:
    db = Database.in_directory(tmp_path / "data")
    recorder = UsageRecorder(db, SystemClock())
    recorder.keep_journal(tmp_path / "journal")
    first = recorder._journal
    recorder.keep_journal(tmp_path / "journal")  # a gateway started again, same process
    assert recorder._journal is first
    assert len(list((tmp_path / "journal").iterdir())) == 1
    db.close()


def test_a_journal_gone_at_the_end_of_a_request_or_at_a_flush_leaves_counting_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database.in_directory(tmp_path / "data")
    recorder = UsageRecorder(db, SystemClock())
    recorder.keep_journal(tmp_path / "journal")
    journal = recorder._journal
    assert journal is not None
    begun = recorder.begin("key:a")
    disk_full(journal._fd)
    with caplog.at_level(logging.ERROR, logger="lmgate.accounting"):
        recorder.record("key:a", Usage(1, 2), begun)
    assert "the usage journal could not be written" in caplog.text
    assert recorder.flush()
    assert stored(db) == {"key:a": (1, 1, 2)}

    again = UsageRecorder(db, SystemClock())
    again.keep_journal(tmp_path / "second")
    again.record("key:b", Usage(3, 4), again.begin("key:b"))
    shutil.rmtree(tmp_path / "second")  # its next segment cannot be made
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="lmgate.accounting"):
        assert again.flush()
    assert "the usage journal could not be written" in caplog.text
    assert stored(db)["key:b"] == (1, 3, 4)
    assert again.begin("key:b") is None
    db.close()


def test_lines_a_replay_cannot_read_are_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = UsageJournal(tmp_path / "journal")
    journal.ended("key:a", 1.0, 1, 2, None)
    os.write(journal._fd, b"garbage\n")
    journal.close(saved=False)
    db = Database.in_directory(tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="lmgate.accounting"):
        UsageRecorder(db, SystemClock()).keep_journal(tmp_path / "journal")
    assert "1 lines of a usage journal could not be read" in caplog.text
    assert stored(db) == {"key:a": (1, 1, 2)}
    db.close()


def test_a_journal_that_cannot_be_read_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert list(orphans(tmp_path / "none")) == []
    journal = UsageJournal(tmp_path)
    (journal.directory / "00000009.journal").mkdir()  # reading it fails
    journal.close(saved=False)
    with caplog.at_level(logging.ERROR, logger="lmgate.accounting"):
        assert list(orphans(tmp_path)) == []
    assert "a usage journal could not be read" in caplog.text
    assert journal.directory.exists()
    # Its lock was let go: once readable, it is replayed.
    (journal.directory / "00000009.journal").rmdir()
    (orphan,) = orphans(tmp_path)
    orphan.discard()


def test_closing_removes_a_journal_with_everything_saved_and_keeps_one_without(
    tmp_path: Path,
) -> None:
    db = Database.in_directory(tmp_path / "data")
    saved = UsageRecorder(db, SystemClock())
    saved.keep_journal(tmp_path / "data" / "usage-journal")
    saved.record("key:a", Usage(1, 2), saved.begin("key:a"))
    assert saved.flush()
    saved.close()
    assert list((tmp_path / "data" / "usage-journal").iterdir()) == []
    assert saved.begin("key:a") is None  # closed: nothing journaled any more
    saved.close()  # twice is harmless

    unsaved = UsageRecorder(db, SystemClock())
    unsaved.keep_journal(tmp_path / "data" / "usage-journal")
    unsaved.record("key:b", Usage(3, 4), unsaved.begin("key:b"))
    unsaved.close()  # the database was never written: the next start does it
    _, db2 = next_start(tmp_path)
    assert stored(db2) == {"key:a": (1, 1, 2), "key:b": (1, 3, 4)}
    db2.close()
    db.close()


def test_a_write_that_failed_is_not_counted_again_at_the_next_start(tmp_path: Path) -> None:
    # The journal stopped at the failure; what it holds is saved by the next flush, which
    # marks it replayed, so the next start adds nothing.
    recorder, db = next_start(tmp_path)
    recorder.record("key:a", Usage(10, 5), recorder.begin("key:a"))
    running = recorder.begin("key:a")  # under way when the disk fills
    journal = recorder._journal
    assert journal is not None
    disk_full(journal._fd)
    recorder.record("key:a", Usage(10, 5), recorder.begin("key:a"))
    recorder.record("key:a", Usage(1, 1), running)
    assert recorder.flush()
    assert stored(db) == {"key:a": (3, 21, 11)}
    assert not journal.directory.exists()
    recorder.close()
    db.close()
    _, db = next_start(tmp_path)
    assert stored(db) == {"key:a": (3, 21, 11)}
    db.close()


def test_a_write_failure_before_any_save_is_replayed_by_the_next_start(tmp_path: Path) -> None:
    # Killed before the flush that would have saved it: its lines up to the failure are the
    # next start's to save.
    recorder, db = next_start(tmp_path)
    recorder.record("key:a", Usage(10, 5), recorder.begin("key:a"))
    journal = recorder._journal
    assert journal is not None
    disk_full(journal._fd)
    recorder.record("key:a", Usage(10, 5), recorder.begin("key:a"))
    journal.close(saved=False)  # the process ends: its lock goes, its files stay
    _, db2 = next_start(tmp_path)
    assert stored(db2) == {"key:a": (1, 10, 5)}  # the line it wrote; the rest died with it
    db2.close()
    db.close()


def test_a_failed_replay_and_its_release_close_the_lock_once(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path)
    journal.ended("key:a", 1.0, 1, 2, None)
    journal.close(saved=False)
    (orphan,) = orphans(tmp_path)
    assert orphan.discard()
    orphan.release()  # again: does nothing (the number may be another file's now)


def test_a_data_directory_that_cannot_hold_a_journal_leaves_the_gateway_counting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "journal").write_text("not a directory")
    db = Database.in_directory(tmp_path / "data")
    recorder = UsageRecorder(db, SystemClock())
    with caplog.at_level(logging.ERROR, logger="lmgate.accounting"):
        recorder.keep_journal(tmp_path / "journal")
    assert "no usage journal can be kept" in caplog.text
    assert recorder.begin("key:a") is None
    recorder.record("key:a", Usage(1, 2))
    assert recorder.flush()
    assert stored(db) == {"key:a": (1, 1, 2)}
    db.close()


def test_a_journal_being_made_and_a_planted_link_are_never_replayed(tmp_path: Path) -> None:
    elsewhere = UsageJournal(tmp_path / "elsewhere")
    elsewhere.ended("key:victim", 1.0, 10**6, 0, None)
    elsewhere.close(saved=False)
    journals = tmp_path / "data" / "usage-journal"
    journals.mkdir(parents=True)
    (journals / "planted").symlink_to(elsewhere.directory)
    making = UsageJournal(tmp_path / "making")
    making.ended("key:victim", 1.0, 10**6, 0, None)
    making.close(saved=False)
    making.directory.rename(journals / ".abc")  # as if its process were still making it
    _, db = next_start(tmp_path)
    assert stored(db) == {}
    assert sorted(p.name for p in elsewhere.directory.iterdir()) == ["00000001.journal", "lock"]
    db.close()


class SlowDatabase(Database):
    """A database whose usage writes take a while: a flush still writing when the next
    flush comes."""

    def add_usage(self, *args: Any, **kwargs: Any) -> None:
        time.sleep(0.3)
        super().add_usage(*args, **kwargs)


def test_a_flush_beside_one_still_writing_waits_for_it(tmp_path: Path) -> None:
    db = SlowDatabase.in_directory(tmp_path / "data")
    recorder = UsageRecorder(db, SystemClock())
    recorder.keep_journal(tmp_path / "data" / "usage-journal")
    recorder.record("key:first", Usage(1, 1), recorder.begin("key:first"))
    writing = threading.Thread(target=recorder.flush)
    writing.start()
    time.sleep(0.1)  # the first flush is in its database write
    recorder.record("key:second", Usage(2, 2), recorder.begin("key:second"))
    assert recorder.flush()  # the final one, at shutdown
    writing.join()
    recorder.close()
    assert stored(db) == {"key:first": (1, 1, 1), "key:second": (1, 2, 2)}
    assert list((tmp_path / "data" / "usage-journal").iterdir()) == []
    assert db.query("SELECT key FROM meta WHERE key LIKE 'usage-journal:%'") == []
    db.close()


@pytest.mark.parametrize(
    "line",
    [
        b'1 d "k" 1.0 -5 2 0',
        b'1 d "k" 1.0 5 +2 0',
        b'-1 b "k" 1.0',
        b'1 d "k" 1.0 5 2 0x1',
        b'1 d "k" nan 5 2 0',
        b'1 b "k" inf',
        b'1 d "k" 1e400 5 2 0',
        b'1 b "k" -3.0',
    ],
)
def test_a_count_that_is_not_a_plain_decimal_is_not_believed(tmp_path: Path, line: bytes) -> None:
    journal = UsageJournal(tmp_path)
    os.write(journal._fd, line + b"\n")
    journal.close(saved=False)
    (orphan,) = orphans(tmp_path)
    assert (orphan.ended, orphan.unfinished, orphan.torn) == ((), (), 1)
    orphan.discard()


def test_a_last_line_cut_short_is_not_believed(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path)
    begun = journal.begun("key:a", 1.0)
    os.write(journal._fd, b'2 d "key:a" 1.0 5 5 %d' % begun)  # no end of line: cut short
    journal.close(saved=False)
    (orphan,) = orphans(tmp_path)
    assert orphan.ended == ()
    assert [u.seq for u in orphan.unfinished] == [begun]
    assert orphan.torn == 1
    orphan.discard()
