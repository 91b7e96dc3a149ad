"""Running a tunnel agent as a child process that is ours, and stopping it for sure.

- The agent starts in its own session (a terminal's Ctrl-C must not kill it behind the
  tunnel's orderly close) with stdin closed; a secret it needs comes in its environment,
  never its argv (``/proc/PID/environ`` is readable only by the same user; argv by everyone).
- A PID file, written the moment the process exists, names it and a fragment of its command
  line; an agent of ours left by a crash is stopped at the next start by that file, and only
  if its command line still carries the fragment — never someone else's process.
- Its output is read line by line on a thread, each line bounded, and only a short redacted
  tail is kept: what the agent printed may name a secret.
- A watcher thread reports an exit nobody asked for, so the manager can reconnect.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

log = logging.getLogger("lmgate.tunnel.agent")

LINE_LIMIT = 4096
TAIL_LINES = 40
STOP_SECONDS = 5.0


def command_line(pid: int) -> str | None:
    """The command line of process ``pid``, or None if it cannot be read (or is gone)."""
    proc = Path(f"/proc/{pid}/cmdline")
    if proc.exists():
        try:
            return proc.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return None
    if sys.platform == "win32":
        return None
    try:
        # ps from PATH with a numeric argument: nothing untrusted reaches the command line.
        result = subprocess.run(  # noqa: S603
            ["ps", "-p", str(pid), "-o", "command="],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=5,
        )
        return result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        # A zombie child of ours still answers kill(0); reap it if it is ours.
        with contextlib.suppress(ChildProcessError, OSError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        time.sleep(0.05)
    return False


def agent_environment(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without LM Gate's own variables: LMGATE_SECRET_* holds the secret store's
    secrets when it is the environment, and no agent needs any of them."""
    return {k: v for k, v in env.items() if not k.upper().startswith("LMGATE_")}


def stop_pid(pid: int, timeout: float = STOP_SECONDS) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout``."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
        if not wait_gone(pid, timeout):
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid, timeout)


# Linux ties a child to the thread that started it (PR_SET_PDEATHSIG): when LM Gate dies,
# even by SIGKILL, its agent is sent SIGTERM, instead of forwarding the public URL's traffic
# to a port any local user could then bind (phones' bearer tokens included). The call is
# resolved here, before any fork; the child runs only it between fork and exec.
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent(parent: int) -> None:
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:
        os._exit(1)  # the parent died before the tie was made: nobody to serve


def die_with_us() -> Callable[[], None] | None:
    """A ``preexec_fn`` that ties the child to this process (Linux), or None elsewhere."""
    return functools.partial(_die_with_parent, os.getpid()) if _prctl is not None else None


def _signal_group(proc: subprocess.Popen[bytes], number: signal.Signals) -> None:
    """Signal the agent and whatever it started (its session is its own)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if sys.platform == "win32":
            proc.kill()
        else:
            os.killpg(proc.pid, number)


class AgentProcess:
    """One agent child process at a time, with its PID file at ``pid_path``."""

    def __init__(
        self,
        program: str,
        pid_path: Path,
        *,
        redact: Callable[[str], str] = lambda text: text,
        on_line: Callable[[str], None] | None = None,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        self._program = program
        self.pid_path = pid_path
        self._redact = redact
        self._on_line = on_line
        self._on_exit = on_exit
        self._proc: subprocess.Popen[bytes] | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._lock = threading.Lock()
        self._stopping = False

    # ---- state -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return None if proc is None else proc.pid

    @property
    def running(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    @property
    def returncode(self) -> int | None:
        proc = self._proc
        return None if proc is None else proc.poll()

    def tail(self) -> list[str]:
        """The agent's last lines, redacted."""
        with self._lock:
            return list(self._tail)

    # ---- starting and stopping --------------------------------------------------------------

    def start(self, argv: Sequence[str], env: Mapping[str, str], marker: str) -> None:
        """Start ``argv`` (argv[0] a proven agent) with exactly ``env``; ``marker`` is a part
        of the command line that shows the process is ours. Raises OSError."""
        if marker not in " ".join(argv):
            raise ValueError("the marker must be part of the command line")
        # A crash's leftover first: stop() would forget the PID file that names it.
        self.stop_stale()
        self.stop()
        self._stopping = False
        with self._lock:
            self._tail.clear()
        # Made private if it is new; the provider that owns the directory tightens an old one
        # (never this code: a PID file's directory is not always ours to change).
        self.pid_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The agent's path was proven by running it; nothing here goes through a shell.
        proc = subprocess.Popen(  # noqa: S603
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=agent_environment(env),
            start_new_session=sys.platform != "win32",
            # The thread that starts an agent lives as long as the event loop's executor: the
            # tie fires when LM Gate ends, not before.
            preexec_fn=die_with_us(),
        )
        self._proc = proc
        self._write_pid(proc.pid, marker)
        assert proc.stdout is not None
        threading.Thread(
            target=self._read, args=(proc.stdout,), daemon=True, name=f"{self._program}-output"
        ).start()
        threading.Thread(
            target=self._watch, args=(proc,), daemon=True, name=f"{self._program}-watch"
        ).start()

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Stop our agent (SIGTERM to its group, then SIGKILL) and remove the PID file."""
        self._stopping = True
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout)
            if proc.stdout is not None:
                with contextlib.suppress(OSError):
                    proc.stdout.close()
            # Only the file that named the agent just stopped: one left by a crash still
            # names that agent, for stop_stale().
            self.pid_path.unlink(missing_ok=True)

    def stop_stale(self) -> bool:
        """Stop an agent of ours left by a crash (by the PID file); True if one was stopped."""
        try:
            record = json.loads(self.pid_path.read_text(encoding="utf-8"))
            pid, marker = int(record["pid"]), str(record["marker"])
        except (FileNotFoundError, ValueError, KeyError, TypeError, OSError):
            self.pid_path.unlink(missing_ok=True)
            return False
        command = command_line(pid)
        ours = marker in (command or "") and self._program.lower() in (command or "").lower()
        if pid <= 0 or not ours:
            # Not running, or not ours: leave it alone.
            self.pid_path.unlink(missing_ok=True)
            return False
        log.warning(
            "stopping a %s agent left running by an earlier LM Gate (pid %d)", self._program, pid
        )
        stop_pid(pid)
        self.pid_path.unlink(missing_ok=True)
        return True

    # ---- threads -----------------------------------------------------------------------

    def _write_pid(self, pid: int, marker: str) -> None:
        temporary = self.pid_path.with_suffix(".tmp")
        temporary.unlink(missing_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"pid": pid, "marker": marker}, handle)
        temporary.replace(self.pid_path)

    def _read(self, stream: IO[bytes]) -> None:
        # The pipe is closed here at its end too: an agent that ended with nobody calling
        # stop() (stopped by the next LM Gate, after a crash of this one) leaves nothing open.
        with contextlib.suppress(OSError, ValueError), stream:
            while True:
                raw = stream.readline(LINE_LIMIT)
                if not raw:
                    return
                line = self._redact(raw.decode(errors="replace").rstrip("\r\n"))
                with self._lock:
                    self._tail.append(line)
                if self._on_line is not None and not self._stopping:
                    try:
                        self._on_line(line)
                    except Exception:
                        log.exception("reading the %s agent's output failed", self._program)

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        if not self._stopping and self._proc is proc and self._on_exit is not None:
            self._on_exit(code)
