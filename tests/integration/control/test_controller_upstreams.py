"""The controller's upstreams (issue 18, point 4): Settings adds, tests and removes them through
it, on a real config file in tmp and the tests' in-memory secret store; a running gateway
restarts to use the change, and its health checker's view of each upstream reaches the state
the tray draws. Real fake LM Studios on 127.0.0.1, each on a loop thread of its own."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import keyring
import keyring.backends.fail
import pytest
from aiohttp import web

from tests.conftest import LMSTUDIO_TOKEN
from tests.fake_lmstudio import Behaviour, FakeLMStudio, fake_on_a_thread
from tray_app.config.files import read_config_file
from tray_app.config.settings import Config, SecretStoreKind
from tray_app.config.upstreams import WEIGHT_MAX, token_secret_name
from tray_app.control.controller import AppState, Controller, ThreadedController
from tray_app.control.loop_thread import LoopThread
from tray_app.control.upstream_status import UpstreamRow, UpstreamStatus
from tray_app.errors import SecretStoreError
from tray_app.secret_store.base import LMSTUDIO_API_TOKEN, MemorySecretStore

DESK_TOKEN = "sk-desk-" + "x" * 20

Make = Callable[..., ThreadedController]


def closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def desk() -> Iterator[FakeLMStudio]:
    """A second machine, wanting its own token."""
    yield from fake_on_a_thread(Behaviour(require_token=DESK_TOKEN, models=("big-1", "big-2")))


@pytest.fixture
def attic() -> Iterator[FakeLMStudio]:
    """A third machine, wanting the desk's token too (so a wrong one is refused there)."""
    yield from fake_on_a_thread(Behaviour(require_token=DESK_TOKEN, models=("big-1", "big-2")))


@pytest.fixture
def odd() -> Iterator[dict[str, str]]:
    """Servers whose /v1/models is no model list: "broken" answers 500, "html" a web page."""

    async def broken(_: web.Request) -> web.Response:
        return web.Response(status=500, text="boom")

    async def html(_: web.Request) -> web.Response:
        return web.Response(text="<html>a router's login page</html>")

    thread = LoopThread()
    thread.start()
    runners: list[web.AppRunner] = []
    urls: dict[str, str] = {}
    for name, handler in (("broken", broken), ("html", html)):
        app = web.Application()
        app.router.add_get("/v1/models", handler)
        runner = web.AppRunner(app)
        thread.submit(runner.setup()).result(5)
        thread.submit(web.TCPSite(runner, "127.0.0.1", 0).start()).result(5)
        runners.append(runner)
        urls[name] = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield urls
    for runner in runners:
        thread.submit(runner.cleanup()).result(5)
    thread.stop()


@pytest.fixture
def store() -> MemorySecretStore:
    return MemorySecretStore({LMSTUDIO_API_TOKEN: LMSTUDIO_TOKEN})


@pytest.fixture
def make(tmp_path: Path, lmstudio_thread: FakeLMStudio, store: MemorySecretStore) -> Iterator[Make]:
    made: list[ThreadedController] = []
    # Started here, not by the controller's start: Settings edits upstreams before any start.
    loop = LoopThread()
    loop.start()

    def build(**settings: object) -> ThreadedController:
        # LM Studio's URL in the file, as a tray's file has it: a change reloads from there.
        path = tmp_path / "config.toml"
        if not path.exists():
            path.write_text(f'[upstream]\nurl = "{lmstudio_thread.url}"\n', encoding="utf-8")
        config = Config(
            upstream_url=lmstudio_thread.url,
            server_port=0,
            streaming_heartbeat_interval=0.0,
            storage_data_dir=str(tmp_path / "data"),
            **settings,  # type: ignore[arg-type]
        )
        controller = ThreadedController(
            Controller(
                config,
                config_path=tmp_path / "config.toml",
                store=store,
                environ={},
                watch_interval=0.1,
            ),
            loop,
        )
        made.append(controller)
        return controller

    yield build
    for controller in made:
        controller.shutdown()
    loop.stop()


