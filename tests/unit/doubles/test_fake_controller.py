from tests.fake_controller import PUBLIC_URL, FakeController
from tray_app.control.controller import AppState, Phase


def test_fake_controller_answers_records_and_publishes() -> None:
    fake = FakeController()
    seen: list[AppState] = []
    fake.add_listener(seen.append)
    assert fake.go_public().result().public_url == PUBLIC_URL
    assert seen[-1].phase == Phase.PUBLIC
    link = fake.pairing_link().result()
    assert link.url == f"{PUBLIC_URL}/#{link.code}" and len(link.code) == 24
    assert fake.pairing_link().result().code != link.code
    fake.fail_next = RuntimeError("nope")
    assert isinstance(fake.curl_snippet().exception(), RuntimeError)
    assert [name for name, _ in fake.calls] == [
        "go_public",
        "pairing_link",
        "pairing_link",
        "curl_snippet",
    ]
