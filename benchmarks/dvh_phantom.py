"""The 30-ROI head-and-neck phantom with a dose that reaches every organ, for the DVH benchmarks.

The phantom's own synthetic dose (a blurred prescription map) is 0 Gy in most organs, which
would make agreement checks trivial; a smooth low-dose bath (30 Gy at the centre, Gaussian,
sigma 70 mm, inside the body) puts every organ in a dose gradient.
"""

from __future__ import annotations

import numpy as np

from engine.case import Case, Volume
from engine.phantom import PhantomSpec, make_phantom


def phantom_with_bath(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Case:
    case = make_phantom(PhantomSpec(shape=shape, spacing=spacing, extra_oars=19, with_dose=True,
                                    noise_hu=0.0))
    g = case.geometry
    axes = [np.arange(n, dtype=np.float32) * s for n, s in zip(g.shape, g.spacing)]
    centre = [n * s / 2 for n, s in zip(g.shape, g.spacing)]
    z2, y2, x2 = ((a - c) ** 2 for a, c in zip(axes, centre))
    r2 = z2[:, None, None] + y2[None, :, None] + x2[None, None, :]
    bath = 30.0 * np.exp(-r2 / np.float32(2 * 70.0**2)) * case.external.mask
    dose = np.maximum(case.dose.array, bath).astype(np.float32)
    return case.with_dose(Volume(dose, g))
