"""The tray app on a real X display (Xvfb) with a real tray host (trayer): the icon shows in a
screenshot, and the QR window's code decodes from a full-screen screenshot.

tests/run.sh installs Xvfb, trayer and ImageMagick and sets LMGATE_REQUIRE_DISPLAY=1, so in CI a
missing tool is a failure, not a skip. Screenshots are kept in test-artifacts/.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_lmstudio import FakeLMStudio
from tests.helpers import REPO_ROOT, cli_env, publish_screenshot

ROOT = REPO_ROOT
ARTIFACTS = ROOT / "test-artifacts"
LMGATE = str(Path(sys.executable).with_name("lmgate"))
TOOLS = ("Xvfb", "trayer", "import")
PRIVATE_GREY = (0x6B, 0x72, 0x80)  # resources/icons/private.svg
QR_WINDOW = "LM Gate — connect a phone"  # its title
TRAY_HEIGHT = 40  # trayer's panel along the top edge, in pixels
SCREEN = (1024, 768)
MARGIN = 8  # around a cropped screenshot, so nothing it shows touches its edge


def _require_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        if os.environ.get("LMGATE_REQUIRE_DISPLAY") == "1":
            pytest.fail(f"missing for the display test: {', '.join(missing)}")
        pytest.skip(f"needs {', '.join(missing)} (tests/run.sh installs them)")


@pytest.fixture
def display() -> Iterator[str]:
    _require_tools()
    number = random.randint(200, 900)
    name = f":{number}"
    xvfb = subprocess.Popen(
        ["Xvfb", name, "-screen", "0", f"{SCREEN[0]}x{SCREEN[1]}x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not Path(f"/tmp/.X11-unix/X{number}").exists():
        assert time.monotonic() < deadline, "Xvfb did not start"
        time.sleep(0.05)
    env = {**os.environ, "DISPLAY": name}
    trayer = subprocess.Popen(
        [
            "trayer",
            "--edge",
            "top",
            "--align",
            "right",
            "--widthtype",
            "request",
            "--height",
            str(TRAY_HEIGHT),
            "--SetDockType",
            "true",
            "--transparent",
            "false",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    try:
        yield name
    finally:
        for proc in (trayer, xvfb):
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def screenshot(display: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["import", "-display", display, "-window", "root", str(path)],
        check=True,
        timeout=20,
        capture_output=True,
    )
    return path


def find_colour(
    path: Path, colour: tuple[int, int, int], box: tuple[int, int, int, int], tolerance: int = 12
) -> int:
    from PIL import Image

    with Image.open(path) as image:
        data = image.convert("RGB").crop(box).tobytes()
    pixels = (data[i : i + 3] for i in range(0, len(data), 3))
    return sum(
        1
        for pixel in pixels
        if all(abs(a - b) <= tolerance for a, b in zip(pixel, colour, strict=True))
    )


def centroid(
    path: Path, colour: tuple[int, int, int], box: tuple[int, int, int, int], tolerance: int = 12
) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        region = image.convert("RGB").crop(box)
        width = region.width
        data = region.tobytes()
    hits = [
        (i // 3 % width, i // 3 // width)
        for i in range(0, len(data), 3)
        if all(abs(a - b) <= tolerance for a, b in zip(data[i : i + 3], colour, strict=True))
    ]
    assert hits, "colour not found"
    return (
        box[0] + sum(x for x, _ in hits) // len(hits),
        box[1] + sum(y for _, y in hits) // len(hits),
    )


def crop(source: Path, target: Path, box: tuple[int, int, int, int]) -> None:
    from PIL import Image

    with Image.open(source) as image:
        image.crop(box).save(target)


def drawn_box(path: Path, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of what is drawn inside ``box``: Xvfb's bare root is black,
    so anything not black is a window, the tray or a menu."""
    from PIL import Image

    with Image.open(path) as image:
        region = image.convert("L").crop(box).point(lambda v: 255 if v > 8 else 0)
        found = region.getbbox()
    assert found, f"nothing drawn in {box} of {path}"
    return box[0] + found[0], box[1] + found[1], box[0] + found[2], box[1] + found[3]


