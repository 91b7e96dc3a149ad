"""What a new user met in a walk-through of the CLI (issue 15), each as they would type it:
input that is no config is not called a config error, a pairing URL a phone cannot open is
refused, `config path` names the file actually read, a second `serve` on LM Gate's own port
says it runs, a misplaced flag gets the line to run instead, `check` speaks in words and
counts one cause once, and `key create` prints settings that work as pasted."""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_lmstudio import FakeLMStudio
from tests.helpers import Env, start_serve
from tests.integration.cli.test_messages import CLASS_NAME, stop
from tray_app.cli.main import main


@pytest.fixture
def running(env: Env) -> Iterator[str]:
    proc, url = start_serve(env.vars)
    try:
        yield url
    finally:
        stop(proc)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    # serve logs (as JSON) before it fails; what the person is told is the one line left.
    lines = [x for x in result.stderr.strip().splitlines() if not x.startswith('{"time"')]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


class TestAPairingUrlAPhoneCannotOpenIsRefused:
    BAD = (
        ("192.168.1.5:8787", "like http://192.168.1.5:8787"),
        ("notaurl", "must start with http:// or https://"),
        ("ftp://x", "must start with http:// or https://"),
        ("", "must start with http:// or https://"),
        ("http://", "has no host name"),
        ("http://h:99999", "has an invalid port"),
        ("http://u:p@h", "the gateway's address alone"),
        ("http://h/?q=1", "the gateway's address alone"),
        ("http://h/#x", "the gateway's address alone"),
    )

    @pytest.mark.parametrize(("url", "said"), BAD)
    def test_refused_in_one_line_with_exit_2(self, env: Env, url: str, said: str) -> None:
        result = env.run("pair", "--url", url)
        assert result.returncode == 2
        line = one_line(result)
        assert line.startswith("lmgate: --url: "), line
        assert said in line
        assert result.stdout == "", "no QR code for an address that leads nowhere"

    @pytest.mark.parametrize("url", ["https://calm-otter.ngrok.app/", "http://192.168.1.5:8787"])
    def test_a_real_address_makes_the_code(self, env: Env, url: str) -> None:
        result = env.run("pair", "--url", url)
        assert result.returncode == 0, result.stderr
        assert f"Pairing URL: {url.rstrip('/')}/#" in result.stdout


class TestInputThatIsNoConfigIsNotCalledAConfigError:
    CASES = (
        (["key", "revoke", "nothere"], "lmgate: no API key with ID 'nothere'"),
        (["device", "revoke", "123"], "lmgate: no device with ID '123'"),
        (["token", "revoke", "abcdefgh"], "lmgate: "),
        (["key", "create", "x", "--scope", "admin"], "lmgate: --scope: unknown scope admin"),
        (["token", "create", "x", "--scope", "admin"], "lmgate: --scope: unknown scope admin"),
        (["token", "create", "x", "--ttl", "5x"], "lmgate: --ttl: must be a duration"),
        (["key", "create", "x", "--ttl", "5x"], "lmgate: --ttl: must be a duration"),
        (["token", "create", "x", "--max-tokens", "-3"], "lmgate: --max-tokens: must be"),
        (["token", "create", "x", "--models", ","], "lmgate: --models: give at least one"),
        (["deploy", "nginx", "--domain", "not a domain"], "lmgate: --domain: "),
    )

    @pytest.mark.parametrize(("args", "said"), CASES)
    def test_said_plainly_with_exit_2(self, env: Env, args: list[str], said: str) -> None:
        result = env.run(*args)
        assert result.returncode == 2
        line = one_line(result)
        assert line.startswith(said), line
        assert "config error" not in line
        assert not CLASS_NAME.search(line), line

    def test_a_bad_setting_is_still_a_config_error(self, env: Env) -> None:
        result = env.run("key", "list", extra={"LMGATE_SERVER_PORT": "x"})
        assert result.returncode == 2
        assert one_line(result).startswith("lmgate: config error: server.port")


