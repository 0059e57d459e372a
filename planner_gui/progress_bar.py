"""A step progress bar that repaints lazily.

``QProgressBar.setValue`` repaints synchronously; in a window that also holds an OpenGL view
(the 3D scene) every repaint recomposes the whole window, which on a software renderer costs
tens of milliseconds per step of a prediction. This bar only schedules a repaint (``update``),
so progress ticks coalesce with the window's other painting.
"""

from __future__ import annotations

from PySide6 import QtCore, QtGui, QtWidgets


class StepProgressBar(QtWidgets.QWidget):
    """Shows ``value`` of ``maximum`` steps with a caption ("Predicting 3/10")."""

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self._value = 0
        self._maximum = 1
        self._caption = ""
        self.setMinimumSize(180, 18)

    def set_progress(self, value: int, maximum: int, caption: str) -> None:
        self._value, self._maximum, self._caption = int(value), max(int(maximum), 1), caption
        self.update()

    def value(self) -> int:
        return self._value

    def maximum(self) -> int:
        return self._maximum

    def text(self) -> str:
        return self._caption

    def paintEvent(self, event: QtGui.QPaintEvent) -> None:  # noqa: N802 - Qt API
        painter = QtGui.QPainter(self)
        rect = self.rect().adjusted(0, 2, -1, -3)
        palette = self.palette()
        painter.setPen(palette.color(QtGui.QPalette.ColorRole.Mid))
        painter.setBrush(palette.color(QtGui.QPalette.ColorRole.Base))
        painter.drawRect(rect)
        filled = QtCore.QRectF(rect).adjusted(1, 1, 0, 0)
        filled.setWidth(filled.width() * min(self._value / self._maximum, 1.0))
        painter.fillRect(filled, palette.color(QtGui.QPalette.ColorRole.Highlight))
        painter.setPen(palette.color(QtGui.QPalette.ColorRole.Text))
        painter.drawText(rect, QtCore.Qt.AlignmentFlag.AlignCenter, self._caption)
        painter.end()
