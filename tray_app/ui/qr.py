"""QR codes as Qt images, drawn from the qrcode matrix (no imaging library needed)."""

from __future__ import annotations

import qrcode
from PySide6.QtGui import QColor, QImage, QPainter, QPixmap

MAX_PAYLOAD = 200  # longer payloads make codes too dense for phone cameras


def qr_image(text: str, *, module_px: int = 8, border: int = 4) -> QImage:
    code = qrcode.QRCode(border=border, error_correction=qrcode.constants.ERROR_CORRECT_M)
    code.add_data(text)
    code.make(fit=True)
    matrix = code.get_matrix()
    size = len(matrix) * module_px
    image = QImage(size, size, QImage.Format.Format_RGB32)
    image.fill(QColor("white"))
    painter = QPainter(image)
    black = QColor("black")
    for y, row in enumerate(matrix):
        for x, dark in enumerate(row):
            if dark:
                painter.fillRect(x * module_px, y * module_px, module_px, module_px, black)
    painter.end()
    return image


def qr_pixmap(text: str, *, module_px: int = 8) -> QPixmap:
    return QPixmap.fromImage(qr_image(text, module_px=module_px))
