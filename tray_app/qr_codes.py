"""QR codes from the ``qrcode`` library, with one error-correction level for every front-end:
the tray draws the matrix as an image, the CLI prints it in the terminal."""

from __future__ import annotations

import io

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


def terminal_qr(text: str) -> str:
    buffer = io.StringIO()
    _code(text, 2).print_ascii(out=buffer, invert=True)
    return buffer.getvalue()
