"""A model whose trainer flags it as not usable is labelled so in the window."""

from __future__ import annotations

import os

import pytest

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not os.environ.get("DISPLAY"),
                       reason="GUI tests need a display: run under xvfb-run (make test)"),
]

from engine.dose_model import load_dose_model, save_dose_model  # noqa: E402
from engine.runtime import DoseEngine  # noqa: E402
from planner_gui.main_window import MainWindow  # noqa: E402


def _engine(bundle, tmp_path, provenance):
    model = load_dose_model(bundle)
    path = save_dose_model(tmp_path / "model", model.dit, model.vae, model.codec,
                           normalisation=model.normalisation, provenance=provenance)
    return DoseEngine.from_checkpoint(path, threads=1)


@pytest.mark.parametrize("warning", ["", "barely trained: doses are not realistic"])
def test_engine_label_says_when_the_model_is_experimental(qtbot, aloop, gui_settings,
                                                          tiny_dose_bundle, tmp_path, warning):
    engine = _engine(tiny_dose_bundle, tmp_path, {"quality_warning": warning} if warning else {})
    assert engine.model.quality_warning == warning
    window = MainWindow(engine, settings=gui_settings)
    qtbot.addWidget(window)
    window.show()
    qtbot.waitExposed(window)
    label = window.engine_label
    if warning:
        assert label.text().startswith("Experimental model") and label.toolTip() == warning
    else:
        assert label.text() == "Dose engine ready"
    window.close()
