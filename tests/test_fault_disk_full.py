"""No space left on the output device: `dosepilot predict`, the GUI export, training
checkpoints and the training event log on a small tmpfs that is really full. Each must stop
with an error naming the file and saying "no space left", and leave what was written before
intact (byte for byte), with no temporaries.

Mounting a tmpfs needs root (CI runs as root); elsewhere these tests skip saying so.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from fault_harness import SmallDevice

from engine.cli import main
from engine.durable import NoSpaceError, is_temporary
from trainer import checkpointing
from trainer.events import read_events

pytestmark = pytest.mark.skipif(bool(SmallDevice.unavailable()),
                                reason=SmallDevice.unavailable() or "root")


@pytest.fixture
def device(tmp_path):
    with SmallDevice(tmp_path / "device") as dev:
        yield dev


def _digests(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _temporaries(folder):
    return [p for p in folder.rglob("*") if is_temporary(p.name)]


def test_predict_onto_a_full_disk_names_the_file_and_keeps_the_earlier_prediction(
        phantom_dicom, tiny_dose_bundle, device, tmp_path, capsys):
    patient = tmp_path / "patient"
    shutil.copytree(phantom_dicom.rtplan_path.parent, patient)
    args = ["predict", str(patient), "--model", str(tiny_dose_bundle), "--out",
            str(device.path / "out"), "--steps", "1", "--threads", "1", "--json"]
    assert main(args) == 0
    capsys.readouterr()
    folder = device.path / "out" / "patient"
    before = _digests(folder)
    assert {"dose.dcm", "dvh.csv", "metrics.json", "report.png"} <= set(before)

    device.fill()
    assert main(args) == 1
    error = json.loads(capsys.readouterr().out)["cases"][0]["error"]
    assert error.startswith("NoSpaceError: cannot write ")
    assert str(folder) in error and "no space left on the device" in error
    assert _digests(folder) == before, "the earlier prediction must be intact"
    assert _temporaries(device.path) == []


def test_the_gui_export_onto_a_full_disk_leaves_no_half_export(device):
    from engine.phantom import PhantomSpec, make_phantom
    from planner_gui.export import export_plan_and_dose

    case = make_phantom(PhantomSpec(shape=(24, 56, 64), spacing=(4.0, 4.0, 4.0)))
    exports = device.path / "exports"
    first = export_plan_and_dose(case, case.plan, case.dose, exports)
    before = _digests(exports)

    device.fill()
    with pytest.raises(NoSpaceError, match="no space left on the device") as caught:
        export_plan_and_dose(case, case.plan.with_beams(case.plan.beams[:3]), case.dose,
                             exports)
    assert str(exports) in str(caught.value) and caught.value.path.parent == exports
    assert _digests(exports) == before, "the earlier export must be intact"
    assert [p.name for p in exports.iterdir()] == [first.folder.name]   # no half export


def test_a_checkpoint_onto_a_full_disk_stops_the_run_clearly_and_resume_continues(
        openkbp_dir, device, tmp_path, capsys, torch_one_thread):
    data = tmp_path / "data"
    for split, count in (("train", 2), ("validation", 1)):
        (data / split).mkdir(parents=True)
        for src in sorted((openkbp_dir / split).glob("pt_*.npz"))[:count]:
            (data / split / src.name).symlink_to(src)
    run = device.path / "run"
    args = ["train", "vae", "--config", "test-tiny", "--data", str(data), "--out", str(run),
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "run.eval_every=1000",
            "--set", "run.checkpoint_every=2"]
    assert main(args + ["--set", "run.max_steps=2"]) == 0
    before = _digests(run / "checkpoints") | {"vae": _digests(run)["vae.safetensors"]}
    capsys.readouterr()

    device.fill(leave_bytes=1 << 20)  # room for the event log, not for a checkpoint
    assert main(args + ["--set", "run.max_steps=4", "--resume"]) == 2
    err = capsys.readouterr().err
    path = checkpointing.checkpoint_dir(run) / "step_00000004.safetensors"
    assert f"dosepilot train: error: cannot write {path}: no space left on the device" in err
    assert "--resume" in err and "Traceback" not in err
    assert _digests(run / "checkpoints") | {"vae": _digests(run)["vae.safetensors"]} == before
    assert _temporaries(run) == []
    assert checkpointing.find_latest(run).step == 2
    last = read_events(run)[-1]
    assert last["type"] == "error" and "no space left" in last["message"]

    device.empty()
    assert main(args + ["--set", "run.max_steps=4", "--resume"]) == 0
    assert checkpointing.find_latest(run).step == 4
    assert [e["step"] for e in read_events(run) if e["type"] == "start"] == [0, 2, 2]


def test_an_event_log_on_a_full_disk_names_it(device):
    from trainer.events import EventLog

    device.fill()
    log = EventLog(device.path / "run", tensorboard=False)
    with pytest.raises(NoSpaceError, match="events.jsonl: no space left on the device"):
        log.emit("start", 0, config={"filler": "x" * 10_000})
    log.close()
