"""`lmgate upstream list|add|remove|test` in this process, on a real config file and file secret
store; `test` asks real fake LM Studios on 127.0.0.1."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest

from tests.fake_lmstudio import FakeLMStudio
from tests.integration.cli.in_process import Run
from tray_app.config.settings import load_config
from tray_app.config.upstreams import UpstreamEntry, token_secret_name
from tray_app.secret_store.base import read_or_none
from tray_app.secret_store.keyring_store import FileSecretStore


def config_of(tmp_path: Path) -> tuple[UpstreamEntry, ...]:
    return load_config(path=tmp_path / "none.toml", environ={}).all_upstreams


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(lmstudio_thread: FakeLMStudio) -> FakeLMStudio:
    """A fake LM Studio on its own loop thread (the CLI runs its own event loop)."""
    lmstudio_thread.behaviour.models = ("m1", "m2")
    lmstudio_thread.behaviour.require_token = "tok-desk"
    return lmstudio_thread


class TestAddListRemove:
    def test_a_new_config_lists_local_only(self, lmgate: Run) -> None:
        code, out, _ = lmgate("upstream", "list")
        assert code == 0
        assert out.splitlines()[1].split()[:4] == ["local", "http://127.0.0.1:1234", "1", "yes"]
        assert len(out.splitlines()) == 2

    def test_added_it_is_in_the_config_and_listed(self, lmgate: Run, tmp_path: Path) -> None:
        code, out, _ = lmgate("upstream", "add", "desk", "http://127.0.0.1:3000/", "--weight", "3")
        assert code == 0 and "restart" in out
        assert config_of(tmp_path)[1] == UpstreamEntry("desk", "http://127.0.0.1:3000", 3)
        code, out, _ = lmgate("upstream", "list")
        assert [line.split()[0] for line in out.splitlines()[1:]] == ["local", "desk"]
        assert "[upstreams.desk]" in (tmp_path / "none.toml").read_text()

    def test_disabled(self, lmgate: Run, tmp_path: Path) -> None:
        assert lmgate("upstream", "add", "box", "http://127.0.0.1:3000", "--disabled")[0] == 0
        assert config_of(tmp_path)[1].enabled is False

    def test_the_token_comes_from_stdin_into_the_store(
        self, lmgate: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr("sys.stdin", io.StringIO("sk-secret-desk\n"))
        code, out, err = lmgate("upstream", "add", "desk", "http://127.0.0.1:3000", "--token-stdin")
        assert code == 0 and "sk-secret-desk" not in out + err
        store = FileSecretStore(tmp_path / "secrets")
        assert read_or_none(store, token_secret_name("desk")) == "sk-secret-desk"
        assert "sk-secret-desk" not in (tmp_path / "none.toml").read_text()
        assert lmgate("upstream", "list")[1].splitlines()[2].split()[-1] == "set"
        # removed with its upstream
        assert lmgate("upstream", "remove", "desk")[0] == 0
        assert read_or_none(store, token_secret_name("desk")) is None
        assert len(config_of(tmp_path)) == 1

    def test_other_settings_survive_an_edit(self, lmgate: Run, tmp_path: Path) -> None:
        (tmp_path / "none.toml").write_text("[server]\nport = 9100\n", encoding="utf-8")
        assert lmgate("upstream", "add", "desk", "http://127.0.0.1:3000")[0] == 0
        assert lmgate("upstream", "remove", "desk")[0] == 0
        config = load_config(path=tmp_path / "none.toml", environ={})
        assert config.server_port == 9100 and config.upstreams == ()


class TestRefused:
    @pytest.mark.parametrize(
        ("args", "words"),
        [
            (("add", "Desk", "http://127.0.0.1:1"), "name must be"),
            (("add", "local", "http://127.0.0.1:1"), "'local' is upstream.url"),
            (("add", "desk", "ftp://x"), "http://"),
            (("add", "desk", "http://u:p@127.0.0.1"), "password"),
            (("add", "desk", "http://127.0.0.1:1", "--weight", "0"), "the weight must be between"),
            (
                ("add", "desk", "http://127.0.0.1:1", "--weight", "101"),
                "the weight must be between",
            ),
            (("add", "desk", "192.168.1.30:8080"), "the url must start with http://"),
            (
                ("add", "twin", "http://localhost:1234/"),
                "is the server upstream 'local' is already",
            ),
            (("add", "twin", "http://127.0.0.1:1234"), "one machine is one upstream"),
            (("add", "twin", "http://localhost.:1234"), "one machine is one upstream"),
            (("add", "twin", "http://0.0.0.0:1234"), "one machine is one upstream"),
            (("add", "twin", "http://[::ffff:127.0.0.1]:1234"), "one machine is one upstream"),
            (("add", "twin", "http://[0:0:0:0:0:0:0:1]:1234"), "one machine is one upstream"),
            (("add", "desk", "http://ex\u202eample.com:1"), "spaces or control characters"),
            (("add", "desk", "http://a b.example:1"), "spaces or control characters"),
            (("remove", "local"), "cannot be removed"),
            (("remove", "ghost"), "no upstream is named 'ghost'"),
            (("test", "ghost"), "no upstream is named 'ghost'"),
        ],
    )
    def test_in_words_with_nothing_written(
        self, lmgate: Run, tmp_path: Path, args: tuple[str, ...], words: str
    ) -> None:
        code, _, err = lmgate("upstream", *args)
        assert code == 2
        assert words in err
        assert not (tmp_path / "none.toml").exists()

    def test_a_name_taken(self, lmgate: Run, tmp_path: Path) -> None:
        assert lmgate("upstream", "add", "desk", "http://127.0.0.1:3000")[0] == 0
        code, _, err = lmgate("upstream", "add", "desk", "http://127.0.0.1:4000")
        assert code == 2 and "already" in err
        assert config_of(tmp_path)[1].url == "http://127.0.0.1:3000"

    def test_a_token_asked_for_and_not_given(
        self, lmgate: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
        code, _, err = lmgate("upstream", "add", "desk", "http://127.0.0.1:3000", "--token-stdin")
        assert code == 2 and "no token" in err
        assert not (tmp_path / "none.toml").exists()


class TestTheFileAndTheStore:
    def test_an_add_keeps_the_file_s_comments_and_its_permissions(
        self, lmgate: Run, tmp_path: Path
    ) -> None:
        config = tmp_path / "none.toml"
        config.write_text("# my LM Gate\n[server]\nport = 9100  # not 8080\n", encoding="utf-8")
        config.chmod(0o600)
        assert lmgate("upstream", "add", "desk", "http://127.0.0.1:3000", "--weight", "3")[0] == 0
        assert config.read_text(encoding="utf-8") == (
            "# my LM Gate\n[server]\nport = 9100  # not 8080\n\n"
            '[upstreams.desk]\nurl = "http://127.0.0.1:3000"\nweight = 3\n'
        )
        assert config.stat().st_mode & 0o777 == 0o600

    def test_a_symlinked_file_stays_a_link_to_the_file_it_names(
        self, lmgate: Run, tmp_path: Path
    ) -> None:
        real = tmp_path / "dotfiles" / "lmgate.toml"
        real.parent.mkdir()
        real.write_text("[server]\nport = 9100\n", encoding="utf-8")
        (tmp_path / "none.toml").symlink_to(real)
        assert lmgate("upstream", "add", "desk", "http://127.0.0.1:3000")[0] == 0
        assert (tmp_path / "none.toml").is_symlink()
        assert "[upstreams.desk]" in real.read_text(encoding="utf-8")

    def test_a_new_file_is_the_owner_s_alone(self, lmgate: Run, tmp_path: Path) -> None:
        assert lmgate("upstream", "add", "desk", "http://127.0.0.1:3000")[0] == 0
        assert (tmp_path / "none.toml").stat().st_mode & 0o777 == 0o600
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("none.toml.")] == []

    def test_an_address_beyond_ascii_leaves_a_file_that_still_reads(
        self, lmgate: Run, tmp_path: Path
    ) -> None:
        code, _, err = lmgate("upstream", "add", "emoji", "http://\U0001f600.example:1234")
        assert code == 0, err
        assert lmgate("upstream", "list")[0] == 0
        assert config_of(tmp_path)[1].url == "http://\U0001f600.example:1234"

    def test_a_token_left_from_an_earlier_upstream_of_that_name_is_forgotten(
        self, lmgate: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        store = FileSecretStore(tmp_path / "secrets")
        store.set(token_secret_name("desk"), "sk-old-machine")
        code, out, _ = lmgate("upstream", "add", "desk", "http://10.9.9.9:1234")
        assert code == 0 and "with its token" not in out
        assert "A token stored earlier as upstream-token-desk was deleted" in out
        assert read_or_none(store, token_secret_name("desk")) is None
        code, out, _ = lmgate("upstream", "remove", "desk")
        assert code == 0 and out.startswith("Removed upstream desk. ")  # it had none


class TestATokenLeftBehind:
    def test_a_remove_without_the_store_says_the_token_was_kept(
        self, lmgate: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr("sys.stdin", io.StringIO("sk-secret-desk\n"))
        assert lmgate("upstream", "add", "desk", "http://127.0.0.1:3000", "--token-stdin")[0] == 0
        blocked = tmp_path / "not-a-directory"
        blocked.write_text("", encoding="utf-8")
        monkeypatch.setenv("LMGATE_SECRETS_FILE_DIR", str(blocked / "secrets"))
        code, out, err = lmgate("upstream", "remove", "desk")
        assert code == 0 and out.startswith("Removed upstream desk. ")
        assert "the secret store could not be opened" in err
        assert "`lmgate secret delete upstream-token-desk`" in err
        assert len(config_of(tmp_path)) == 1

    def test_a_remove_that_deletes_it_says_nothing_more(self, lmgate: Run) -> None:
        assert lmgate("upstream", "add", "desk", "http://127.0.0.1:3000")[0] == 0
        code, _, err = lmgate("upstream", "remove", "desk")
        assert code == 0 and "Warning" not in err

    def test_is_not_sent_to_another_machine_added_by_hand_under_its_name(
        self, lmgate: Run, tmp_path: Path, served: FakeLMStudio, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr("sys.stdin", io.StringIO("tok-desk\n"))
        assert lmgate("upstream", "add", "desk", "http://10.9.9.9:1234", "--token-stdin")[0] == 0
        # The table edited by hand: the name now points at another machine, the token stays.
        config = tmp_path / "none.toml"
        config.write_text(
            config.read_text(encoding="utf-8").replace("http://10.9.9.9:1234", served.url),
            encoding="utf-8",
        )
        code, out, _ = lmgate("upstream", "test", "desk")
        assert code == 1
        assert "desk: its token is not sent: the token stored as upstream-token-desk was " in out
        assert "given for http://10.9.9.9:1234" in out
        assert "`lmgate secret set upstream-token-desk`" in out
        assert {r.headers.get("Authorization") for r in served.received} == {None}
        # The owner stores it again for this machine: sent from then on.
        monkeypatch.setattr("sys.stdin", io.StringIO("tok-desk-2\n"))
        served.behaviour.require_token = "tok-desk-2"
        assert lmgate("secret", "set", "upstream-token-desk")[0] == 0
        code, out, _ = lmgate("upstream", "test", "desk")
        assert code == 0 and out.startswith("desk: up"), out


class TestTest:
    def test_each_upstream_in_words(
        self,
        lmgate: Run,
        tmp_path: Path,
        served: FakeLMStudio,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        (tmp_path / "none.toml").write_text(
            f'[upstream]\nurl = "http://127.0.0.1:{closed_port()}"\n', encoding="utf-8"
        )
        monkeypatch.setattr("sys.stdin", io.StringIO("tok-desk\n"))
        assert lmgate("upstream", "add", "desk", served.url, "--token-stdin")[0] == 0
        code, out, _ = lmgate("upstream", "test")
        assert code == 1  # local is down
        lines = dict(line.split(": ", 1) for line in out.splitlines())
        assert lines["local"].startswith("down: ")
        assert lines["desk"].startswith("up, 2 models")
        assert {r.headers.get("Authorization") for r in served.received} == {"Bearer tok-desk"}
        code, out, _ = lmgate("upstream", "test", "desk")
        assert code == 0 and out.startswith("desk: up")

    def test_another_machine_s_model_ids_cannot_drive_the_terminal(
        self, lmgate: Run, tmp_path: Path, served: FakeLMStudio, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        forged = "aqwen\x1b[2K\r\x1b[1Adesk: up (spoofed)\x1b]0;pwned\x07"
        served.behaviour.models = (forged, *(f"m{i:02}" for i in range(30)))
        served.loaded = list(served.behaviour.models)
        (tmp_path / "none.toml").write_text(f'[upstream]\nurl = "{served.url}"\n', encoding="utf-8")
        monkeypatch.setattr("sys.stdin", io.StringIO("tok-desk\n"))
        assert lmgate("secret", "set", "lmstudio-api-token")[0] == 0
        code, out, _ = lmgate("upstream", "test")
        assert code == 0, out
        assert "\x1b" not in out and "\r" not in out and "\x07" not in out
        assert "aqwen?[2K??[1Adesk: up (spoofed)?]0;pwned?" in out
        assert out.rstrip().endswith("and 11 more")  # 20 of the 31 shown
