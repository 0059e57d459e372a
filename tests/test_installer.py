"""The installer: ``dosepilot self-test``, the bundle's entry point, the desktop entry and icon,
and (slow, ``-m slow``) a real PyInstaller build whose bundle must pass ``--self-test``."""

from __future__ import annotations

import configparser
import dataclasses
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from engine.case import Volume
from engine.cli import main
from engine.resources import resources_dir

ROOT = Path(__file__).resolve().parents[1]
INSTALLER = ROOT / "installer"
DESKTOP_KEYS = ("Type", "Name", "Exec", "Icon", "Categories")


def _load_entry():
    spec = importlib.util.spec_from_file_location("dosepilot_bundle_entry", INSTALLER / "entry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- dosepilot self-test -----------------------------------------------------------------------

def test_self_test_previews_the_demo_patient(tiny_dose_bundle, capsys):
    code = main(["self-test", "--model", str(tiny_dose_bundle), "--threads", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.rstrip().endswith("self-test OK")
    assert str(resources_dir() / "demo") in out
    for stage in ("open patient", "load model", "preview", "encode", "dit", "decode", "dvh"):
        assert stage in out
    assert "11 DVHs" in out  # the demo patient's 11 structures


def test_self_test_without_model_says_so(tmp_path, capsys):
    code = main(["self-test", "--model", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"no model at {tmp_path / 'nope'}: give a model bundle folder" in err


def test_self_test_without_shipped_model_says_so(tmp_path, capsys, monkeypatch):
    shutil.copytree(ROOT / "resources" / "demo", tmp_path / "demo")
    monkeypatch.setenv("DOSEPILOT_RESOURCES", str(tmp_path))
    code = main(["self-test"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"no model at {tmp_path / 'models' / 'default'}" in err
    assert "ships no trained model; pass --model CKPT" in err


def test_self_test_without_demo_says_so(tiny_dose_bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DOSEPILOT_RESOURCES", str(tmp_path))
    code = main(["self-test", "--model", str(tiny_dose_bundle)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"patient folder {tmp_path / 'demo'} does not exist" in err


def test_self_test_with_broken_model_says_so(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "bundle.json").write_text("{not json")
    code = main(["self-test", "--model", str(bad)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"cannot load the model {bad}" in err


def test_self_test_with_unreadable_patient_says_so(tiny_dose_bundle, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not DICOM")
    code = main(["self-test", "--model", str(tiny_dose_bundle), "--case", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"cannot open the patient in {tmp_path}" in err


@pytest.fixture(scope="module")
def demo_preview(tiny_dose_bundle):
    from engine.io.dicom import load_dicom_case
    from engine.runtime import DoseEngine

    case = load_dicom_case(ROOT / "resources" / "demo")
    return case, DoseEngine.from_checkpoint(tiny_dose_bundle, threads=2).preview(case)


def test_check_result_accepts_a_real_preview_and_names_each_fault(demo_preview):
    from engine.commands.selftest_cmd import check_result

    case, result = demo_preview
    assert check_result(result, case) == []
    dose = result.dose.array
    nan = dose.copy()
    nan[0, 0, 0] = np.nan
    negative = dose.copy()
    negative[0, 0, 0] = -1.0
    small = Volume(dose[:-1], dataclasses.replace(result.dose.geometry,
                                                  shape=(dose.shape[0] - 1, *dose.shape[1:])))
    first = case.structures[0].name
    faults = {
        "non-finite": dataclasses.replace(result, dose=Volume(nan, result.dose.geometry)),
        "negative voxels (min -1 Gy)": dataclasses.replace(
            result, dose=Volume(negative, result.dose.geometry)),
        "is not the CT grid": dataclasses.replace(result, dose=small),
        f"no DVH for {first}": dataclasses.replace(
            result, dvhs={k: v for k, v in result.dvhs.items() if k != first}),
    }
    for message, bad in faults.items():
        problems = check_result(bad, case)
        assert len(problems) == 1 and message in problems[0], (message, problems)


# --- the bundle's entry point ------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "expected"), [
    ([], ["demo"]),
    (["--self-test"], ["self-test"]),
    (["--self-test", "--model", "m"], ["self-test", "--model", "m"]),
    (["-m", "engine.cli", "train", "vae", "--data", "d"], ["train", "vae", "--data", "d"]),
    (["gui", "/data/pt1"], ["gui", "/data/pt1"]),
    (["inspect", "-m"], ["inspect", "-m"]),
])
def test_entry_maps_bundle_arguments(argv, expected):
    assert _load_entry().bundle_argv(argv) == expected


def test_entry_self_test_runs_in_a_fresh_process(tiny_dose_bundle):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run([sys.executable, str(INSTALLER / "entry.py"), "--self-test",
                           "--model", str(tiny_dose_bundle), "--threads", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "GUI modules: PySide6.QtWidgets" in proc.stdout
    assert proc.stdout.rstrip().endswith("self-test OK")


def test_entry_reports_a_missing_gui_module(monkeypatch, capsys):
    entry = _load_entry()
    monkeypatch.setattr(entry, "GUI_MODULES", ("json", "dosepilot_no_such_module"))
    with pytest.raises(SystemExit) as exc:
        entry.check_gui_modules()
    assert exc.value.code == 1
    assert "cannot import dosepilot_no_such_module" in capsys.readouterr().err


def test_entry_says_the_trainer_is_not_bundled(monkeypatch, capsys):
    entry = _load_entry()
    monkeypatch.setattr(entry, "TRAINER_MODULE", "dosepilot_no_such_trainer")
    monkeypatch.setattr(sys, "argv", ["DosePilot", "-m", "engine.cli", "train", "vae"])
    assert entry.main() == 2
    assert "does not include the trainer" in capsys.readouterr().err


# --- desktop entry and icon --------------------------------------------------------------------

def _desktop_entry() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # keys are case-sensitive
    parser.read(INSTALLER / "dosepilot.desktop", encoding="utf-8")
    return parser["Desktop Entry"]


def test_desktop_entry_validates():
    validator = shutil.which("desktop-file-validate")
    if validator:
        proc = subprocess.run([validator, str(INSTALLER / "dosepilot.desktop")],
                              capture_output=True, text=True)
        assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
    entry = _desktop_entry()
    missing = [k for k in DESKTOP_KEYS if not entry.get(k)]
    assert not missing, f"desktop entry lacks {missing}"
    assert entry["Type"] == "Application"
    assert entry["Categories"].endswith(";")
    # the entry starts the bundle's executable (named in the spec) and names the shipped icon
    assert Path(entry["Exec"].split()[0]).name == "DosePilot"
    assert 'name="DosePilot"' in (INSTALLER / "dosepilot.spec").read_text()
    assert (INSTALLER / "icons" / f"{entry['Icon']}.svg").is_file()
    assert (INSTALLER / "icons" / f"{entry['Icon']}.png").is_file()


def test_icons_are_a_valid_svg_and_a_256_px_png():
    root = ET.parse(INSTALLER / "icons" / "dosepilot.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert root.get("viewBox") == "0 0 256 256"
    data = (INSTALLER / "icons" / "dosepilot.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (256, 256)


# --- the real bundle (slow: several minutes) ---------------------------------------------------

@pytest.mark.slow
def test_bundle_builds_and_passes_self_test(tiny_dose_bundle, tmp_path):
    pytest.importorskip("PyInstaller", reason="pip install -e '.[installer]'")
    env = {**os.environ, "PYTHON": sys.executable, "DIST": str(tmp_path / "dist"),
           "WORK": str(tmp_path / "work")}
    build = subprocess.run(["bash", str(INSTALLER / "build.sh")], capture_output=True, text=True,
                           env=env, timeout=1800)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    assert "MB on disk" in build.stdout
    app = tmp_path / "dist" / "DosePilot" / "DosePilot"
    assert app.is_file()
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DOSEPILOT_RESOURCES")}
    clean["QT_QPA_PLATFORM"] = "offscreen"
    proc = subprocess.run([str(app), "--self-test", "--model", str(tiny_dose_bundle)],
                          capture_output=True, text=True, env=clean, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "GUI modules:" in proc.stdout and proc.stdout.rstrip().endswith("self-test OK")
    # the physics worker is a script file next to where the frozen dose_calc looks for it
    worker = tmp_path / "dist" / "DosePilot" / "_internal" / "engine" / "physics" / "worker.py"
    assert worker.read_bytes() == (ROOT / "engine" / "physics" / "worker.py").read_bytes()
    # the demo patient comes from inside the bundle, not from the repository
    assert str(tmp_path / "dist" / "DosePilot") in proc.stdout
    missing = subprocess.run([str(app), "--self-test"], capture_output=True, text=True,
                             env=clean, timeout=600, cwd=tmp_path)
    if not (ROOT / "resources" / "models" / "default").exists():
        assert missing.returncode == 2 and "no model at" in missing.stderr
    train = subprocess.run([str(app), "-m", "engine.cli", "train", "vae", "--data", "d"],
                           capture_output=True, text=True, env=clean, timeout=600, cwd=tmp_path)
    assert train.returncode == 2 and "does not include the trainer" in train.stderr
    if shutil.which("xvfb-run"):  # the window itself, on the demo patient, with a prediction
        png = tmp_path / "demo.png"
        clean["QT_QPA_PLATFORM"] = "xcb"
        shot = subprocess.run(["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24", str(app), "demo",
                               "--checkpoint", str(tiny_dose_bundle), "--screenshot", str(png)],
                              capture_output=True, text=True, env=clean, timeout=600)
        assert shot.returncode == 0, shot.stdout + shot.stderr
        assert png.stat().st_size > 10_000
