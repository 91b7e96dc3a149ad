"""QR codes from the ``qrcode`` library, with one error-correction level for every front-end:
the tray draws the matrix as an image, the CLI prints it in the terminal."""

from __future__ import annotations

import qrcode

MAX_PAYLOAD = 200  # longer payloads make codes too dense for phone cameras


def _code(text: str, border: int) -> qrcode.QRCode:  # type: ignore[type-arg]
    code = qrcode.QRCode(border=border, error_correction=qrcode.constants.ERROR_CORRECT_M)
    code.add_data(text)
    code.make(fit=True)
    return code


def qr_matrix(text: str, *, border: int = 4) -> list[list[bool]]:
    """The code's modules, row by row, quiet zone included: True is dark."""
    return [list(row) for row in _code(text, border).get_matrix()]


# Explicit colours, never the terminal's own: a code drawn in the default foreground reads on
# a dark theme and comes out inverted (unreadable to many phone cameras) on a light one.
_DARK_FG, _DARK_BG = "\x1b[30m", "\x1b[40m"
_LIGHT_FG, _LIGHT_BG = "\x1b[97m", "\x1b[107m"
_RESET = "\x1b[0m"
UPPER_HALF = "\u2580"  # ▀: the upper module in the foreground colour, the lower in the background


def terminal_qr(text: str) -> str:
    """The code as terminal text: dark modules on light, with the standard quiet zone of four
    modules, two rows of modules per line (a cell is about twice as tall as it is wide)."""
    rows = qr_matrix(text, border=4)
    if len(rows) % 2:
        rows.append([False] * len(rows[0]))  # a light half row below the quiet zone
    lines = []
    for upper, lower in zip(rows[::2], rows[1::2], strict=True):
        line, shown = [], None
        for pair in zip(upper, lower, strict=True):
            if pair != shown:  # a colour is written only where it changes
                top, bottom = pair
                line.append((_DARK_FG if top else _LIGHT_FG) + (_DARK_BG if bottom else _LIGHT_BG))
                shown = pair
            line.append(UPPER_HALF)
        lines.append("".join(line) + _RESET)
    return "\n".join(lines) + "\n"
