"""``lmgate warm-up MODEL`` as a person runs it: the real command in a subprocess, against the
fake LM Studio over a real socket, with the config and secret store the gateway uses."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_lmstudio import MODELS, FakeLMStudio, fake_on_a_thread
from tests.helpers import Env

QWEN, LLAMA, EMBED = MODELS
TOKEN = "sk-lm-warm-up-token"


@pytest.fixture
def lmstudio(lmstudio_thread: FakeLMStudio, env: Env) -> FakeLMStudio:
    env.vars["LMGATE_UPSTREAM_URL"] = lmstudio_thread.url
    lmstudio_thread.loaded = [QWEN]
    return lmstudio_thread


def test_loads_the_model_and_says_how_long_it_took(lmstudio: FakeLMStudio, env: Env) -> None:
    lmstudio.behaviour.load_delay = 0.3
    result = env.run("warm-up", LLAMA)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"LM Studio may unload {QWEN} to make room."
    assert lines[1].startswith(f"Loading {LLAMA}… loaded in 0.")
    assert lines[1].endswith(" s.")
    assert lmstudio.loaded == [LLAMA] and lmstudio.loads == Counter({LLAMA: 1})


def test_a_loaded_model_is_left_as_it_is(lmstudio: FakeLMStudio, env: Env) -> None:
    result = env.run("warm-up", QWEN)
    assert (result.returncode, result.stdout) == (0, f"{QWEN} is loaded already.\n")
    assert not lmstudio.loads


def test_with_nothing_loaded_nothing_is_said_to_be_unloaded(
    lmstudio: FakeLMStudio, env: Env
) -> None:
    lmstudio.loaded = []
    result = env.run("warm-up", EMBED)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Loading {EMBED}… loaded in ")


def test_an_unknown_model_lists_the_downloaded_ones(lmstudio: FakeLMStudio, env: Env) -> None:
    result = env.run("warm-up", "qwen3-nope")
    assert result.returncode == 2
    assert result.stderr == (
        f"lmgate: LM Studio has no model 'qwen3-nope'. Downloaded: {', '.join(sorted(MODELS))}.\n"
    )
    assert not lmstudio.loads


def test_lm_studio_without_models_says_to_download_one(lmstudio: FakeLMStudio, env: Env) -> None:
    lmstudio.behaviour.models = ()
    result = env.run("warm-up", QWEN)
    assert result.returncode == 2
    assert "Downloaded: none (download one in LM Studio)." in result.stderr


def test_lm_studio_unreachable_is_said_with_the_fix(env: Env) -> None:
    result = env.run("warm-up", QWEN)  # upstream http://127.0.0.1:9: nothing there
    assert result.returncode == 1
    assert result.stderr.startswith("lmgate: LM Studio is not reachable at http://127.0.0.1:9.")
    assert "Traceback" not in result.stderr


def test_the_stored_token_is_sent(lmstudio: FakeLMStudio, env: Env) -> None:
    lmstudio.behaviour.require_token = TOKEN
    assert env.run("secret", "set", "lmstudio-api-token", stdin=TOKEN + "\n").returncode == 0
    result = env.run("warm-up", LLAMA)
    assert result.returncode == 0, result.stderr
    assert lmstudio.loaded == [LLAMA]
    assert TOKEN not in result.stdout + result.stderr


def test_a_missing_token_says_how_to_store_one(lmstudio: FakeLMStudio, env: Env) -> None:
    lmstudio.behaviour.require_token = TOKEN
    result = env.run("warm-up", LLAMA)
    assert result.returncode == 1
    assert "lmgate secret set lmstudio-api-token" in result.stderr
    assert not lmstudio.loads


def test_an_unusable_secret_store_still_asks_without_a_token(
    lmstudio: FakeLMStudio, env: Env
) -> None:
    no_keyring = {"LMGATE_SECRETS_STORE": "keyring", "DBUS_SESSION_BUS_ADDRESS": "unix:path=/0"}
    result = env.run("warm-up", LLAMA, extra=no_keyring)
    assert result.returncode == 0, result.stderr
    assert lmstudio.loaded == [LLAMA]


def test_a_failed_load_says_lm_studio_s_reason(lmstudio: FakeLMStudio, env: Env) -> None:
    lmstudio.behaviour.load_error = "not enough memory for llama"
    result = env.run("warm-up", LLAMA)
    assert result.returncode == 1
    assert result.stdout.endswith(f"Loading {LLAMA}… failed.\n")
    assert result.stderr == (
        f"lmgate: LM Studio could not load '{LLAMA}': not enough memory for llama\n"
    )


def test_a_load_past_models_load_timeout_is_given_up_on(lmstudio: FakeLMStudio, env: Env) -> None:
    lmstudio.behaviour.load_delay = 3.0
    result = env.run("warm-up", LLAMA, extra={"LMGATE_MODELS_LOAD_TIMEOUT": "1"})
    assert result.returncode == 1
    assert "did not finish loading" in result.stderr and "within 1 s" in result.stderr


def test_a_server_without_lm_studio_s_model_api_is_said(lmstudio: FakeLMStudio, env: Env) -> None:
    lmstudio.behaviour.native_api = False
    result = env.run("warm-up", LLAMA)
    assert result.returncode == 1
    assert "has no LM Studio model API" in result.stderr


def test_the_command_is_listed(env: Env) -> None:
    result = env.run("--help")
    assert "warm-up" in result.stdout
    assert "models.load_timeout" in env.run("warm-up", "--help").stdout


def test_upstream_can_be_given_as_serve_takes_it(lmstudio: FakeLMStudio, env: Env) -> None:
    url = env.vars.pop("LMGATE_UPSTREAM_URL")
    result = env.run("warm-up", LLAMA, "--upstream", url)
    assert result.returncode == 0, result.stderr
    assert lmstudio.loaded == [LLAMA]
    refused = env.run("warm-up", LLAMA, "--upstream", "ftp://nowhere")
    assert refused.returncode == 2
    assert refused.stderr.startswith("lmgate: config error: upstream.url (from command line)")


def test_while_an_lm_gate_serves_it_refuses_to_evict_unless_forced(
    lmstudio: FakeLMStudio, env: Env, tmp_path: Path
) -> None:
    from tests.conftest import LiveGateway

    serving = LiveGateway(tmp_path / "serving")
    try:
        env.vars["LMGATE_SERVER_PORT"] = str(serving.server.port)
        refused = env.run("warm-up", LLAMA)
        assert refused.returncode == 1
        assert "cutting off answers it is streaming" in refused.stderr
        assert "Warm up a model…" in refused.stderr and "--force" in refused.stderr
        assert lmstudio.loaded == [QWEN] and not lmstudio.loads
        forced = env.run("warm-up", LLAMA, "--force")
        assert forced.returncode == 0, forced.stderr
        assert lmstudio.loaded == [LLAMA]
    finally:
        serving.close()


@pytest.fixture
def second_lmstudio() -> Iterator[FakeLMStudio]:
    for fake in fake_on_a_thread():
        fake.loaded = [QWEN]
        yield fake


def test_on_names_the_upstream_and_sends_its_own_token(
    lmstudio: FakeLMStudio, second_lmstudio: FakeLMStudio, env: Env
) -> None:
    second_lmstudio.behaviour.require_token = TOKEN
    added = env.run(
        "upstream", "add", "desk", second_lmstudio.url, "--token-stdin", stdin=TOKEN + "\n"
    )
    assert added.returncode == 0, added.stderr
    result = env.run("warm-up", LLAMA, "--on", "desk")
    assert result.returncode == 0, result.stderr
    assert (second_lmstudio.loaded, lmstudio.loaded) == ([LLAMA], [QWEN])
    assert lmstudio.native == []  # local was not even asked


def test_on_an_unknown_upstream_names_the_configured_ones(lmstudio: FakeLMStudio, env: Env) -> None:
    result = env.run("warm-up", LLAMA, "--on", "attic")
    assert result.returncode == 2
    assert result.stderr == "lmgate: no upstream is named 'attic' (configured: local).\n"
    assert lmstudio.loaded == [QWEN]


def test_another_machine_s_model_ids_cannot_drive_the_terminal(
    lmstudio: FakeLMStudio, env: Env
) -> None:
    forged = "evil\x1b[2K\rfake line"
    lmstudio.behaviour.models = (*MODELS, forged)
    lmstudio.loaded = [forged]
    result = env.run("warm-up", QWEN, "--force")
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\r" not in result.stdout
    assert "LM Studio may unload evil?[2K?fake line to make room." in result.stdout
