"""Only a real ngrok agent is ever used: pyngrok's own `ngrok` script (which downloads ngrok when
run) is recognised without running it, and anything else must prove itself with `--version`.

Each candidate is a real executable on a real PATH; a shim that is run leaves a marker file."""

from __future__ import annotations

import io
import os
import re
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyngrok import conf as pyngrok_conf

from tests.helpers import FAKE_NGROK_AGENT, Env
from tray_app.errors import TunnelError
from tray_app.tunnel import ngrok_agent
from tray_app.tunnel.ngrok import NGROK_AUTHTOKEN, NgrokProvider
from tray_app.tunnel.ngrok_agent import Agent, find_agent, is_pyngrok_shim

FAKE_AGENT = FAKE_NGROK_AGENT
VENV_SHIM = Path(sys.executable).with_name("ngrok")  # pyngrok's console script, if installed
TOKEN = "2fakeAuthToken_" + "abc123XYZ" * 4


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def pip_shim(directory: Path, marker: Path) -> Path:
    """pyngrok's console script as pip writes it, except that running it leaves ``marker``
    and claims to be ngrok 3 (so only recognising it unrun keeps it out)."""
    return _executable(
        directory / "ngrok",
        f"#!{sys.executable}\n"
        "# -*- coding: utf-8 -*-\n"
        "import sys\n"
        f"open({str(marker)!r}, 'w').write('the shim ran')\n"
        "print('ngrok version 3.99.0')\n"
        "sys.exit(0)\n"
        "from pyngrok.ngrok import main\n"
        "if __name__ == '__main__':\n"
        "    sys.argv[0] = sys.argv[0].removesuffix('.exe')\n"
        "    sys.exit(main())\n",
    )


def shell_shim(directory: Path, marker: Path) -> Path:
    return _executable(
        directory / "ngrok",
        f"#!/bin/sh\necho ran > {marker}\necho 'ngrok version 3.99.0'\n"
        f'exec {sys.executable} -m pyngrok "$@"\n',
    )


def launcher_shim(directory: Path, marker: Path) -> Path:
    """A pip launcher as on Windows: a binary stub with the script zipped onto its end."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(
            "__main__.py", "import sys\nfrom pyngrok.ngrok import main\nsys.exit(main())\n"
        )
    path = directory / "ngrok"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"MZ\x90\x00\x03\x00\x00\x00" + b"\x00" * 512 + buffer.getvalue())
    path.chmod(0o755)
    return path


MakeShim = Callable[[Path, Path], Path]
SHIMS: dict[str, MakeShim] = {
    "pip console script": pip_shim,
    "shell wrapper": shell_shim,
    "exe launcher": launcher_shim,
}


def real_agent(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    link = directory / "ngrok"
    link.symlink_to(FAKE_AGENT)
    return link


def python_dir(tmp_path: Path) -> str:
    """A directory holding only `python3`, for the fake agent's `#!/usr/bin/env python3`."""
    directory = tmp_path / "python-only"
    if not directory.exists():
        directory.mkdir()
        (directory / "python3").symlink_to(sys.executable)
    return str(directory)


@pytest.fixture
def path_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # pyngrok's download location must not supply an agent behind the test's back.
    monkeypatch.setattr(pyngrok_conf, "DEFAULT_NGROK_PATH", str(tmp_path / "no-download"))


def use_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *directories: Path) -> str:
    value = os.pathsep.join([*map(str, directories), python_dir(tmp_path)])
    monkeypatch.setenv("PATH", value)
    return value


@dataclass(frozen=True)
class Impostor:
    """An executable named ngrok that is not the agent."""

    script: str
    reason: str  # what the error says about it


IMPOSTORS = {
    "exits non-zero": Impostor(
        "import sys; print('ngrok version 3.19.1'); sys.exit(1)", "exit status 1"
    ),
    "prints something else": Impostor("print('hello from another program')", "did not print"),
    "prints nothing": Impostor("pass", "did not print"),
    "version only on stderr": Impostor(
        "import sys; print('ngrok version 3.19.1', file=sys.stderr)", "did not print"
    ),
    "version inside other text": Impostor(
        "print('not ngrok version 3.19.1 at all')", "did not print"
    ),
    "ngrok 2": Impostor("print('ngrok version 2.3.41')", "needs version 3"),
}


