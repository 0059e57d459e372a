"""Qt views of the session: tri-planar slices, 3D scene.

Images are indexed ``[row, column]`` everywhere here (pyqtgraph's row-major order), set once
when the views are imported and before any image item exists.
"""

import pyqtgraph as pg

pg.setConfigOptions(imageAxisOrder="row-major")
