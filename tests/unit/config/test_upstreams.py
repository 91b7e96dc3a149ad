"""``[upstreams.NAME]`` tables: every field with every bad value, names, the local upstream."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tray_app.config.settings import dump_settings, load_config
from tray_app.config.upstreams import (
    FIELDS,
    LOCAL,
    WEIGHT_MAX,
    UpstreamEntry,
    check_name,
    is_token_secret_name,
    parse_upstreams,
    token_secret_name,
    upstream_keys,
)
from tray_app.errors import ConfigError
from tray_app.secret_store.base import LMSTUDIO_API_TOKEN, check_entry

LOCAL_URL = "http://127.0.0.1:1234"


def parse(flat: dict[str, object]) -> tuple[UpstreamEntry, ...]:
    return parse_upstreams(flat, LOCAL_URL, "config.toml")


class TestParse:
    def test_no_tables_is_a_list_of_one(self) -> None:
        assert parse({"server.port": 1}) == (UpstreamEntry(LOCAL, LOCAL_URL),)

    def test_tables_follow_local_sorted_by_name(self) -> None:
        found = parse(
            {
                "upstreams.laptop.url": "http://127.0.0.1:2000",
                "upstreams.desk.url": "http://127.0.0.1:3000/",
                "upstreams.desk.weight": 3,
                "upstreams.desk.enabled": False,
            }
        )
        assert found == (
            UpstreamEntry(LOCAL, LOCAL_URL),
            UpstreamEntry("desk", "http://127.0.0.1:3000", 3, False),
            UpstreamEntry("laptop", "http://127.0.0.1:2000"),
        )

    def test_local_may_be_weighted_or_switched_off(self) -> None:
        (local,) = parse({"upstreams.local.weight": 5, "upstreams.local.enabled": False})
        assert local == UpstreamEntry(LOCAL, LOCAL_URL, 5, False)

    def test_local_url_is_upstream_url_only(self) -> None:
        with pytest.raises(ConfigError, match=r"upstreams\.local\.url .*upstream\.url"):
            parse({"upstreams.local.url": "http://127.0.0.1:9"})

    def test_a_table_without_url(self) -> None:
        with pytest.raises(ConfigError, match=r"upstreams\.desk\.url.*missing"):
            parse({"upstreams.desk.weight": 2})

    @pytest.mark.parametrize(
        "key", ["upstreams.desk", "upstreams.desk.port", "upstreams.desk.url.x"]
    )
    def test_unknown_field(self, key: str) -> None:
        with pytest.raises(ConfigError, match="unknown upstream setting") as caught:
            parse({key: "x"})
        assert caught.value.key == key and caught.value.source == "config.toml"

    @pytest.mark.parametrize("name", ["", "Desk", "-desk", "desk_1", "d" * 32, "dé", "a b"])
    def test_bad_names(self, name: str) -> None:
        with pytest.raises(ConfigError, match="name must be"):
            parse({f"upstreams.{name}.url": "http://127.0.0.1:1"})


BAD_VALUES: dict[str, list[object]] = {
    "url": ["", "ftp://x", "http://", "http://u:p@127.0.0.1", "http://127.0.0.1/v1", 5, None],
    "weight": [0, -1, WEIGHT_MAX + 1, "many", 1.5, True],
    "enabled": ["maybe", 2, None],
}


class TestEachFieldEachBadValue:
    def test_every_field_is_covered(self) -> None:
        assert set(BAD_VALUES) == set(FIELDS)

    @pytest.mark.parametrize(
        ("field", "value"), [(f, v) for f, values in BAD_VALUES.items() for v in values]
    )
    def test_refused_naming_the_key(self, field: str, value: object) -> None:
        flat: dict[str, object] = {
            "upstreams.desk.url": "http://127.0.0.1:1",
            f"upstreams.desk.{field}": value,
        }
        with pytest.raises(ConfigError) as caught:
            parse(flat)
        assert caught.value.key == f"upstreams.desk.{field}"

    @pytest.mark.parametrize("weight", [1, WEIGHT_MAX])
    def test_weight_limits_accepted(self, weight: int) -> None:
        found = parse({"upstreams.desk.url": "http://127.0.0.1:1", "upstreams.desk.weight": weight})
        assert found[1].weight == weight


class TestNames:
    def test_check_name(self) -> None:
        assert check_name("gpu-2") == "gpu-2"
        with pytest.raises(ValueError, match=re.escape("got 7")):
            check_name(7)

    def test_each_token_has_its_own_entry(self) -> None:
        assert token_secret_name(LOCAL) == LMSTUDIO_API_TOKEN
        names = {token_secret_name(n) for n in (LOCAL, "desk", "laptop", "d" * 31)}
        assert len(names) == 4
        for name in names:
            check_entry(name)  # a valid secret-store entry name


class TestWriteBack:
    @pytest.mark.parametrize(
        "entry",
        [
            UpstreamEntry("desk", "http://127.0.0.1:3000"),
            UpstreamEntry("desk", "http://127.0.0.1:3000", 7, False),
            UpstreamEntry(LOCAL, LOCAL_URL, 2),
        ],
    )
    def test_round_trip(self, entry: UpstreamEntry) -> None:
        keys = upstream_keys(entry)
        found = parse(keys)
        assert entry in found

    def test_defaults_left_out(self) -> None:
        assert upstream_keys(UpstreamEntry("desk", "http://127.0.0.1:3000")) == {
            "upstreams.desk.url": "http://127.0.0.1:3000"
        }
        assert upstream_keys(UpstreamEntry(LOCAL, LOCAL_URL)) == {}


class TestThroughLoadConfig:
    """The tables through the real loader: the file's tables, upstream.url from any layer."""

    def write(self, tmp_path: Path, text: str) -> Path:
        path = tmp_path / "config.toml"
        path.write_text(text, encoding="utf-8")
        return path

    def test_without_tables_a_list_of_one(self, tmp_path: Path) -> None:
        config = load_config(path=self.write(tmp_path, ""), environ={})
        assert config.upstreams == ()
        assert config.all_upstreams == (UpstreamEntry(LOCAL, "http://127.0.0.1:1234"),)

    def test_tables_with_upstream_url_from_the_environment(self, tmp_path: Path) -> None:
        path = self.write(
            tmp_path,
            '[upstreams.desk]\nurl = "http://127.0.0.1:3000"\nweight = 3\n'
            "[upstreams.local]\nenabled = false\n",
        )
        config = load_config(path=path, environ={"LMGATE_UPSTREAM_URL": "http://127.0.0.1:9"})
        assert config.all_upstreams == (
            UpstreamEntry(LOCAL, "http://127.0.0.1:9", enabled=False),
            UpstreamEntry("desk", "http://127.0.0.1:3000", 3),
        )

    def test_a_bad_table_names_its_key_and_file(self, tmp_path: Path) -> None:
        path = self.write(tmp_path, '[upstreams.desk]\nurl = "ftp://x"\n')
        with pytest.raises(ConfigError) as caught:
            load_config(path=path, environ={})
        assert caught.value.key == "upstreams.desk.url" and caught.value.source == str(path)

    def test_written_back_and_read_again(self, tmp_path: Path) -> None:
        entry = UpstreamEntry("desk", "http://127.0.0.1:3000", 2, False)
        path = self.write(tmp_path, dump_settings({"server.port": 9000, **upstream_keys(entry)}))
        config = load_config(path=path, environ={})
        assert config.server_port == 9000 and entry in config.all_upstreams

    @pytest.mark.parametrize(
        ("text", "environ", "overrides", "key", "names"),
        [
            # Two tables, spelled differently: localhost is loopback, the port is the default.
            (
                '[upstreams.desk]\nurl = "http://localhost:80/"\n'
                '[upstreams.desk2]\nurl = "http://127.0.0.1"\n',
                {},
                {},
                "upstreams.desk2.url",
                ("desk", "desk2"),
            ),
            # upstream.url in the file, a table for the same server.
            (
                'upstream.url = "http://127.0.0.1:1234"\n[upstreams.desk]\n'
                'url = "http://[::ffff:127.0.0.1]:1234"\n',
                {},
                {},
                "upstreams.desk.url",
                ("local", "desk"),
            ),
            # upstream.url from its environment variable.
            (
                '[upstreams.desk]\nurl = "http://10.0.0.5:1234"\n',
                {"LMGATE_UPSTREAM_URL": "http://10.0.0.5:1234/"},
                {},
                "upstreams.desk.url",
                ("local", "desk"),
            ),
            # `serve --upstream`, a command-line override.
            (
                '[upstreams.desk]\nurl = "https://gpu.lan"\n',
                {},
                {"upstream.url": "https://GPU.lan:443"},
                "upstreams.desk.url",
                ("local", "desk"),
            ),
        ],
    )
    def test_one_server_under_two_names_is_refused_naming_both(
        self,
        tmp_path: Path,
        text: str,
        environ: dict[str, str],
        overrides: dict[str, object],
        key: str,
        names: tuple[str, str],
    ) -> None:
        path = self.write(tmp_path, text)
        with pytest.raises(ConfigError) as caught:
            load_config(path=path, environ=environ, overrides=overrides)
        assert caught.value.key == key
        assert f"upstream {names[0]!r} is already" in caught.value.problem
        assert "one machine is one upstream" in str(caught.value)

    def test_one_server_twice_is_fine_while_one_of_them_is_switched_off(
        self, tmp_path: Path
    ) -> None:
        path = self.write(
            tmp_path, '[upstreams.desk]\nurl = "http://127.0.0.1:1234"\nenabled = false\n'
        )
        config = load_config(path=path, environ={})
        assert [e.name for e in config.all_upstreams] == [LOCAL, "desk"]

    @pytest.mark.parametrize(
        ("key", "value"),
        [
            ("upstreams.Desk.url", "http://127.0.0.1:1"),
            ("upstreams.desk.port", 1),
            ("upstreams.desk.weight", 0),
            ("upstreams.desk.url", "http://u:p@127.0.0.1"),
        ],
    )
    def test_dump_refuses_what_load_would(self, key: str, value: object) -> None:
        with pytest.raises(ConfigError) as caught:
            dump_settings({key: value})
        assert caught.value.key == key


class TestTokenSecretNames:
    @pytest.mark.parametrize(
        "name", ["lmstudio-api-token", "upstream-token-desk", "upstream-token-a-1"]
    )
    def test_each_upstreams_entry_is_one(self, name: str) -> None:
        assert is_token_secret_name(name)

    @pytest.mark.parametrize(
        "name",
        [
            "upstream-token-",
            "upstream-token-local",  # local's is lmstudio-api-token: never two entries for one
            "upstream-token-Desk",
            "upstream-token-../x",
            "ngrok-authtoken",
            "signing-key",
            "upstream-token",
            "",
        ],
    )
    def test_nothing_else_is(self, name: str) -> None:
        assert not is_token_secret_name(name)

    def test_every_upstreams_own_name_is_one(self) -> None:
        for upstream in ("local", "desk", "a" * 31):
            assert is_token_secret_name(token_secret_name(upstream))