def running(pid: int) -> bool:
    try:  # a zombie waiting for a reaper is not running
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def impostor(directory: Path, script: str) -> Path:
    return _executable(directory / "ngrok", f"#!{sys.executable}\n{script}\n")


# ---- pyngrok's shim is recognised unrun -------------------------------------------------------


@pytest.mark.usefixtures("path_env")
class TestPyngrokShimIsNeverRun:
    @pytest.mark.parametrize("make", SHIMS.values(), ids=SHIMS.keys())
    def test_shim_first_on_path_is_skipped_for_the_real_agent(
        self, make: MakeShim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        marker = tmp_path / "shim-ran"
        make(tmp_path / "venv-bin", marker)
        real = real_agent(tmp_path / "usr-bin")
        use_path(monkeypatch, tmp_path, tmp_path / "venv-bin", tmp_path / "usr-bin")
        assert find_agent() == Agent(real, "3.19.1")
        assert not marker.exists(), "the shim was run"

    @pytest.mark.parametrize("make", SHIMS.values(), ids=SHIMS.keys())
    def test_shim_alone_is_a_clear_error(
        self, make: MakeShim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        marker = tmp_path / "shim-ran"
        shim = make(tmp_path / "venv-bin", marker)
        use_path(monkeypatch, tmp_path, tmp_path / "venv-bin")
        with pytest.raises(TunnelError) as caught:
            find_agent()
        message = str(caught.value)
        assert f"{shim} is pyngrok's `ngrok` command" in message
        assert "does not download programs" in message and "ngrok.com/download" in message
        assert not marker.exists()

    @pytest.mark.parametrize("make", SHIMS.values(), ids=SHIMS.keys())
    def test_configured_shim_is_one_sentence_with_the_fix(
        self, make: MakeShim, tmp_path: Path
    ) -> None:
        marker = tmp_path / "shim-ran"
        shim = make(tmp_path / "venv-bin", marker)
        with pytest.raises(TunnelError) as caught:
            find_agent(str(shim))
        message = str(caught.value)
        assert message.startswith(f"tunnel.ngrok_path points to {shim}, which is pyngrok's")
        assert "set tunnel.ngrok_path" in message and "ngrok.com/download" in message
        assert message.count(". ") == 0 and "\n" not in message  # one sentence
        assert not marker.exists()

    def test_pyngrok_as_installed_here_is_recognised(self) -> None:
        if not VENV_SHIM.exists():
            pytest.skip("pyngrok's console script is not installed next to this Python")
        assert is_pyngrok_shim(VENV_SHIM)

    def test_the_fake_agent_is_not_mistaken_for_the_shim(self) -> None:
        # Its docstring mentions pyngrok; only code that runs pyngrok makes a shim.
        assert "pyngrok" in FAKE_AGENT.read_text()
        assert not is_pyngrok_shim(FAKE_AGENT)

    async def test_serving_through_the_provider_never_runs_the_shim(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from tray_app.secret_store.base import MemorySecretStore

        marker = tmp_path / "shim-ran"
        pip_shim(tmp_path / "venv-bin", marker)
        use_path(monkeypatch, tmp_path, tmp_path / "venv-bin")
        provider = NgrokProvider(
            MemorySecretStore({NGROK_AUTHTOKEN: TOKEN}), tmp_path / "ngrok-state"
        )
        with pytest.raises(TunnelError, match="pyngrok's `ngrok` command"):
            await provider.open(1)
        assert not marker.exists()
        assert provider.agent_pid is None


# ---- anything else must prove itself with --version -----------------------------------------


@pytest.mark.usefixtures("path_env")
class TestOnlyARealAgentCounts:
    @pytest.mark.parametrize("kind", IMPOSTORS.values(), ids=IMPOSTORS.keys())
    def test_configured_impostor_is_refused(self, kind: Impostor, tmp_path: Path) -> None:
        path = impostor(tmp_path / "bin", kind.script)
        with pytest.raises(TunnelError) as caught:
            find_agent(str(path))
        assert f"tunnel.ngrok_path points to {path}, which is not the ngrok agent" in str(
            caught.value
        )
        assert kind.reason in str(caught.value)

    @pytest.mark.parametrize("kind", IMPOSTORS.values(), ids=IMPOSTORS.keys())
    def test_impostor_on_path_is_passed_over(
        self, kind: Impostor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        impostor(tmp_path / "first", kind.script)
        use_path(monkeypatch, tmp_path, tmp_path / "first")
        with pytest.raises(TunnelError, match=re.escape(kind.reason)):
            find_agent()
        real = real_agent(tmp_path / "second")
        use_path(monkeypatch, tmp_path, tmp_path / "first", tmp_path / "second")
        assert find_agent().path == real

    def test_the_real_agent_is_accepted_by_path_and_by_setting(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        assert find_agent(str(FAKE_AGENT)) == Agent(FAKE_AGENT, "3.19.1")
        for line in ("ngrok version 3.3.0", "ngrok version 3.20.0-msix", "ngrok version 4.0.1"):
            path = impostor(tmp_path / line.replace(" ", "_"), f"print({line!r})")
            assert find_agent(str(path)).version == line.removeprefix("ngrok version ")

    def test_an_agent_that_answers_within_the_timeout_counts(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(ngrok_agent, "VERSION_TIMEOUT", 3.0)
        path = impostor(
            tmp_path / "bin", "import time; time.sleep(0.5); print('ngrok version 3.19.1')"
        )
        assert find_agent(str(path)).version == "3.19.1"

    def test_an_agent_that_hangs_is_given_up_on_children_and_all(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(ngrok_agent, "VERSION_TIMEOUT", 0.5)
        pid_file = tmp_path / "child.pid"
        # A shell wrapper whose child holds the output pipe open: killing the shell alone
        # would leave the wait hanging for the child's 20 s.
        child = tmp_path / "child.py"
        child.write_text(
            f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
            "time.sleep(20)\n"
        )
        path = _executable(
            tmp_path / "bin" / "ngrok",
            f"#!/bin/sh\n{sys.executable} {child}\necho 'ngrok version 3.19.1'\n",
        )
        started = time.monotonic()
        with pytest.raises(TunnelError, match=r"did not answer within 0\.5 s"):
            find_agent(str(path))
        assert time.monotonic() - started < 5
        child_pid = int(pid_file.read_text())
        deadline = time.monotonic() + 5
        while running(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(child_pid), "the wrapper's child was left running"

    def test_an_empty_path_entry_is_not_the_current_directory(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        real_agent(tmp_path)
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("PATH", os.pathsep + python_dir(tmp_path))
        with pytest.raises(TunnelError, match="not installed"):
            find_agent()


# ---- doctor says the same, without running the shim -----------------------------------------


class TestDoctorReportsOnlyARealAgent:
    def doctor(self, env: Env, tmp_path: Path, path: str, **extra: str) -> str:
        result = env.run(
            "doctor",
            extra={
                "PATH": path,
                "LMGATE_TUNNEL_PROVIDER": "ngrok",
                "XDG_STATE_HOME": str(tmp_path / "state"),
                # pyngrok's download location, so an earlier download cannot stand in.
                "XDG_CONFIG_HOME": str(tmp_path / "config"),
                "HOME": str(tmp_path / "home"),
                **extra,
            },
        )
        return result.stdout

    def test_shim_before_the_real_agent(self, env: Env, tmp_path: Path) -> None:
        marker = tmp_path / "shim-ran"
        pip_shim(tmp_path / "venv-bin", marker)
        real = real_agent(tmp_path / "usr-bin")
        path = os.pathsep.join([str(tmp_path / "venv-bin"), str(real.parent), python_dir(tmp_path)])
        out = self.doctor(env, tmp_path, path)
        assert re.search(
            rf"^ok\s+ngrok agent\s+{re.escape(str(real))}: ngrok version 3\.19\.1$", out, re.M
        ), out
        assert not marker.exists()

    def test_shim_only_is_not_an_agent(self, env: Env, tmp_path: Path) -> None:
        marker = tmp_path / "shim-ran"
        shim = pip_shim(tmp_path / "venv-bin", marker)
        out = self.doctor(env, tmp_path, os.pathsep.join([str(shim.parent), python_dir(tmp_path)]))
        line = next(x for x in out.splitlines() if "ngrok agent" in x)
        assert line.startswith("FAIL"), out
        assert f"{shim} is pyngrok's `ngrok` command" in line
        assert "Downloading" not in out and not marker.exists()

    def test_configured_shim_is_not_an_agent(self, env: Env, tmp_path: Path) -> None:
        marker = tmp_path / "shim-ran"
        shim = pip_shim(tmp_path / "venv-bin", marker)
        out = self.doctor(env, tmp_path, python_dir(tmp_path), LMGATE_TUNNEL_NGROK_PATH=str(shim))
        assert re.search(r"^FAIL\s+ngrok agent\s+tunnel\.ngrok_path points to .*pyngrok", out, re.M)
        assert not marker.exists()

    @pytest.mark.parametrize(
        "kind",
        [IMPOSTORS["exits non-zero"], IMPOSTORS["prints something else"]],
        ids=["exits non-zero", "prints something else"],
    )
    def test_impostor_is_not_an_agent(self, kind: Impostor, env: Env, tmp_path: Path) -> None:
        path = impostor(tmp_path / "bin", kind.script)
        out = self.doctor(env, tmp_path, os.pathsep.join([str(path.parent), python_dir(tmp_path)]))
        assert re.search(rf"^FAIL\s+ngrok agent\s+.*{re.escape(kind.reason)}", out, re.M), out

    def test_shim_is_a_note_when_ngrok_is_not_used(self, env: Env, tmp_path: Path) -> None:
        marker = tmp_path / "shim-ran"
        pip_shim(tmp_path / "venv-bin", marker)
        out = self.doctor(
            env,
            tmp_path,
            os.pathsep.join([str(tmp_path / "venv-bin"), python_dir(tmp_path)]),
            LMGATE_TUNNEL_PROVIDER="lan",
        )
        assert re.search(
            r"^ok\s+ngrok agent\s+not needed \(tunnel\.provider is lan\): .*pyngrok", out, re.M
        ), out
        assert not marker.exists()


def test_a_downloader_behind_a_wrapper_can_reach_no_download_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pyenv-style wrapper hides pyngrok's script from the shim check; then --version runs
    it, but every HTTP(S) request it makes goes to a closed port, so it fetches nothing and
    does not count as an agent."""
    seen = tmp_path / "seen-proxy"
    downloader = tmp_path / "hidden" / "ngrok-downloader"
    downloader.parent.mkdir()
    downloader.write_text(
        f"#!{sys.executable}\n"
        "import os, sys, urllib.request\n"
        f"open({str(seen)!r}, 'w').write(os.environ.get('HTTPS_PROXY', ''))\n"
        "try:\n"
        "    urllib.request.urlopen('https://bin.equinox.io/c/ngrok.zip', timeout=5)\n"
        "except Exception:\n"
        "    sys.exit(1)\n"
        "print('ngrok version 3.19.1')\n"
    )
    downloader.chmod(0o755)
    wrapper = tmp_path / "shims" / "ngrok"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec "{downloader}" "$@"\n')
    wrapper.chmod(0o755)
    use_path(monkeypatch, tmp_path, tmp_path / "shims")
    with pytest.raises(TunnelError):
        find_agent()
    assert seen.read_text() == "http://127.0.0.1:9"