def test_config_path_names_the_file_read(env: Env, tmp_path: Path) -> None:
    named = env.vars["LMGATE_CONFIG"]
    assert env.run("config", "path").stdout.strip() == named
    flag = str(tmp_path / "flag.toml")
    assert env.run("config", "path", "--config", flag).stdout.strip() == flag
    # What `config show` reads agrees: a value in LMGATE_CONFIG's file shows.
    Path(named).write_text("[server]\nport = 8123\n", encoding="utf-8")
    assert "server.port = 8123" in env.run("config", "show").stdout
    for command in (["config"], ["serve"], ["doctor"], ["key", "list"]):
        shown = env.run(*command, "--help").stdout
        assert "$LMGATE_CONFIG, else" in " ".join(shown.split()), command


def test_config_show_takes_the_common_flags(env: Env, tmp_path: Path) -> None:
    result = env.run("config", "show", "--data-dir", str(tmp_path / "d"), "--secret-store", "env")
    assert result.returncode == 0, result.stderr
    assert f"storage.data_dir = '{tmp_path / 'd'}'" in result.stdout
    assert "secrets.store = 'env'" in result.stdout


def test_serve_says_the_stored_lm_studio_token_was_refused(
    env: Env, lmstudio_thread: FakeLMStudio
) -> None:
    lmstudio_thread.behaviour.require_token = "sk-lm-right"
    stored = env.run("secret", "set", "lmstudio-api-token", stdin="sk-lm-wrong\n")
    assert stored.returncode == 0, stored.stderr
    proc, _url = start_serve({**env.vars, "LMGATE_UPSTREAM_URL": lmstudio_thread.url})
    out = stop(proc)
    line = next(x for x in out.splitlines() if x.startswith("LM Studio:"))
    assert f"{lmstudio_thread.url} refused the stored token (it answered 401)" in line
    assert "`lmgate secret set lmstudio-api-token`" in line
    assert "wants a token" not in line


def test_a_second_serve_on_lm_gates_port_says_it_runs(env: Env, running: str) -> None:
    host_port = running.removeprefix("http://")
    result = env.run("serve", "--port", host_port.rsplit(":", 1)[1])
    assert result.returncode == 2
    line = one_line(result)
    assert line.startswith(f"lmgate: LM Gate is running already on {host_port}"), line
    assert "config error" not in line


def test_a_serve_on_another_programs_port_is_still_a_port_problem(env: Env) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        result = env.run("serve", "--port", str(other.getsockname()[1]))
    assert result.returncode == 2
    assert "is already in use; choose another port with --port" in one_line(result)


