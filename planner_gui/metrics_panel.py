"""The metrics table: dose metrics per structure of the latest result, coloured by the
scorecard's pass/fail where there is one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from PySide6 import QtGui, QtWidgets

from planner_gui.session import Session

PASS_COLOR = QtGui.QColor(40, 110, 50)
FAIL_COLOR = QtGui.QColor(140, 40, 40)


class MetricsPanel(QtWidgets.QTableWidget):
    """Rows: structures; columns: the metrics the engine reported (Gy, %, cc as named)."""

    def __init__(self, session: Session, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.verticalHeader().setDefaultSectionSize(20)
        self.setEditTriggers(QtWidgets.QAbstractItemView.EditTrigger.NoEditTriggers)
        session.result_changed.connect(self._on_result)

    def _on_result(self, result: Any) -> None:
        metrics: Mapping[str, Mapping[str, float]] = result.metrics if result is not None else {}
        verdicts = self.verdicts(result)
        columns: list[str] = []
        for values in metrics.values():
            columns += [k for k in values if k not in columns]
        self.clear()
        self.setRowCount(len(metrics))
        self.setColumnCount(len(columns))
        self.setHorizontalHeaderLabels(columns)
        self.setVerticalHeaderLabels(list(metrics))
        for row, (structure, values) in enumerate(metrics.items()):
            for col, key in enumerate(columns):
                value = values.get(key)
                item = QtWidgets.QTableWidgetItem("" if value is None else f"{value:.2f}")
                verdict = verdicts.get((structure, key))
                if verdict is not None:
                    item.setBackground(PASS_COLOR if verdict else FAIL_COLOR)
                self.setItem(row, col, item)
        self.resizeColumnsToContents()

    @staticmethod
    def verdicts(result: Any) -> dict[tuple[str, str], bool]:
        """(structure, metric) -> passed, from the result's scorecard (empty without one)."""
        scorecard = getattr(result, "scorecard", None)
        if scorecard is None:
            return {}
        return {(i.structure, i.metric): bool(i.passed) for i in scorecard.items}
