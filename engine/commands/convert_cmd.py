"""``dosepilot convert SRC OUT_DIR --to dicom``: a dataset case as a coherent DICOM patient.

SRC is an OpenKBP case (a shared ``pt_N.npz`` or an original CSV patient folder) or a GDP-HMM
case file (``PID+PlanID+MOS_n.npz``, with ``--meta`` pointing at the folder of
``PTV_DICT.json`` / ``Pat_Obj_DICT.json`` when they are not next to it). OUT_DIR receives a CT
series, RTSTRUCT, RTPLAN and (when the case has one) RTDOSE sharing one study and frame of
reference; it must not exist yet or be empty, so nothing of the user's is overwritten.
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

from engine.case import Case
from engine.errors import UserError
from engine.io.dicom_export import write_case_dicom
from engine.io.gdp_hmm import GdpHmmFormatError, load_gdp_hmm_npz
from engine.io.openkbp import OpenKBPFormatError, load_openkbp_csv, load_openkbp_npz
from engine.io.safe_unpickle import UnsafePickleError


def load_dataset_case(src: Path, meta: Path | None = None) -> Case:
    """Read an OpenKBP or GDP-HMM case, telling the format from the file's contents."""
    if src.is_dir():
        return load_openkbp_csv(src)
    if not src.is_file():
        raise UserError(f"{src}: no such file or folder")
    try:
        with zipfile.ZipFile(src) as z:
            members = set(z.namelist())
    except zipfile.BadZipFile:
        raise UserError(f"{src}: not an .npz file or an OpenKBP CSV folder") from None
    if "roi_bits.npy" in members:
        return load_openkbp_npz(src)
    if "arr_0.npy" in members:
        return load_gdp_hmm_npz(src, meta)
    raise UserError(f"{src}: neither an OpenKBP case (roi_bits) nor a GDP-HMM case (arr_0); "
                    f"it holds {', '.join(sorted(members)) or 'nothing'}")


def run(args: argparse.Namespace) -> int:
    src, out = Path(args.src), Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; choose a new output folder")
    try:
        case = load_dataset_case(src, Path(args.meta) if args.meta else None)
    except (OpenKBPFormatError, GdpHmmFormatError, UnsafePickleError) as exc:
        raise UserError(str(exc)) from None
    written = write_case_dicom(case, out)
    print(f"{case.name}: wrote {len(written.ct_paths)} CT slices, "
          f"{len(case.structures)} structures, {len(case.plan.beams) if case.plan else 0} "
          f"beams{', dose' if written.rtdose_path else ''} to {out}")
    for w in case.warnings:
        print(f"warning: {w}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert", help="write an OpenKBP or GDP-HMM case as a DICOM patient",
        description="Write a dataset case (OpenKBP npz or CSV folder, GDP-HMM npz) as a DICOM "
                    "patient: CT, RTSTRUCT, RTPLAN and RTDOSE.")
    p.add_argument("src", help="OpenKBP pt_N.npz or CSV patient folder, or a GDP-HMM .npz")
    p.add_argument("out_dir", help="new (or empty) output folder")
    p.add_argument("--to", choices=["dicom"], default="dicom", help="output format")
    p.add_argument("--meta", help="GDP-HMM meta-file folder (PTV_DICT.json, Pat_Obj_DICT.json)")
    p.set_defaults(func=run)