class TestAFlagBeforeTheCommandGetsOneLine:
    @pytest.mark.parametrize(
        ("argv", "fix"),
        [
            (["--port", "9000", "serve"], "lmgate serve --port 9000"),
            (["--port=9000", "serve"], "lmgate serve --port 9000"),
            (
                ["--enable-messages", "--port", "9000", "serve", "--host", "127.0.0.1"],
                "lmgate serve --port 9000 --enable-messages --host 127.0.0.1",
            ),
            (
                ["--config", "my config.toml", "serve"],
                "lmgate serve --config 'my config.toml'",
            ),
            # A value that spells the command is not where the command starts.
            (["--host", "::1", "serve", "--tunnel", "lan"], "lmgate serve --host ::1 --tunnel lan"),
        ],
    )
    def test_serve_gets_the_line_to_run(
        self, argv: list[str], fix: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert "usage:" not in err
        assert err.startswith("lmgate: ") and f"run `{fix}`" in err

    @pytest.mark.parametrize(
        ("argv", "help_for"),
        [
            (["--port", "9000", "doctor"], "lmgate doctor --help"),
            (["--data-dir", "/x", "key", "list"], "lmgate key list --help"),
            (["--go-public", "serve"], "lmgate serve --help"),
        ],
    )
    def test_other_commands_point_at_their_help(
        self, argv: list[str], help_for: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "usage:" not in err, err
        assert f"`{help_for}` lists those it takes" in err


class TestCheckSpeaksInWords:
    def test_nothing_listening_is_one_cause(self, env: Env) -> None:
        with socket.socket() as gone:
            gone.bind(("127.0.0.1", 0))
            port = gone.getsockname()[1]
        result = env.run("check", f"http://127.0.0.1:{port}", "lmg_x")
        assert result.returncode == 1
        out = result.stdout
        assert re.search(r"^FAIL\s+health\s+not reachable: connection refused$", out, re.M), out
        assert len(re.findall(r"^SKIP\s", out, re.M)) == 6, out
        assert "Cannot connect" not in out and "ssl:default" not in out
        assert out.rstrip().endswith(
            "1 check(s) failed (6 more could not run). "
            "First cause: health: not reachable: connection refused"
        ), out
        assert not CLASS_NAME.search(out), out

    def test_a_bad_token_is_its_code_and_message(self, env: Env, running: str) -> None:
        result = env.run("check", running, "lmg_wrong_" + "k" * 33)
        assert result.returncode == 1
        out = result.stdout
        found = re.search(r"^FAIL\s+models\s+401 (\w+): (.+)$", out, re.M)
        assert found is not None, out
        assert found.group(1) == "invalid_api_key"
        assert "{" not in found.group(2), "the message, not the JSON body"
        assert re.search(r"^SKIP\s+chat\s", out, re.M) and re.search(
            r"^SKIP\s+streamed chat\s", out, re.M
        )
        # The stream check needs no model, but the token: refused for the same one cause.
        assert re.search(r"^SKIP\s+streams through\s+the token was refused", out, re.M), out
        assert re.search(r"^PASS\s+no token is refused\s", out, re.M)
        summary = out.rstrip().splitlines()[-1]
        assert summary.startswith("1 check(s) failed") or summary.startswith("2 check(s)"), out
        assert "First cause: models: 401 invalid_api_key: " in summary


def test_doctor_says_only_not_needed_for_an_unused_ngrok(env: Env, tmp_path: Path) -> None:
    result = env.run(
        "doctor",
        extra={
            "LMGATE_TUNNEL_NGROK_PATH": str(tmp_path / "nope"),
            "XDG_STATE_HOME": str(tmp_path / "state"),
        },
    )
    row = next(x for x in result.stdout.splitlines() if "ngrok agent" in x)
    assert re.fullmatch(r"ok\s+ngrok agent\s+not needed \(tunnel\.provider is none\)", row), row


class TestKeyCreateSettingsWorkAsPasted:
    def test_no_expiry_says_never(self, env: Env) -> None:
        created = env.run("key", "create", "script")
        assert "never expires." in created.stderr
        assert "expires -" not in created.stderr
        dated = env.run("key", "create", "brief", "--ttl", "7d")
        assert re.search(r"expires \d{4}-\d\d-\d\d \d\d:\d\d UTC\.", dated.stderr)

    def test_the_first_allowed_model_is_claude_codes(self, env: Env) -> None:
        created = env.run("key", "create", "claude", "--models", "qwen2.5-7b-instruct, other")
        assert created.returncode == 0, created.stderr
        assert "export ANTHROPIC_MODEL=qwen2.5-7b-instruct\n" in created.stderr
        plain = env.run("key", "create", "any")
        assert "export ANTHROPIC_MODEL=<a model LM Studio serves>\n" in plain.stderr

    def test_a_note_when_no_lm_gate_answers_at_server_port(self, env: Env, running: str) -> None:
        port = running.rsplit(":", 1)[1]
        with socket.socket() as gone:  # server.port names it; the serve runs on `port`
            gone.bind(("127.0.0.1", 0))
            free = str(gone.getsockname()[1])
        elsewhere = env.run("key", "create", "a", extra={"LMGATE_SERVER_PORT": free})
        assert f"Note: no LM Gate answers at http://127.0.0.1:{free} now" in elsewhere.stderr
        assert f"assume server.port ({free})" in elsewhere.stderr
        there = env.run("key", "create", "b", extra={"LMGATE_SERVER_PORT": port})
        assert f"OPENAI_BASE_URL=http://127.0.0.1:{port}/v1" in there.stderr
        assert "Note: no LM Gate answers" not in there.stderr