def around(*boxes: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The smallest box holding ``boxes``, MARGIN wider on each side the screen allows."""
    return (
        max(0, min(b[0] for b in boxes) - MARGIN),
        max(0, min(b[1] for b in boxes) - MARGIN),
        min(SCREEN[0], max(b[2] for b in boxes) + MARGIN),
        min(SCREEN[1], max(b[3] for b in boxes) + MARGIN),
    )


def decode_screen(path: Path) -> list[str]:
    import zxingcpp
    from PIL import Image

    with Image.open(path) as image:
        return [r.text for r in zxingcpp.read_barcodes(image.convert("RGB"))]


def _xdotool(display: str, *args: str) -> str:
    return subprocess.run(
        ["xdotool", *args],
        env={**os.environ, "DISPLAY": display},
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout


def _geometry(display: str, window: str) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of ``window`` (an X id) on ``display``."""
    g = dict(
        line.split("=", 1)
        for line in _xdotool(display, "getwindowgeometry", "--shell", window).split()
    )
    x, y = int(g["X"]), int(g["Y"])
    return x, y, x + int(g["WIDTH"]), y + int(g["HEIGHT"])


def _window_box(display: str, title: str) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the window named ``title`` on ``display``, checked to be
    the only window there: a crop of a full-screen shot shows whatever else overlaps it (the
    README once showed the "getting started" guide sticking out from under the QR window)."""
    window = _xdotool(display, "search", "--name", title).split()[-1]
    box = _geometry(display, window)
    # No window manager runs, so every window the app maps is a child of the root; the search
    # also finds the root itself (depth 0), which is not another window.
    root = _xdotool(display, "search", "--maxdepth", "0", "").split()
    others = []
    for other in _xdotool(display, "search", "--maxdepth", "1", "--onlyvisible", "").split():
        if other in root:
            continue
        left, top, right, bottom = _geometry(display, other)
        if (
            other != window
            and left < box[2]
            and box[0] < right
            and top < box[3]
            and box[1] < bottom
        ):
            others.append(_xdotool(display, "getwindowname", other).strip() or other)
    assert not others, f"{others} overlap the window {title!r} at {box}"
    return box


def send(wish: str) -> None:
    import getpass

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(f"/tmp/lmgate-{getpass.getuser()}")
        s.sendall(wish.encode() + b"\n")


def _pair(origin: str, code: str, device: str) -> None:
    import json
    import urllib.request

    request = urllib.request.Request(
        origin + "/pair",
        data=json.dumps({"code": code, "device_name": device}).encode(),
        headers={"Content-Type": "application/json", "Origin": origin},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


@pytest.mark.display
def test_tray_icon_and_qr_on_a_real_display(
    display: str, tmp_path: Path, lmstudio_thread: FakeLMStudio
) -> None:
    env = cli_env(tmp_path)
    variables = {
        **env.vars,
        # LM Studio answers: the icon is the private grey (amber would say LM Studio is off).
        "LMGATE_UPSTREAM_URL": lmstudio_thread.url,
        "DISPLAY": display,
        "QT_QPA_PLATFORM": "xcb",
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "LMGATE_SERVER_PORT": "0",
        "LMGATE_TUNNEL_PROVIDER": "lan",
        "LMGATE_TUNNEL_LAN_ADDRESS": "127.0.0.2",
    }
    started = time.monotonic()
    tray = subprocess.Popen(
        [LMGATE], env=variables, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        shot = ARTIFACTS / "display-tray.png"
        seen_after = None
        while time.monotonic() - started < 20:
            screenshot(display, shot)
            if find_colour(shot, PRIVATE_GREY, (824, 0, 1024, TRAY_HEIGHT)) > 20:
                seen_after = time.monotonic() - started
                break
            time.sleep(0.1)
        assert seen_after is not None, f"no tray icon in {shot}"
        print(f"tray icon visible {seen_after:.2f} s after launch (incl. screenshot time)")

        # Right-click the icon: the menu opens, built from the current state. Qt opens it at
        # the pointer, so the click is near the panel's lower edge: the menu then opens below
        # the icon instead of over its lower half, and the screenshot shows both whole.
        x, _y = centroid(shot, PRIVATE_GREY, (824, 0, 1024, TRAY_HEIGHT))
        subprocess.run(
            ["xdotool", "mousemove", str(x), str(TRAY_HEIGHT - 3), "click", "3"],
            env={**os.environ, "DISPLAY": display},
            check=True,
            timeout=10,
        )
        menu_shot = ARTIFACTS / "display-tray-menu.png"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.3)
            screenshot(display, menu_shot)
            if find_colour(menu_shot, (0xEF, 0xEF, 0xEF), (500, 40, 1024, 400), 20) > 2000:
                break
        tray_panel = drawn_box(shot, (824, 0, 1024, TRAY_HEIGHT))
        icon_pixels = find_colour(shot, PRIVATE_GREY, tray_panel)
        assert find_colour(menu_shot, PRIVATE_GREY, tray_panel) >= icon_pixels * 0.95, (
            f"the menu covers the tray icon ({menu_shot})"
        )
        menu = drawn_box(menu_shot, (500, TRAY_HEIGHT, 1024, SCREEN[1]))
        crop(menu_shot, ARTIFACTS / "tray-menu.png", around(menu, tray_panel))
        publish_screenshot(ARTIFACTS / "tray-menu.png", "tray-menu.png")
        subprocess.run(
            ["xdotool", "key", "Escape"],
            env={**os.environ, "DISPLAY": display},
            check=True,
            timeout=10,
        )

        second = subprocess.run(
            [LMGATE, "--show-qr"], env=variables, capture_output=True, text=True, timeout=30
        )
        assert second.returncode == 0, second.stderr
        qr_shot = ARTIFACTS / "display-qr-window.png"
        decoded: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not decoded:
            time.sleep(0.3)
            screenshot(display, qr_shot)
            decoded = [t for t in decode_screen(qr_shot) if t.startswith("http://127.0.0.2:")]
        assert decoded, f"no pairing QR code on screen ({qr_shot})"
        crop(qr_shot, ARTIFACTS / "qr-window.png", _window_box(display, QR_WINDOW))
        publish_screenshot(ARTIFACTS / "qr-window.png", "qr-window.png")
        assert "/#" in decoded[0] and len(decoded[0]) <= 200

        # A phone pairs with the code on screen: the window names it and shows a fresh code.
        origin, code = decoded[0].split("/#", 1)
        _pair(origin, code, "Anna's iPhone")
        paired_shot = ARTIFACTS / "display-qr-window-paired.png"
        renewed: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not renewed:
            time.sleep(0.3)
            screenshot(display, paired_shot)
            renewed = [t for t in decode_screen(paired_shot) if t.startswith(origin + "/#")]
            renewed = [t for t in renewed if t != decoded[0]]
        assert renewed, f"no fresh pairing code after the phone paired ({paired_shot})"
        crop(paired_shot, ARTIFACTS / "qr-window-paired.png", _window_box(display, QR_WINDOW))
        publish_screenshot(ARTIFACTS / "qr-window-paired.png", "qr-window-paired.png")

        # The "For apps" tab: a code a phone app imports (Chatbox's provider link), drawn only
        # when asked (Alt+S: "Show QR for an app"; nothing until the link exists).
        window_box = _window_box(display, QR_WINDOW)
        x11 = {**os.environ, "DISPLAY": display}

        def click_tab(dx: int) -> None:
            at = (str(window_box[0] + dx), str(window_box[1] + 23))
            subprocess.run(
                ["xdotool", "mousemove", *at, "click", "1"], env=x11, check=True, timeout=10
            )

        click_tab(115)
        apps_shot = ARTIFACTS / "display-qr-window-for-apps.png"
        links: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not links:
            time.sleep(0.3)
            subprocess.run(["xdotool", "key", "alt+s"], env=x11, check=True, timeout=10)
            time.sleep(0.2)
            screenshot(display, apps_shot)
            links = [t for t in decode_screen(apps_shot) if t.startswith("chatbox://")]
        assert links, f"no Chatbox link on the For apps tab ({apps_shot})"
        assert links[0].startswith("chatbox://provider/import?config=")
        # Away and back: the code is down and the key masked, as the tab always opens.
        click_tab(45)
        time.sleep(0.3)
        click_tab(115)
        masked_shot = ARTIFACTS / "display-qr-window-for-apps-masked.png"
        time.sleep(0.5)
        screenshot(display, masked_shot)
        assert not [t for t in decode_screen(masked_shot) if t.startswith("chatbox://")], (
            f"the code is still on screen after leaving the tab ({masked_shot})"
        )
        crop(masked_shot, ARTIFACTS / "qr-window-for-apps.png", _window_box(display, QR_WINDOW))
        publish_screenshot(ARTIFACTS / "qr-window-for-apps.png", "qr-window-for-apps.png")
        send("quit")
        assert tray.wait(30) == 0
    finally:
        if tray.poll() is None:
            tray.kill()
        _out, err = tray.communicate(timeout=10)
        assert "Traceback" not in err, err
