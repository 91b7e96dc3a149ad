"""Config: defaults < TOML file < LMGATE_* env < CLI flags; each mistake named in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tray_app.config.settings import Config, describe_settings, load_config
from tray_app.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_file(tmp_path: Path) -> None:
    config = load_config(path=tmp_path / "missing.toml", environ={})
    assert config == Config()
    assert config.upstream_url == "http://127.0.0.1:1234"
    assert config.server_host == "127.0.0.1"
    assert config.routes_enable_responses is False and config.routes_enable_messages is False


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[upstream]
url = "http://127.0.0.1:4321/"
idle_timeout = 120
[server]
port = 9000
host = "127.0.0.2"
[routes]
enable_responses = true
""",
    )
    from_file = load_config(path=path, environ={})
    assert from_file.upstream_url == "http://127.0.0.1:4321"  # trailing slash folded
    assert (from_file.server_port, from_file.upstream_idle_timeout) == (9000, 120.0)
    assert from_file.routes_enable_responses is True

    env = {"LMGATE_SERVER_PORT": "9100", "LMGATE_ROUTES_ENABLE_RESPONSES": "off"}
    from_env = load_config(path=path, environ=env)
    assert (from_env.server_port, from_env.routes_enable_responses) == (9100, False)
    assert from_env.server_host == "127.0.0.2"

    from_flags = load_config(
        path=path, environ=env, overrides={"server.port": "9200", "server.host": None}
    )
    assert from_flags.server_port == 9200
    assert from_flags.server_host == "127.0.0.2"  # a flag not given changes nothing


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9999\n")
    assert load_config(environ={"LMGATE_CONFIG": str(path)}).server_port == 9999


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("[server]\nport = 70000\n", "server.port", "between 0 and 65535"),
        ('[server]\nport = "eighty"\n', "server.port", "must be an integer"),
        ("[server]\nport = 80.5\n", "server.port", "must be an integer"),
        ("[server]\nport = true\n", "server.port", "must be a number"),
        ('[server]\nhost = "my laptop"\n', "server.host", "IP address"),
        ('[upstream]\nurl = "127.0.0.1:1234"\n', "upstream.url", "http:// or https://"),
        ('[upstream]\nurl = "http://user:pw@127.0.0.1:1234"\n', "upstream.url", "password"),
        ('[upstream]\nurl = "http://127.0.0.1:1234/v1"\n', "upstream.url", "no path"),
        ('[upstream]\nurl = "http://127.0.0.1:99999"\n', "upstream.url", "invalid port"),
        ("[upstream]\nidle_timeout = 0\n", "upstream.idle_timeout", "between"),
        ("[upstream]\nidle_timeout = nan\n", "upstream.idle_timeout", "finite"),
        ("[limits]\nmax_body_bytes = -1\n", "limits.max_body_bytes", "between"),
        ('[routes]\nenable_responses = "maybe"\n', "routes.enable_responses", "true or false"),
        ('[log]\nlevel = "loud"\n', "log.level", "one of"),
        ("[server]\nprot = 1\n", "server.prot", "unknown setting"),
        ("[server\nport = 1\n", "config file", "not valid TOML"),
    ],
)
def test_invalid_file_values_name_the_key(
    tmp_path: Path, text: str, key: str, fragment: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path=path, environ={})
    assert caught.value.key == key
    assert fragment in str(caught.value)
    assert str(path) in str(caught.value)  # and where the bad value came from


def test_invalid_env_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(path=tmp_path / "none.toml", environ={"LMGATE_SERVER_PORT": "abc"})
    assert str(caught.value).startswith("server.port (from LMGATE_SERVER_PORT): must be")


def test_invalid_flag_names_the_command_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(
            path=tmp_path / "none.toml", environ={}, overrides={"upstream.idle_timeout": "-3"}
        )
    assert "(from command line)" in str(caught.value)


def test_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"\xff\xfe[server]")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path=path, environ={})


def test_every_setting_has_an_env_var_and_help() -> None:
    for key, env_var, _default, help_text in describe_settings():
        assert env_var == "LMGATE_" + key.replace(".", "_").upper()
        assert help_text
