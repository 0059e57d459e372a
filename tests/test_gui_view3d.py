"""The 3D view under a beam drag: decimated surfaces, and renders throttled while the beams move
(each software render blocks the GUI thread; see planner_gui/views/view3d.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("pytestqt")

from planner_gui.session import Session  # noqa: E402
from planner_gui.views.view3d import (  # noqa: E402
    BEAM_RENDER_INTERVAL_MS,
    MAX_SURFACE_TRIANGLES,
    View3D,
)
from tests.gui_helpers import make_case  # noqa: E402


@pytest.fixture
def view(qtbot):
    session = Session()
    view = View3D(session)
    qtbot.addWidget(view)
    view.resize(640, 480)
    view.show()
    session.open_case(make_case(shape=(40, 96, 112), spacing=(2.5, 2.0, 2.0)))
    qtbot.wait(200)
    yield view
    view.close_scene()


def test_surfaces_are_decimated(view):
    sizes = {name: actor.GetMapper().GetInput().GetNumberOfCells()
             for name, actor in view.structure_actors.items()}
    assert sizes and max(sizes.values()) <= MAX_SURFACE_TRIANGLES
    assert all(n > 50 for n in sizes.values()), sizes  # still surfaces, not a few triangles


def test_beam_moves_render_at_most_once_per_interval_and_end_drawn(view, qtbot):
    session = view.session
    renders: list[int] = []
    view.plotter.render_window.AddObserver("EndEvent", lambda *_: renders.append(1))
    session.begin_edit()
    moves = 40
    for k in range(moves):
        session.set_gantry(0, 10.0 + 2 * k, transient=True)
        qtbot.wait(10)  # the event loop runs between moves, as during a mouse drag
        assert view.beam_meshes[0].points[0] is not None
    during = len(renders)
    session.commit_edit()
    qtbot.wait(BEAM_RENDER_INTERVAL_MS + 150)
    # every move would otherwise repaint (about one render per move); throttled, a render
    # covers at least the moves of one interval (>= 10 ms each)
    assert during <= moves / 4, f"{during} renders for {moves} beam moves"
    assert len(renders) > during, "the final beam position was never drawn"
