"""A native crash in the test process names its test in DOSEPILOT_CRASH_LOG (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_a_crashing_test_is_named_with_its_stack(tmp_path):
    (tmp_path / "test_dies.py").write_text(
        "import os\n\ndef test_fine():\n    pass\n\ndef test_dies():\n    os.abort()\n")
    log = tmp_path / "crash.log"
    env = {**os.environ, "DOSEPILOT_CRASH_LOG": str(log)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:faulthandler",
         "-p", "tests.conftest", "--rootdir", str(tmp_path), str(tmp_path / "test_dies.py")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    text = log.read_text()
    assert "running test_dies.py::test_fine\nrunning test_dies.py::test_dies\n" in text
    crash = text.split("running test_dies.py::test_dies\n", 1)[1]
    assert "Fatal Python error: Aborted" in crash
    assert 'test_dies.py", line 7 in test_dies' in crash