def tables(tmp_path: Path) -> dict[str, object]:
    return {
        key: value
        for key, value in read_config_file(tmp_path / "config.toml").items()
        if key.startswith("upstreams.")
    }


class TestAdd:
    def test_writes_the_table_and_keeps_the_token_in_the_store(
        self, make: Make, tmp_path: Path, store: MemorySecretStore, desk: FakeLMStudio
    ) -> None:
        controller = make()
        changed = controller.add_upstream("desk", desk.url, 3, f"  {DESK_TOKEN}\n").result(10)
        assert tables(tmp_path) == {"upstreams.desk.url": desk.url, "upstreams.desk.weight": 3}
        assert store.get(token_secret_name("desk")) == DESK_TOKEN, "stripped, in the store"
        assert DESK_TOKEN not in (tmp_path / "config.toml").read_text(encoding="utf-8")
        assert changed.rows[1] == UpstreamRow("desk", desk.url, 3, True, token_set=True)
        assert changed.rows[0].name == "local", "local first"
        assert changed.message == f"Added desk at {desk.url}; LM Gate uses it when it starts."
        rows = controller.upstream_rows().result(5)
        assert [r.name for r in rows] == ["local", "desk"]

    def test_without_a_token_stores_none(
        self, make: Make, store: MemorySecretStore, desk: FakeLMStudio
    ) -> None:
        changed = make().add_upstream("desk", desk.url).result(10)
        assert changed.rows[1].token_set is False and changed.rows[1].weight == 1
        assert store.get(token_secret_name("desk")) is None

    @pytest.mark.parametrize(
        ("name", "url", "weight", "words"),
        [
            ("desk", "ftp://10.0.0.5", 1, "http"),
            ("desk", "not-a-url", 1, "http"),
            ("Desk!", "http://10.0.0.5:1234", 1, "lower-case letters"),
            ("local", "http://10.0.0.5:1234", 1, "'local' is upstream.url"),
            ("desk", "http://10.0.0.5:1234", 0, "1"),
            ("desk", "http://10.0.0.5:1234", WEIGHT_MAX + 1, str(WEIGHT_MAX)),
        ],
    )
    def test_refuses_in_the_parsers_words_and_writes_nothing(
        self,
        make: Make,
        tmp_path: Path,
        store: MemorySecretStore,
        name: str,
        url: str,
        weight: int,
        words: str,
    ) -> None:
        with pytest.raises(ValueError, match=words):
            make().add_upstream(name, url, weight, "tok").result(10)
        assert tables(tmp_path) == {}
        assert store.get(token_secret_name("desk")) is None, "no token without its upstream"

    def test_the_highest_weight_is_taken(self, make: Make, tmp_path: Path) -> None:
        make().add_upstream("desk", "http://10.0.0.5:1234", WEIGHT_MAX).result(10)
        assert tables(tmp_path)["upstreams.desk.weight"] == WEIGHT_MAX

    def test_refuses_a_name_in_use(self, make: Make, tmp_path: Path) -> None:
        controller = make()
        controller.add_upstream("desk", "http://10.0.0.5:1234").result(10)
        with pytest.raises(ValueError, match="an upstream is named 'desk' already"):
            controller.add_upstream("desk", "http://10.0.0.6:1234").result(10)
        assert tables(tmp_path) == {"upstreams.desk.url": "http://10.0.0.5:1234"}

    def test_keeps_the_files_other_settings(self, make: Make, tmp_path: Path) -> None:
        controller = make()
        with (tmp_path / "config.toml").open("a", encoding="utf-8") as file:
            file.write("[limits]\nrequests_per_minute = 7\n")
        controller.add_upstream("desk", "http://10.0.0.5:1234").result(10)
        flat = read_config_file(tmp_path / "config.toml")
        assert flat["limits.requests_per_minute"] == 7
        assert flat["upstream.url"].startswith("http://127.0.0.1:")


