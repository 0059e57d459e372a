"""Exports interrupted by SIGKILL: `dosepilot convert` (a whole study), `dosepilot predict`
(RTDOSE, DVH table, metrics, report, dose array) and the GUI's export, each a real subprocess
frozen at many points while it writes (what a SIGKILL at that instant leaves on disk) and then
killed. Every file a user can see must be complete and readable, never a part of one.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys

import pytest
from fault_harness import (
    check_complete,
    dosepilot,
    reference_of,
    stop_and_inspect,
    subprocess_env,
    visible_files,
)
from test_predict_cli import write_openkbp_npz

from engine.cli import main
from engine.durable import is_temporary

PREDICT_OUTPUTS = {"plan.dcm", "dose.dcm", "dvh.csv", "metrics.json", "report.png", "dose.npy"}


def _popen(cmd):
    return subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def case_file(tmp_path_factory):
    """A synthetic 128^3 OpenKBP case: 128 CT slices, 6 structures, a plan, a dose."""
    return write_openkbp_npz(tmp_path_factory.mktemp("case") / "pt_1.npz")


def test_sigkill_while_converting_a_study_leaves_only_complete_dicom_files(case_file,
                                                                           tmp_path):
    assert main(["convert", str(case_file), str(tmp_path / "ref"), "--to", "dicom"]) == 0
    reference = reference_of(tmp_path / "ref")
    assert len(reference) == 131  # 128 CT slices, RTSTRUCT, RTPLAN, RTDOSE

    out = tmp_path / "out"
    proc = _popen(dosepilot("convert", case_file, out, "--to", "dicom"))
    report = stop_and_inspect(proc, out, reference, lambda: (out / "CT").exists(),
                              random.Random(1), kill_if=lambda r: r.stops >= 12)
    assert report.killed and report.returncode == -signal.SIGKILL
    assert report.partial == [], report.partial[:5]
    assert 0 < report.complete_files < len(reference), "the kill must land while it writes"


def test_sigkill_while_predict_writes_leaves_only_complete_outputs(case_file, tiny_dose_bundle,
                                                                   tmp_path):
    """Frozen every few milliseconds while it writes (so also while it writes its RTDOSE),
    then killed while it writes its last file, the dose array. The stops are only as frequent
    as a loaded machine schedules this test: a run in which none fell inside the RTDOSE or the
    dose array write is repeated (up to 3 runs), every run's stops checked all the same."""
    args = ["predict", case_file, "--model", tiny_dose_bundle, "--steps", "1", "--threads", "1"]
    assert main([str(a) for a in args] + ["--out", str(tmp_path / "ref")]) == 0
    reference = reference_of(tmp_path / "ref" / "pt_1")

    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        caught_writing: set[str] = set()

        def writing_the_last_file(_report, out=out, caught=caught_writing) -> bool:
            names = [p.name for p in (out / "pt_1").iterdir() if is_temporary(p.name)]
            caught.update(n[1:n.index(".tmp-")] for n in names)
            return "dose.npy" in caught

        proc = _popen(dosepilot(*args, "--out", out))
        report = stop_and_inspect(proc, out, reference, lambda o=out: (o / "pt_1").exists(),
                                  random.Random(attempt), interval_s=(0.0, 0.002),
                                  kill_if=writing_the_last_file)
        assert report.partial == [], report.partial[:5]
        if report.killed and "dose.dcm" in caught_writing:
            break
    assert report.killed and "dose.dcm" in caught_writing, caught_writing
    assert {p.name for p in visible_files(out)} == PREDICT_OUTPUTS - {"dose.npy"}
    # the next run into the same folder completes and clears what the killed one left
    assert main([str(a) for a in args] + ["--out", str(out)]) == 0
    assert {p.name for p in (out / "pt_1").iterdir()} == PREDICT_OUTPUTS


GUI_EXPORT = """
import sys
from engine.io.openkbp import load_openkbp
from planner_gui.export import export_plan_and_dose
case = load_openkbp(sys.argv[1])
export_plan_and_dose(case, case.plan, case.dose, sys.argv[2])
"""


def test_sigkill_during_the_gui_export_leaves_no_export_folder_or_a_complete_one(
        case_file, tmp_path):
    """The window's File > Export (planner_gui.export) of a dataset case writes a whole study
    (CT series, RTSTRUCT, RTPLAN, RTDOSE); killed anywhere, the chosen folder shows no export
    or a complete one."""
    from engine.io.openkbp import load_openkbp
    from planner_gui.export import export_plan_and_dose

    case = load_openkbp(case_file)
    done = export_plan_and_dose(case, case.plan, case.dose, tmp_path / "ref")
    assert done.whole_case
    reference = reference_of(done.folder)

    out = tmp_path / "exports"
    out.mkdir()
    proc = _popen([sys.executable, "-c", GUI_EXPORT, str(case_file), str(out)])
    report = stop_and_inspect(proc, out, reference, lambda: any(out.iterdir()),
                              random.Random(4), kill_if=lambda r: r.stops >= 12)
    assert report.killed and report.partial == []
    assert report.temporaries_seen > 0, "the kill must land while it writes"
    assert [p.name for p in out.iterdir() if not is_temporary(p.name)] == []
    # the next export clears the killed one's temporary folder and appears whole
    done = export_plan_and_dose(case, case.plan, case.dose, out)
    assert [p.name for p in out.iterdir()] == [done.folder.name]
    assert len(visible_files(out)) == len(reference)
    for p in visible_files(out):
        check_complete(p, reference)
