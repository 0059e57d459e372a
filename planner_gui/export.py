"""Exporting the edited plan (RTPLAN) and the predicted dose (RTDOSE) as DICOM.

Every export goes into a new sub-folder of the folder the user chose, so no existing file is
ever overwritten; the sub-folder appears only once complete, so an export that fails (the disk
is full) or is killed leaves none. A case that came from DICOM gets an RTPLAN and an RTDOSE
that refer to its study, frame of reference and source plan; a case that did not (a dataset
case) is written whole (CT, RTSTRUCT, RTPLAN, RTDOSE) so that the folder opens on its own.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

from engine.case import Case, Plan, Volume
from engine.durable import remove_stale_temporaries, replacing
from engine.io.dicom_export import write_case_dicom, write_rtdose, write_rtplan
from engine.io.dicom_modules import ensure_refs


@dataclass(frozen=True)
class ExportedFiles:
    folder: Path
    rtplan: Path
    rtdose: Path | None
    whole_case: bool


def _export_folder(parent: Path, case_name: str) -> Path:
    """A new, unused folder name under ``parent`` (created by the export when complete)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", case_name).strip("_") or "case"
    base = parent / f"{stem}_{dt.datetime.now():%Y%m%d-%H%M%S}"
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}_{n}")
    return folder


def export_plan_and_dose(case: Case, plan: Plan, dose: Volume | None,
                         parent: str | Path) -> ExportedFiles:
    """Write ``plan`` (and ``dose`` in Gy on the CT grid) for ``case`` into a new folder
    under ``parent``; returns what was written.

    The folder is written under a temporary name and renamed when complete
    (:func:`engine.durable.replacing`): a failed or killed export leaves no export folder.
    """
    parent = Path(parent)
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(f"{parent} is not a folder")
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(parent)  # what exports killed before they finished left
    folder = _export_folder(parent, case.name)
    with replacing(folder) as tmp:
        tmp.mkdir()
        written = _write(case, plan, dose, tmp)
    return ExportedFiles(folder, folder / written.rtplan.name,
                         folder / written.rtdose.name if written.rtdose else None,
                         written.whole_case)


def _write(case: Case, plan: Plan, dose: Volume | None, folder: Path) -> ExportedFiles:
    if not case.refs.study_instance_uid:
        written = write_case_dicom(case.with_plan(plan).with_dose(dose), folder,
                                   plan.patient_position.value)
        return ExportedFiles(folder, written.rtplan_path, written.rtdose_path, True)
    case = ensure_refs(case)
    rtplan = folder / "RTPLAN_dosepilot.dcm"
    uid = write_rtplan(case, plan, rtplan)
    rtdose = None
    if dose is not None:
        rtdose = folder / "RTDOSE_dosepilot.dcm"
        write_rtdose(dose, case, rtdose, plan_sop_instance_uid=uid,
                     description="DosePilot predicted dose")
    return ExportedFiles(folder, rtplan, rtdose, False)
