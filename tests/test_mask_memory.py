"""A ROI's mask from an RTSTRUCT costs memory for its bounding box, not for the whole CT grid,
also after the engine's allocator tuning (which keeps freed heap memory: a plain np.zeros then
reuses dirty memory and clears every byte of a CT-size mask, 105 MB per ROI on a 400 x 512 x 512
CT). Measured in a fresh process, by its resident set size (Linux)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
import numpy as np
from engine.case import Geometry
from engine.cpu_tuning import tune_allocator
from engine.io.dicom_rtstruct import rasterize

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024.0

assert tune_allocator()
dirty = np.ones(200 * 512 * 512, dtype=np.uint8)  # what a model's layers leave in the heap
del dirty
g = Geometry(shape=(200, 512, 512), origin=(-250.0, -250.0, 0.0), spacing=(2.0, 1.0, 1.0))
square = np.array([[-10.0, -10.0, 100.0], [10.0, -10.0, 100.0], [10.0, 10.0, 100.0],
                   [-10.0, 10.0, 100.0]])
before = rss_mb()
masks = [rasterize([square + (0.0, 0.0, 2.0 * k)], g).mask for k in range(4)]
grown = rss_mb() - before
print(json.dumps({"grown_mb": grown, "voxels": [int(m.sum()) for m in masks],
                  "any": bool(masks[0].any()), "mask_mb": masks[0].nbytes / 2**20}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or not sys.platform.startswith(
    "linux"), reason="resident set size from /proc (Linux)")
def test_small_rois_on_a_large_ct_hold_only_their_pages():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["voxels"] == [400] * 4 and result["any"]  # 20 x 20 voxel centres each
    assert result["mask_mb"] == 50.0
    # four 50 MB masks: a few pages each, not 200 MB
    assert result["grown_mb"] < 10.0, result
