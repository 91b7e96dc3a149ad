"""The pairing QR code a terminal shows (`lmgate serve`, `lmgate pair`): drawn in explicit
black and white with a quiet zone of four modules, so that it reads the same on a light and a
dark terminal. It was drawn in the terminal's own colours with a two-module border: inverted
on a light theme, and too tight a margin for many phone cameras.

Each rendering is drawn the way a terminal draws it (a monospace font, each cell's background,
the glyph in its foreground, the theme's palette) and decoded with zxing-cpp without its
"try inverted" fallback, as a plain phone camera would read it."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import zxingcpp
from PIL import Image, ImageDraw, ImageFont

from tests.helpers import Env, publish_screenshot
from tray_app.qr_codes import UPPER_HALF, qr_matrix, terminal_qr

URL = "https://calm-otter.ngrok-free.app/#ABCDEFGHJKLMNPQRSTUVWXYZ23"
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"
SGR = re.compile(r"\x1b\[([0-9;]*)m")
RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Theme:
    name: str
    foreground: RGB
    background: RGB
    black: RGB  # SGR 30 / 40
    bright_white: RGB  # SGR 97 / 107


LIGHT = Theme("light", (0, 0, 0), (255, 255, 255), (0, 0, 0), (255, 255, 255))
# GNOME Terminal's dark Tango palette: black is not quite black, the background dark grey.
DARK = Theme("dark", (211, 215, 207), (46, 52, 54), (46, 52, 54), (238, 238, 236))


def render(text: str, theme: Theme, margin_cells: int = 2) -> Image.Image:
    """The text as a terminal with ``theme`` shows it."""
    font = ImageFont.truetype(FONT, 16)
    width = round(font.getlength("M"))
    ascent, descent = font.getmetrics()
    height = ascent + descent
    rows = text.rstrip("\n").split("\n")
    columns = max(len(SGR.sub("", row)) for row in rows)
    image = Image.new(
        "RGB",
        ((columns + 2 * margin_cells) * width, (len(rows) + 2 * margin_cells) * height),
        theme.background,
    )
    draw = ImageDraw.Draw(image)
    colours = {"30": theme.black, "97": theme.bright_white}
    backgrounds = {"40": theme.black, "107": theme.bright_white}
    for y, row in enumerate(rows, start=margin_cells):
        fg, bg = theme.foreground, theme.background
        x = margin_cells
        for piece in re.split(r"(\x1b\[[0-9;]*m)", row):
            match = SGR.fullmatch(piece)
            if match:
                for code in match.group(1).split(";"):
                    if code in {"", "0"}:
                        fg, bg = theme.foreground, theme.background
                    fg = colours.get(code, fg)
                    bg = backgrounds.get(code, bg)
                continue
            for char in piece:
                box = (x * width, y * height, (x + 1) * width - 1, (y + 1) * height - 1)
                draw.rectangle(box, fill=bg)
                if char == UPPER_HALF:  # drawn as the font's block glyph would be: the top half
                    draw.rectangle((box[0], box[1], box[2], box[1] + height // 2 - 1), fill=fg)
                elif char != " ":
                    draw.text((x * width, y * height), char, font=font, fill=fg)
                x += 1
    return image


@pytest.mark.parametrize("theme", [LIGHT, DARK], ids=lambda t: t.name)
def test_the_terminal_code_reads_on_light_and_dark_terminals(theme: Theme, tmp_path: Path) -> None:
    image = render(terminal_qr(URL), theme)
    shot = tmp_path / f"terminal-qr-{theme.name}.png"
    image.save(shot)
    publish_screenshot(shot, f"terminal-qr-{theme.name}.png")
    found = zxingcpp.read_barcodes(image, try_invert=False)
    assert [code.text for code in found] == [URL]


def modules(text: str) -> list[list[bool]]:
    """The dark (True) and light modules the text draws, two rows per line."""
    grid: list[list[bool]] = []
    for row in text.rstrip("\n").split("\n"):
        upper: list[bool] = []
        lower: list[bool] = []
        top = bottom = False
        for piece in re.split(r"(\x1b\[[0-9;]*m)", row):
            match = SGR.fullmatch(piece)
            if match:
                code = match.group(1)
                top = {"30": True, "97": False}.get(code, top)
                bottom = {"40": True, "107": False}.get(code, bottom)
                continue
            for char in piece:
                assert char == UPPER_HALF, repr(char)
                upper.append(top)
                lower.append(bottom)
        grid += [upper, lower]
    return grid


def test_the_quiet_zone_is_four_modules() -> None:
    drawn = modules(terminal_qr(URL))
    code = qr_matrix(URL, border=0)
    size = len(code)
    assert len(drawn[0]) == size + 8
    # Four light rows above, four light columns each side; below, four and the half line.
    assert drawn[4 : 4 + size] == [[False] * 4 + row + [False] * 4 for row in code]
    assert not any(any(row) for row in drawn[:4] + drawn[4 + size :])
    assert len(drawn) - size - 4 in {4, 5}


def test_a_terminal_shows_a_code_that_reads(env: Env, tmp_path: Path) -> None:
    """`lmgate pair` prints what a person scans: decoded from its own output."""
    result = subprocess.run(
        [*env_lmgate(), "pair", "--url", "https://calm-otter.ngrok-free.app"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env.vars,
    )
    assert result.returncode == 0, result.stderr
    qr = "\n".join(line for line in result.stdout.splitlines() if UPPER_HALF in line)
    url = re.search(r"Pairing URL: (\S+)", result.stdout)
    assert url is not None
    for theme in (LIGHT, DARK):
        found = zxingcpp.read_barcodes(render(qr + "\n", theme), try_invert=False)
        assert [code.text for code in found] == [url.group(1)], theme.name


def env_lmgate() -> list[str]:
    from tests.helpers import LMGATE

    return [LMGATE]
