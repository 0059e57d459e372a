"""The plan-quality tables of the latest result: the clinical scorecard (objective, value,
score, pass/fail coloured, total) and the dose metrics per structure."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from PySide6 import QtCore, QtGui, QtWidgets

from engine.metrics.dvh import DoseMetrics
from planner_gui.session import Session

PASS_COLOR = QtGui.QColor(46, 125, 50)
FAIL_COLOR = QtGui.QColor(170, 45, 45)
NOT_EVALUATED_COLOR = QtGui.QColor(90, 90, 90)
SCORECARD_COLUMNS = ("Objective", "Structure", "Value", "Score", "Result")
# metric key -> column title (units in the title)
METRIC_TITLES = {
    "volume_cc": "Volume (cc)", "mean_gy": "Dmean (Gy)", "max_gy": "Dmax (Gy)",
    "min_gy": "Dmin (Gy)", "d98_gy": "D98% (Gy)", "d95_gy": "D95% (Gy)", "d50_gy": "D50% (Gy)",
    "d2_gy": "D2% (Gy)", "d0_1cc_gy": "D0.1cc (Gy)", "d0_03cc_gy": "D0.03cc (Gy)",
    "v20gy_pct": "V20Gy (%)", "homogeneity_index": "HI", "paddick_ci": "Paddick CI",
    "coverage_fraction": "Coverage",
}


def _item(text: str, color: QtGui.QColor | None = None) -> QtWidgets.QTableWidgetItem:
    item = QtWidgets.QTableWidgetItem(text)
    if color is not None:
        item.setBackground(color)
        item.setForeground(QtGui.QColor("white"))
    return item


class MetricsPanel(QtWidgets.QWidget):
    """Scorecard and metrics tables following the session's latest result."""

    def __init__(self, session: Session, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.total_label = QtWidgets.QLabel("Scorecard: —")
        self.scorecard = QtWidgets.QTableWidget(0, len(SCORECARD_COLUMNS))
        self.scorecard.setHorizontalHeaderLabels(SCORECARD_COLUMNS)
        self.metrics = QtWidgets.QTableWidget(0, 0)
        for table in (self.scorecard, self.metrics):
            table.setEditTriggers(QtWidgets.QAbstractItemView.EditTrigger.NoEditTriggers)
            table.verticalHeader().setDefaultSectionSize(20)
        self.scorecard.verticalHeader().setVisible(False)
        tabs = QtWidgets.QTabWidget()
        tabs.addTab(self.scorecard, "Scorecard")
        tabs.addTab(self.metrics, "Metrics")
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.total_label)
        layout.addWidget(tabs)
        session.result_changed.connect(self._on_result)

    def _on_result(self, result: Any) -> None:
        self._show_scorecard(getattr(result, "scorecard", None))
        self._show_metrics(result.metrics if result is not None else {})

    def _show_scorecard(self, card: Any) -> None:
        rows = card.results if card is not None else ()
        self.scorecard.setRowCount(len(rows))
        for row, r in enumerate(rows):
            if r.passed is None:
                verdict, color = (r.note or "not evaluated"), NOT_EVALUATED_COLOR
            else:
                verdict, color = ("PASS", PASS_COLOR) if r.passed else ("FAIL", FAIL_COLOR)
            values = (r.objective.label, r.structure or "—",
                      "" if r.value is None else f"{r.value:.2f}",
                      "" if r.score is None else f"{r.score:.2f}")
            for col, text in enumerate(values):
                self.scorecard.setItem(row, col, _item(text))
            self.scorecard.setItem(row, len(values), _item(verdict, color))
        self.scorecard.resizeColumnsToContents()
        if card is None:
            self.total_label.setText("Scorecard: —")
        else:
            self.total_label.setText(f"Scorecard {card.template}: total {card.total:.2f}  "
                                     f"({card.passed} passed, {card.failed} failed)")

    def _show_metrics(self, by_structure: Mapping[str, DoseMetrics]) -> None:
        metrics = {name: {k: v for k, v in dataclasses.asdict(m).items()
                          if k != "name" and v is not None} for name, m in by_structure.items()}
        keys: list[str] = []
        for values in metrics.values():
            keys += [k for k in values if k not in keys]
        self.metrics.setRowCount(len(metrics))
        self.metrics.setColumnCount(len(keys))
        self.metrics.setHorizontalHeaderLabels([METRIC_TITLES.get(k, k) for k in keys])
        self.metrics.setVerticalHeaderLabels(list(metrics))
        for row, values in enumerate(metrics.values()):
            for col, key in enumerate(keys):
                value = values.get(key)
                item = _item("" if value is None else f"{value:.2f}")
                item.setTextAlignment(QtCore.Qt.AlignmentFlag.AlignRight
                                      | QtCore.Qt.AlignmentFlag.AlignVCenter)
                self.metrics.setItem(row, col, item)
        self.metrics.resizeColumnsToContents()
