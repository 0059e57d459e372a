"""The GUI-free model of what the slice views' colour wash shows, and what to call it.

Until the planner picks a mode in the window's "Show" box, the wash follows the AI: it shows the
newest AI result (the 1-step preview while a beam is dragged, the full prediction on release) as
soon as there is one, and the patient's reference dose before that. Once the planner picks a
mode, it stays until they pick another: the reference, the difference and the uncertainty are one
click away and are never taken away by a new result.

Views subscribe to :attr:`DoseDisplay.changed` and read :attr:`DoseDisplay.mode` and
:meth:`DoseDisplay.describe`; the model never calls a view.
"""

from __future__ import annotations

from typing import Any

from planner_gui.session import Session
from planner_gui.signals import Signal

OVERLAY_MODES = ("Predicted dose", "Reference dose", "Difference (predicted - reference)",
                 "Uncertainty (std)")
PREDICTED, REFERENCE, DIFFERENCE, UNCERTAINTY = OVERLAY_MODES


def ai_name(result: Any) -> str:
    """What an AI result is called on screen: "AI preview", "AI 10-step" (a full prediction of
    10 sampler steps) or "AI 10-step, mean of 3 seeds"; "" for no result."""
    if result is None:
        return ""
    if result.kind == "preview":
        return "AI preview"
    steps = getattr(result, "steps", None)
    name = f"AI {steps}-step" if steps else "AI prediction"
    seeds = getattr(result, "seeds", (0,))
    return f"{name}, mean of {len(seeds)} seeds" if len(seeds) > 1 else name


class DoseDisplay:
    """Which dose the colour wash shows (one of :data:`OVERLAY_MODES`) for a :class:`Session`.

    Signals:
        changed(mode): the mode or the model's name changed (views redraw and relabel).
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        self.mode = PREDICTED
        self.chosen_by_user = False
        self.has_engine = False
        self.model_name = ""
        self.changed = Signal()
        session.case_changed.connect(self._on_case)
        session.result_changed.connect(self._on_result)

    # ---- who decides ------------------------------------------------------------------------
    def choose(self, mode: str) -> None:
        """The planner picked ``mode``: show it from now on, whatever results arrive."""
        self.chosen_by_user = True
        self._set(mode)

    def suggest(self, mode: str) -> None:
        """Show ``mode`` unless the planner has picked a mode in this window."""
        if not self.chosen_by_user:
            self._set(mode)

    def set_engine(self, available: bool, model_name: str = "") -> None:
        """Whether a dose engine is there, and its model's name for the labels ("" unnamed)."""
        self.has_engine, self.model_name = bool(available), model_name
        self.changed.emit(self.mode)

    def _set(self, mode: str) -> None:
        if mode not in OVERLAY_MODES:
            raise ValueError(f"unknown overlay {mode!r}; choose one of {OVERLAY_MODES}")
        if mode != self.mode:
            self.mode = mode
            self.changed.emit(mode)

    def _on_case(self, case: Any) -> None:
        # no result yet for a new patient: show what there is until the AI's first result
        self.suggest(REFERENCE if case.dose is not None else PREDICTED)

    def _on_result(self, result: Any) -> None:
        if result is not None:
            self.suggest(PREDICTED)

    # ---- what to call it --------------------------------------------------------------------
    def describe(self) -> str:
        """The label of what the wash shows now, e.g. "AI 10-step · default model",
        "Reference (RTDOSE)", "Physics (pyRadPlan)", "AI preview − Reference (RTDOSE)", or what
        is missing ("Reference dose: none for this patient")."""
        session = self.session
        ai = ai_name(session.result)
        reference = session.reference_source
        if self.mode == PREDICTED:
            if ai:
                return f"{ai} · {self.model_name}" if self.model_name else ai
            return "AI dose: computing …" if self.has_engine else "AI dose: no dose engine"
        if self.mode == REFERENCE:
            return reference or "Reference dose: none for this patient"
        if self.mode == DIFFERENCE:
            if ai and reference:
                return f"{ai} − {reference}"
            return "Difference: needs an AI dose and a reference dose"
        std = getattr(session.result, "std", None)
        if std is None:
            return "Uncertainty: needs a full prediction with 2 or more seeds"
        return f"Uncertainty (std) of {ai}"
