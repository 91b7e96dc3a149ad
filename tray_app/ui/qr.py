"""QR codes as Qt images, drawn from the code's matrix (no imaging library needed)."""

from __future__ import annotations

from PySide6.QtGui import QColor, QImage, QPainter, QPixmap

from tray_app.qr_codes import MAX_PAYLOAD, qr_matrix

__all__ = ["MAX_PAYLOAD", "qr_image", "qr_pixmap"]


def qr_image(text: str, *, module_px: int = 8, border: int = 4) -> QImage:
    matrix = qr_matrix(text, border=border)
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