def test_a_token_that_cannot_be_kept_adds_nothing(
    tmp_path: Path, lmstudio_thread: FakeLMStudio, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No keyring: said before the file changes, as Save says it for LM Studio's token."""
    failing = keyring.backends.fail.Keyring()  # type: ignore[no-untyped-call]
    monkeypatch.setattr(keyring, "get_keyring", lambda: failing)
    config = Config(
        upstream_url=lmstudio_thread.url,
        server_port=0,
        storage_data_dir=str(tmp_path / "data"),
        secrets_store=SecretStoreKind.KEYRING,
    )
    controller = ThreadedController(
        Controller(config, config_path=tmp_path / "config.toml", environ={}, watch_interval=0)
    )
    try:
        assert controller.start().result(20).store_problem
        with pytest.raises(SecretStoreError, match=r"The upstream was not added\. No OS keyring"):
            controller.add_upstream("desk", "http://10.0.0.5:1234", 1, DESK_TOKEN).result(10)
        assert tables(tmp_path) == {}
    finally:
        controller.shutdown()


class TestRemove:
    def test_takes_the_table_and_its_token_away(
        self, make: Make, tmp_path: Path, store: MemorySecretStore
    ) -> None:
        controller = make()
        controller.add_upstream("desk", "http://10.0.0.5:1234", 2, DESK_TOKEN).result(10)
        controller.add_upstream("attic", "http://10.0.0.6:1234").result(10)
        changed = controller.remove_upstream("desk").result(10)
        assert tables(tmp_path) == {"upstreams.attic.url": "http://10.0.0.6:1234"}
        assert store.get(token_secret_name("desk")) is None
        assert [r.name for r in changed.rows] == ["local", "attic"]
        assert changed.message == "Removed desk; LM Gate uses it when it starts."

    @pytest.mark.parametrize(
        ("name", "words"), [("local", "cannot be removed"), ("ghost", "no upstream is named")]
    )
    def test_refuses_local_and_unknown_names(
        self, make: Make, store: MemorySecretStore, name: str, words: str
    ) -> None:
        with pytest.raises(ValueError, match=words):
            make().remove_upstream(name).result(10)
        assert store.get(LMSTUDIO_API_TOKEN) == LMSTUDIO_TOKEN


class TestTest:
    def test_an_upstream_that_answers_with_its_own_token(
        self, make: Make, desk: FakeLMStudio
    ) -> None:
        controller = make()
        controller.add_upstream("desk", desk.url, 1, DESK_TOKEN).result(10)
        ok, words = controller.test_upstream("desk").result(10)
        assert ok and words == f"desk answers at {desk.url}. Models: big-1, big-2"
        assert desk.received[-1].headers["Authorization"] == f"Bearer {DESK_TOKEN}"

    def test_a_refused_token_and_a_missing_one(
        self, make: Make, desk: FakeLMStudio, attic: FakeLMStudio
    ) -> None:
        controller = make()
        controller.add_upstream("desk", desk.url, 1, "sk-wrong").result(10)
        controller.add_upstream("bare", attic.url).result(10)
        assert controller.test_upstream("desk").result(10) == (
            False,
            f"desk at {desk.url} refused the stored token (401).",
        )
        assert controller.test_upstream("bare").result(10) == (
            False,
            f"bare at {attic.url} requires an API token, none is stored (401).",
        )

    def test_one_that_is_down(self, make: Make) -> None:
        controller = make()
        url = closed_url()
        controller.add_upstream("laptop", url).result(10)
        ok, words = controller.test_upstream("laptop").result(10)
        assert not ok and words.startswith(f"laptop is not reachable at {url} (")

    def test_the_local_one_with_lm_studios_token(
        self, make: Make, lmstudio_thread: FakeLMStudio
    ) -> None:
        ok, words = make().test_upstream("local").result(10)
        assert ok and words.startswith(f"local answers at {lmstudio_thread.url}. Models: ")
        headers = lmstudio_thread.received[-1].headers
        assert headers["Authorization"] == f"Bearer {LMSTUDIO_TOKEN}"

    def test_an_error_status_and_an_answer_that_is_no_model_list(
        self, make: Make, odd: dict[str, str]
    ) -> None:
        controller = make()
        for name, url in odd.items():
            controller.add_upstream(name, url).result(10)
        assert controller.test_upstream("broken").result(10) == (
            False,
            f"broken at {odd['broken']} answered 500.",
        )
        assert controller.test_upstream("html").result(10) == (
            False,
            f"html at {odd['html']} answered, but with no list of models.",
        )

    def test_an_unknown_name(self, make: Make) -> None:
        with pytest.raises(ValueError, match="no upstream is named 'ghost'"):
            make().test_upstream("ghost").result(10)


def wait_for(controller: ThreadedController, wanted: Callable[[AppState], bool]) -> AppState:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if wanted(controller.state):
            return controller.state
        time.sleep(0.05)
    raise AssertionError(f"never reached: {controller.state.upstreams}")


def by_name(state: AppState) -> dict[str, UpstreamStatus]:
    return {status.name: status for status in state.upstreams}


class TestWhileRunning:
    def test_an_added_upstream_is_used_after_a_restart_and_its_state_shown(
        self, make: Make, desk: FakeLMStudio, lmstudio_thread: FakeLMStudio
    ) -> None:
        controller = make()
        controller.start().result(20)
        assert [s.name for s in controller.state.upstreams] == ["local"]
        changed = controller.add_upstream("desk", desk.url, 1, DESK_TOKEN).result(30)
        assert changed.message.endswith("; LM Gate restarted to use it.")
        state = wait_for(controller, lambda s: by_name(s).get("desk", None) is not None)
        state = wait_for(controller, lambda s: by_name(s)["desk"].state == "up")
        state = wait_for(controller, lambda s: by_name(s)["local"].state == "up")
        assert by_name(state)["local"].url == lmstudio_thread.url
        desk_state = by_name(state)["desk"]
        assert desk_state.models == 2 and desk_state.words == "up, 2 models"

    def test_a_down_upstream_shows_why(self, make: Make) -> None:
        url = closed_url()
        controller = make()
        controller.add_upstream("laptop", url).result(10)
        controller.start().result(20)
        state = wait_for(controller, lambda s: by_name(s).get("laptop") is not None)
        state = wait_for(controller, lambda s: by_name(s)["laptop"].state == "down")
        laptop = by_name(state)["laptop"]
        assert laptop.reason and laptop.words == f"down: {laptop.reason}"
        assert laptop.url == url
        changed = controller.remove_upstream("laptop").result(30)
        assert changed.message == "Removed laptop; LM Gate restarted to use it."
        wait_for(controller, lambda s: [x.name for x in s.upstreams] == ["local"])
        controller.shutdown()
        assert controller.state.upstreams == (), "a stopped gateway claims no upstream's state"

    def test_a_disabled_upstream_says_so(self, make: Make, tmp_path: Path) -> None:
        url = closed_url()
        controller = make()
        with (tmp_path / "config.toml").open("a", encoding="utf-8") as file:
            file.write(f'[upstreams.spare]\nurl = "{url}"\nenabled = false\n')
        controller.add_upstream("desk", "http://127.0.0.1:9").result(10)
        controller.start().result(20)
        state = wait_for(controller, lambda s: "spare" in by_name(s))
        assert by_name(state)["spare"].words == "disabled"
        rows = controller.upstream_rows().result(5)
        assert [(r.name, r.enabled) for r in rows] == [
            ("local", True),
            ("desk", True),
            ("spare", False),
        ]
