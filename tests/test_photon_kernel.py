"""The quick plan's copy of the physics plans' 6 MV pencil-beam kernel."""

from __future__ import annotations

import json
import subprocess
import textwrap

import numpy as np
import pytest

from engine.physics.photon_kernel import (
    CUTOFF_MM,
    bixel_response,
    depth_factors,
    photon_kernel,
)
from engine.resources import resource_path


def test_the_shipped_kernel_is_pyradplans_generic_6mv_machine(physics_env):
    """The resource holds exactly what pyRadPlan's photons_Generic.mat holds at SSD 900 mm."""
    script = textwrap.dedent("""
        import json, pathlib, pyRadPlan, numpy as np, scipy.io as sio
        path = pathlib.Path(pyRadPlan.__file__).parent / "data/machines/photons_Generic.mat"
        m = sio.loadmat(path, squeeze_me=True, struct_as_record=False)["machine"]
        k = [x for x in m.data.kernel if x.SSD == 900][0]
        print(json.dumps({"sad": float(m.meta.SAD), "m": float(m.data.m),
                          "betas": [float(b) for b in m.data.betas],
                          "penumbra": float(m.data.penumbraFWHMatIso),
                          "pos": [float(p) for p in m.data.kernelPos],
                          "kernels": [[float(v) for v in getattr(k, f"kernel{c}")]
                                      for c in (1, 2, 3)]}))
    """)
    out = json.loads(subprocess.run([str(physics_env), "-I", "-c", script], check=True,
                                    capture_output=True, text=True).stdout)
    kernel = photon_kernel()
    assert (kernel.sad_mm, kernel.m_per_mm, kernel.penumbra_fwhm_mm) == (
        out["sad"], out["m"], out["penumbra"])
    assert kernel.betas_per_mm == tuple(out["betas"])
    np.testing.assert_array_equal(kernel.radius_mm, out["pos"])
    np.testing.assert_allclose(kernel.kernels, out["kernels"], rtol=1e-6, atol=1e-12)


def test_the_resource_names_its_source_and_licence():
    data = json.loads(resource_path("physics", "photon_kernel_6mv.json").read_text())
    assert "photons_Generic.mat" in data["source"] and "BSD-3-Clause" in data["license"]


def test_depth_factors_build_up_then_fall_with_the_primary_attenuation():
    kernel = photon_kernel()
    depth = np.array([0.0, 5.0, 15.0, 100.0, 200.0])
    d = depth_factors(kernel, depth)
    assert d.shape == (5, 3) and d.dtype == np.float32
    np.testing.assert_allclose(d[0], 0.0, atol=1e-7)      # no dose at the surface
    primary = d[:, 0]
    assert primary[1] < primary[2] and primary[2] > primary[3] > primary[4]  # build-up, fall
    # beyond the build-up the primary falls as exp(-m d)
    assert primary[4] / primary[3] == pytest.approx(np.exp(-kernel.m_per_mm * 100.0), rel=1e-3)
    np.testing.assert_array_equal(depth_factors(kernel, np.array([-3.0])), 0.0)


def test_tiled_bixels_make_a_flat_field_with_its_half_maximum_at_the_field_edge():
    """Bixels of 7 mm on a 7 mm lattice: their summed primary response is flat inside the
    field and half its centre value at the field's edge (the penumbra is symmetric about it),
    which holds only if each bixel's square is exactly 7 mm wide and centred."""
    b = 7.0
    response = bixel_response(b)
    centres = b * np.arange(-6, 7)                       # a 91 mm wide field, along z
    x = np.linspace(-60.0, 60.0, 241)
    # a square field of 13 x 13 bixels, read along z through its centre
    profile = sum(sum(response.at(x - c, np.full_like(x, dv))[:, 0] for c in centres)
                  for dv in b * np.arange(-6, 7))
    centre = profile[np.argmin(np.abs(x))]
    inside = profile[np.abs(x) <= 30.0]
    assert inside.max() / inside.min() < 1.02
    edge = 6.5 * b
    assert profile[np.argmin(np.abs(x - edge))] / centre == pytest.approx(0.5, abs=0.05)
    assert profile[np.argmin(np.abs(x + edge))] / centre == pytest.approx(0.5, abs=0.05)


def test_a_bixels_response_is_symmetric_and_cut_off_at_50_mm():
    response = bixel_response(7.0)
    t = response.tables
    np.testing.assert_allclose(t, t[::-1], atol=1e-7)
    np.testing.assert_allclose(t, np.swapaxes(t, 0, 1), atol=1e-7)
    assert response.at(np.array([CUTOFF_MM + 1.0]), np.array([0.0])).tolist() == [[0.0] * 3]
    assert response.at(np.array([CUTOFF_MM - 5.0]), np.array([0.0]))[0, 2] > 0.0  # scatter
