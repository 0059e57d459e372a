"""Open a patient from a folder of DICOM files: CT + RTSTRUCT + RTPLAN + RTDOSE -> Case.

``load_dicom_case(path)`` scans the folder recursively (any file names), groups the objects by
study, series and frame of reference, and picks the CT series the structure set refers to, the
plan that refers to that structure set and the dose that refers to that plan. Anything it has to
skip, guess or choose between lands in ``Case.warnings``; input it cannot use raises
:class:`DicomImportError` with a message naming the file and the problem. Files are only read.

The CT images the structure set, plan and dose refer to are compared with those in the folder
(:mod:`engine.io.dicom_refs`). When some are missing (an interrupted transfer) or all belong to
another CT, ONE warning says so, with where the CT lies against the contours, which structures
have no contour on it and how much of the dose lies outside it; the per-ROI "outside the CT"
notes it explains are left out. Such study-level warnings come first and are also in
``Case.study_warnings``. ROIs without a mask on the CT are listed in
``Case.structures_not_on_ct``; the RTDOSE on its own grid is kept in ``Case.dose_grid``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.case import (
    Case,
    DicomRefs,
    Geometry,
    Plan,
    Role,
    Structure,
    StructureNotOnCt,
    Volume,
)
from engine.geometry import readonly
from engine.io.dicom_ct import CtSeries, read_ct_series
from engine.io.dicom_errors import DicomImportError
from engine.io.dicom_refs import (
    SeriesCheck,
    check_series,
    referenced_ct_images,
    rtstruct_images,
)
from engine.io.dicom_rtdose import DoseBeyondCt, dose_beyond_ct, dose_on_ct, read_rtdose
from engine.io.dicom_rtplan import PlanInfo, read_rtplan
from engine.io.dicom_rtstruct import Rasterized, RoiContours, rasterize, read_rois
from engine.io.dicom_scan import DicomObject, quiet_pydicom, scan_folder
from engine.structure_names import prescription_from_name, role_from_observation

__all__ = ["DicomImportError", "load_dicom_case"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _kind(obj: DicomObject) -> str:
    """How the import treats an object: 'CT' (a slice of a CT series), 'RTSTRUCT', 'RTPLAN',
    'RTDOSE', or a label for what it ignores."""
    sop_class = str(obj.ds.get("SOPClassUID", ""))
    if sop_class == CT_IMAGE_STORAGE or (obj.modality == "CT" and not sop_class):
        image_type = [str(v).upper() for v in (obj.ds.get("ImageType") or [])]
        return "CT localizer" if "LOCALIZER" in image_type else "CT"
    if obj.modality == "CT":
        return "CT of another kind (e.g. enhanced multi-frame)"
    return obj.modality or "unknown"


def _date_key(obj: DicomObject, prefix: str) -> str:
    ds = obj.ds
    return f"{ds.get(prefix + 'Date', '') or ''}{ds.get(prefix + 'Time', '') or ''}"


def _rtstruct_refs(obj: DicomObject) -> tuple[set[str], str]:
    """CT series UIDs and the frame of reference an RTSTRUCT refers to."""
    series: set[str] = set()
    for_uid = ""
    for fr in obj.ds.get("ReferencedFrameOfReferenceSequence", []):
        for_uid = for_uid or str(fr.get("FrameOfReferenceUID", "") or "")
        for st in fr.get("RTReferencedStudySequence", []):
            for se in st.get("RTReferencedSeriesSequence", []):
                series.add(str(se.get("SeriesInstanceUID", "")))
    if not for_uid:
        for roi in obj.ds.get("StructureSetROISequence", []):
            for_uid = str(roi.get("ReferencedFrameOfReferenceUID", "") or "")
            if for_uid:
                break
    return series, for_uid


def _describe_series(uid: str, objs: list[DicomObject]) -> str:
    desc = str(objs[0].ds.get("SeriesDescription", "") or "").strip()
    return f"{uid} ({len(objs)} slices{', ' + repr(desc) if desc else ''})"


def _newest(objs: list[DicomObject], prefix: str, what: str, warnings: list[str]) -> DicomObject:
    chosen = max(objs, key=lambda o: (_date_key(o, prefix), str(o.path)))
    if len(objs) > 1:
        others = ", ".join(o.path.name for o in objs if o is not chosen)
        warnings.append(f"{len(objs)} {what} objects fit the CT; using the newest "
                        f"({chosen.path.name}), ignoring {others}")
    return chosen


def _choose_ct(cts: dict[str, list[DicomObject]], rtstructs: list[DicomObject],
               warnings: list[str]) -> tuple[str, DicomObject | None]:
    """The CT series to open and the RTSTRUCT that goes with it (if any)."""
    linked = [(s, ref) for s in rtstructs for ref in _rtstruct_refs(s)[0] if ref in cts]
    if linked:
        series = {ref for _, ref in linked}
        if len(series) > 1:
            raise DicomImportError(
                "the folder holds structure sets for several CT series: "
                + "; ".join(_describe_series(u, cts[u]) for u in sorted(series))
                + ". Open a folder with one patient plan at a time.")
        uid = series.pop()
        ss = _newest([s for s, _ in linked], "StructureSet", "RTSTRUCT", warnings)
    else:
        by_for = [(s, u) for s in rtstructs for u, objs in cts.items()
                  if _rtstruct_refs(s)[1] and _rtstruct_refs(s)[1]
                  == objs[0].frame_of_reference_uid]
        if len({u for _, u in by_for}) == 1:
            uid = by_for[0][1]
            ss = _newest([s for s, _ in by_for], "StructureSet", "RTSTRUCT", warnings)
        elif len(cts) == 1:
            uid = next(iter(cts))
            ss = _newest(rtstructs, "StructureSet", "RTSTRUCT", warnings) if rtstructs else None
        else:
            raise DicomImportError(
                f"the folder holds {len(cts)} CT series and no structure set that says which "
                "one is the planning CT: "
                + "; ".join(_describe_series(u, o) for u, o in sorted(cts.items()))
                + ". Put one CT series (with its RTSTRUCT) in the folder.")
    for other, objs in sorted(cts.items()):
        if other != uid:
            warnings.append(f"ignored CT series {_describe_series(other, objs)}: the structure "
                            "set refers to another series")
    return uid, ss


# why a ROI has no mask, for the listing (StructureNotOnCt.reason)
OUTSIDE_CT = "its contours lie outside the CT"
# the share of the dose integral outside the CT above which the import warns
DOSE_OUTSIDE_WARN = 0.01


@dataclass(frozen=True)
class _Placement:
    """The structure set's ROIs on the CT.

    ``cut`` names the ROIs with a mask that lost contours beyond the CT while the CT is known
    to lack referenced images (their per-ROI notes are folded into the series warning);
    ``contour_z_mm`` is the extent of all contours along z (LPS mm), None without contours.
    """

    structures: tuple[Structure, ...]
    not_on_ct: tuple[StructureNotOnCt, ...]
    cut: tuple[str, ...]
    contour_z_mm: tuple[float, float] | None


def _not_on_ct(roi: RoiContours, reason: str) -> StructureNotOnCt:
    role, _ = role_from_observation(roi.interpreted_type, roi.name)
    return StructureNotOnCt(roi.name, role, roi.number, reason, roi.color)


def _empty_reason(r: Rasterized) -> str:
    if r.kept:
        return "it covers no CT voxel centre"
    if r.outside and not r.off_plane:
        return OUTSIDE_CT
    if r.off_plane and not r.outside:
        return "its contours do not lie in CT slice planes"
    return "its contours lie outside the CT or off its slice planes"


def _structures(ss: DicomObject, ct: CtSeries, for_uid: str, plan: PlanInfo | None,
                warnings: list[str], fold_outside: bool) -> _Placement:
    """Rasterise the structure set's ROIs on the CT. With ``fold_outside`` (the CT lacks
    images the objects refer to) contours beyond the CT get no per-ROI warning: the series
    warning accounts for them."""
    rois: list[RoiContours] = read_rois(ss.ds)
    g = ct.volume.geometry
    built: list[Structure] = []
    absent: list[StructureNotOnCt] = []
    cut: list[str] = []
    z_lo, z_hi = np.inf, -np.inf
    for roi in rois:
        label = f"ROI {roi.name!r}"
        warnings.extend(f"{label}: {n}" for n in roi.notes)
        if roi.frame_of_reference_uid and for_uid and roi.frame_of_reference_uid != for_uid:
            warnings.append(f"{label} is in another frame of reference "
                            f"({roi.frame_of_reference_uid}) than the CT; skipped")
            absent.append(_not_on_ct(roi, "it is in another frame of reference than the CT"))
            continue
        if not roi.contours:
            warnings.append(f"{label} has no contours; skipped")
            absent.append(_not_on_ct(roi, "it has no contours"))
            continue
        for c in roi.contours:
            z_lo, z_hi = min(z_lo, float(c[:, 2].min())), max(z_hi, float(c[:, 2].max()))
        r = rasterize(roi.contours, g)
        if r.outside and not fold_outside:
            warnings.append(f"{label}: {r.outside} contour(s) lie outside the CT; skipped")
        if r.off_plane:
            warnings.append(f"{label}: {r.off_plane} contour(s) do not lie in a CT slice "
                            "plane; skipped")
        if r.clipped:
            warnings.append(f"{label} extends beyond the CT image; cut at its edge")
        if not r.mask.any():
            reason = _empty_reason(r)
            if not (fold_outside and reason == OUTSIDE_CT):
                warnings.append(f"{label} covers no CT voxel centre; skipped")
            absent.append(_not_on_ct(roi, reason))
            continue
        if r.outside and fold_outside:
            cut.append(roi.name)
        role, from_name = role_from_observation(roi.interpreted_type, roi.name)
        if from_name and roi.interpreted_type:
            warnings.append(f"{label}: type {roi.interpreted_type} but the name says "
                            f"{role.value}; using {role.value}")
        rx = None
        if role is Role.TARGET:
            rx = (plan.roi_prescriptions_gy.get(roi.number) if plan else None) \
                or prescription_from_name(roi.name)
        built.append(Structure(name=roi.name, role=role, mask=r.mask, prescription_gy=rx,
                               color=roi.color, number=roi.number,
                               contours=tuple(roi.contours[i] for i in r.kept)))
    targets = [s for s in built if s.role is Role.TARGET]
    if plan and plan.plan.prescription_gy and len(targets) == 1 and targets[0].prescription_gy \
            is None:
        t = targets[0]
        built[built.index(t)] = Structure(t.name, t.role, t.mask, plan.plan.prescription_gy,
                                          t.color, t.number, t.contours)
    counts: dict[str, int] = defaultdict(int)
    unique: list[Structure] = []
    for s in built:
        key = s.name.lower()
        counts[key] += 1
        if counts[key] > 1:
            new = f"{s.name} ({counts[key]})"
            warnings.append(f"two ROIs are named {s.name!r}; ROI number {s.number} is loaded "
                            f"as {new!r}")
            s = Structure(new, s.role, s.mask, s.prescription_gy, s.color, s.number, s.contours)
        unique.append(s)
    return _Placement(tuple(unique), tuple(absent), tuple(cut),
                      (z_lo, z_hi) if z_lo <= z_hi else None)


def _choose_plan(plans: list[DicomObject], ss: DicomObject | None, for_uid: str,
                 warnings: list[str]) -> DicomObject | None:
    if not plans:
        return None
    ss_uid = ss.sop_instance_uid if ss else ""

    def refers(o: DicomObject) -> bool:
        return any(str(r.get("ReferencedSOPInstanceUID", "")) == ss_uid
                   for r in o.ds.get("ReferencedStructureSetSequence", []))

    fitting = [o for o in plans if ss_uid and refers(o)] or \
              [o for o in plans if o.frame_of_reference_uid in ("", for_uid)]
    for o in plans:
        if o.frame_of_reference_uid and o.frame_of_reference_uid != for_uid:
            warnings.append(f"RTPLAN {o.path.name} is in another frame of reference than the "
                            "CT; ignored")
    if not fitting:
        return None
    return _newest(fitting, "RTPlan", "RTPLAN", warnings)


def _choose_doses(doses: list[DicomObject], plan_uid: str, for_uid: str,
                  warnings: list[str]) -> list[DicomObject]:
    """The plan's dose: its PLAN-summed RTDOSE, else all its per-beam RTDOSEs (to be summed),
    else the best other candidate."""
    fitting = []
    for o in doses:
        if o.frame_of_reference_uid and o.frame_of_reference_uid != for_uid:
            warnings.append(f"RTDOSE {o.path.name} is in another frame of reference than the "
                            "CT; ignored")
        else:
            fitting.append(o)
    if not fitting:
        return []

    def of_plan(o: DicomObject) -> bool:
        return bool(plan_uid) and plan_uid in {str(r.get("ReferencedSOPInstanceUID", ""))
                                               for r in o.ds.get("ReferencedRTPlanSequence", [])}

    def summation(o: DicomObject) -> str:
        return str(o.ds.get("DoseSummationType", "")).upper()

    beams = [o for o in fitting if of_plan(o) and summation(o) == "BEAM"]
    if len(beams) > 1 and not any(of_plan(o) and summation(o) == "PLAN" for o in fitting):
        warnings.append(f"no plan-summed RTDOSE; summed the plan's {len(beams)} per-beam "
                        f"doses ({', '.join(o.path.name for o in beams)})")
        return beams
    best = max((of_plan(o), summation(o) == "PLAN") for o in fitting)
    return [_newest([o for o in fitting if (of_plan(o), summation(o) == "PLAN") == best],
                    "Content", "RTDOSE", warnings)]


def _read_doses(objs: list[DicomObject], ct: Geometry, body: np.ndarray | None,
                warnings: list[str]) -> tuple[Volume | None, Volume | None]:
    """The sum of the given RTDOSEs on the CT grid and on their own grid (None when there are
    none or one fails; the own-grid sum is None when per-beam doses lie on different grids)."""
    total: np.ndarray | None = None
    own: Volume | None = None
    for n, obj in enumerate(objs):
        where = f"RTDOSE {obj.path.name}"
        try:
            grid = read_rtdose(obj.ds, where)
        except DicomImportError as exc:
            warnings.append(f"{exc}; no dose loaded")
            return None, None
        warnings.extend(grid.notes)
        on_ct, notes = dose_on_ct(grid.volume, ct, body, where)
        warnings.extend(notes)
        total = on_ct.array.copy() if total is None else total + on_ct.array
        if n == 0:
            own = grid.volume
        elif own is not None and own.geometry == grid.volume.geometry:
            own = Volume(readonly(own.array + grid.volume.array), own.geometry)
        else:
            own = None
    return (Volume(readonly(total), ct) if total is not None else None), own


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _series_warning(check: SeriesCheck, ct_uid: str, ct: Geometry, placed: _Placement | None,
                    dose: tuple[DoseBeyondCt, float] | None) -> str:
    """One warning for a CT that lacks images the study's objects refer to: what is missing,
    where the CT lies against the contours, which structures it leaves out or cuts, and where
    the dose is. ``dose`` is the dose's extent against the CT and its maximum on the CT grid."""
    z = ct.axis_coordinates()[0]
    parts = [f"{check.headline(ct_uid)}.",
             f"The CT in the folder covers z {z.min():.1f} to {z.max():.1f} mm "
             f"({len(z)} slice{'s' if len(z) > 1 else ''})"]
    if placed is not None and placed.contour_z_mm is not None:
        lo, hi = placed.contour_z_mm
        parts[-1] += f"; the structure set's contours reach z {lo:.1f} to {hi:.1f} mm"
    parts[-1] += "."
    if placed is not None:
        if check.other_ct:
            parts.append("Its contours were placed on this CT by their coordinates (the same "
                         "frame of reference).")
        outside = [s.name for s in placed.not_on_ct if s.reason == OUTSIDE_CT]
        total = len(placed.structures) + len(placed.not_on_ct)
        if outside:
            parts.append(f"{len(outside)} of {total} structures have no contour on it: listed, "
                         f"not loaded ({_names(outside)}).")
        if placed.cut:
            parts.append(f"{len(placed.cut)} are cut to the slices present "
                         f"({_names(list(placed.cut))}).")
    if dose is not None and dose[0].fraction_outside > DOSE_OUTSIDE_WARN:
        beyond, on_ct_max = dose
        parts.append(f"Dose: max {beyond.max_gy:.2f} Gy on its own grid, {on_ct_max:.3g} Gy on "
                     f"this CT; {100 * beyond.fraction_outside:.1f}% of it lies outside the CT.")
    return " ".join(parts)


def _dose_beyond_warning(doses: list[DicomObject], beyond: DoseBeyondCt, on_ct_max: float) -> str:
    files = ", ".join(o.path.name for o in doses)
    return (f"RTDOSE {files}: the dose grid reaches beyond the CT and "
            f"{100 * beyond.fraction_outside:.1f}% of the dose lies outside it (up to "
            f"{beyond.max_outside_gy:.2f} Gy there, {on_ct_max:.2f} Gy at most on the CT); "
            "DVHs and metrics see only the part on the CT")


def load_dicom_case(path: str | Path, name: str | None = None) -> Case:
    """Open the patient in folder ``path`` (CT with its RTSTRUCT, RTPLAN and RTDOSE if present).

    Raises:
        DicomImportError: the folder has no usable CT, or the CT cannot be used (gaps, oblique
            slices, missing pixel data...); the message says which file and what is wrong.
    """
    with quiet_pydicom():
        return _load(Path(path), name)


def _ct_references(ss: DicomObject | None, plan: DicomObject | None,
                   doses: list[DicomObject]) -> tuple[dict[str, set[str]], set[str]]:
    """The CT images each chosen object refers to (label -> image UIDs), and the CT series
    the structure set names."""
    referrers: dict[str, set[str]] = {}
    series: set[str] = set()
    if ss is not None:
        referrers["the structure set"], series = rtstruct_images(ss.ds)
    if plan is not None:
        referrers["the plan"] = referenced_ct_images(plan.ds)
    if doses:
        referrers["the dose"] = set().union(*(referenced_ct_images(o.ds) for o in doses))
    return referrers, series


def _load(root: Path, name: str | None) -> Case:
    warnings: list[str] = []
    study: list[str] = []  # about the study as a whole; listed first
    if not root.exists():
        raise DicomImportError(f"{root} does not exist")
    if root.is_file():
        warnings.append(f"{root} is a file; opened the folder {root.parent} that holds it")
        root = root.parent
    scan = scan_folder(root)
    warnings.extend(scan.notes)
    by_modality: dict[str, list[DicomObject]] = defaultdict(list)
    for obj in scan.objects:
        by_modality[_kind(obj)].append(obj)
    cts: dict[str, list[DicomObject]] = defaultdict(list)
    for obj in by_modality.pop("CT", []):
        cts[obj.series_uid].append(obj)
    rtstructs = by_modality.pop("RTSTRUCT", [])
    plans = by_modality.pop("RTPLAN", [])
    doses = by_modality.pop("RTDOSE", [])
    ignored = {m: len(v) for m, v in by_modality.items()}
    if ignored:
        warnings.append("ignored objects DosePilot does not use: "
                        + ", ".join(f"{n} {m}" for m, n in sorted(ignored.items())))
    if not cts:
        found = ", ".join(f"{len(v)} {k}" for k, v in (("RTSTRUCT", rtstructs),
                                                        ("RTPLAN", plans), ("RTDOSE", doses))
                          if v) or "no DICOM objects"
        extra = f"; {scan.non_dicom} non-DICOM file(s) skipped" if scan.non_dicom else ""
        unreadable = f"; {len(scan.notes)} unreadable file(s)" if scan.notes else ""
        raise DicomImportError(f"no CT images found in {root} (found {found}{extra}"
                               f"{unreadable})")
    if scan.non_dicom:
        warnings.append(f"skipped {scan.non_dicom} non-DICOM file(s)")
    ct_uid, ss = _choose_ct(cts, rtstructs, warnings)
    ct_objs = cts[ct_uid]
    for_uid = ct_objs[0].frame_of_reference_uid
    not_on_ct: tuple[StructureNotOnCt, ...] = ()
    if ss is not None:
        ss_for = _rtstruct_refs(ss)[1]
        if ss_for and for_uid and ss_for != for_uid:
            study.append(f"RTSTRUCT {ss.path.name} belongs to another frame of reference "
                         f"({ss_for}) than the CT ({for_uid}); its contours are in another "
                         "coordinate system and were not loaded")
            not_on_ct = tuple(_not_on_ct(roi, "the structure set is in another frame of "
                                         "reference than the CT") for roi in read_rois(ss.ds))
            ss = None
    plan_obj = _choose_plan(plans, ss, for_uid, warnings)
    dose_objs = _choose_doses(doses, plan_obj.sop_instance_uid if plan_obj else "", for_uid,
                              warnings)
    referrers, referenced_series = _ct_references(ss, plan_obj, dose_objs)
    check = check_series(referrers, referenced_series,
                         {o.sop_instance_uid for objs in cts.values() for o in objs}, ct_uid)
    try:
        ct = read_ct_series([(o.path, o.ds) for o in ct_objs], ct_uid)
    except DicomImportError as exc:
        head = f"{check.headline(ct_uid)}. " if check is not None else ""
        if not scan.notes and not head:
            raise
        tail = f" Unreadable files: {'; '.join(scan.notes)}" if scan.notes else ""
        raise DicomImportError(f"{head}{exc}{tail}") from exc
    warnings.extend(ct.notes)
    plan_info: PlanInfo | None = None
    if plan_obj is not None:
        try:
            plan_info = read_rtplan(plan_obj.ds, ct.patient_position)
            warnings.extend(f"RTPLAN: {n}" for n in plan_info.notes)
        except DicomImportError as exc:
            warnings.append(f"{plan_obj.path.name}: {exc}; no plan loaded")
            plan_obj = None
    placed = (_structures(ss, ct, for_uid, plan_info, warnings, fold_outside=check is not None)
              if ss is not None else None)
    structures = placed.structures if placed is not None else ()
    if placed is not None:
        not_on_ct = placed.not_on_ct
    plan: Plan | None = plan_info.plan if plan_info else None
    body = next((s.mask for s in structures if s.role is Role.EXTERNAL), None)
    g = ct.volume.geometry
    dose, dose_grid = _read_doses(dose_objs, g, body, warnings)
    beyond = (dose_beyond_ct(dose_grid, g), float(dose.array.max())) \
        if dose is not None and dose_grid is not None else None
    if check is not None:
        study.append(_series_warning(check, ct_uid, g, placed, beyond))
    elif beyond is not None and beyond[0].fraction_outside > DOSE_OUTSIDE_WARN:
        study.append(_dose_beyond_warning(dose_objs, *beyond))
    first = ct_objs[0].ds
    refs = DicomRefs(
        patient_id=str(first.get("PatientID", "") or ""),
        patient_name=str(first.get("PatientName", "") or ""),
        study_instance_uid=ct_objs[0].study_uid, frame_of_reference_uid=for_uid,
        ct_series_instance_uid=ct_uid, ct_sop_instance_uids=ct.sop_instance_uids,
        structure_set_sop_instance_uid=ss.sop_instance_uid if ss else "",
        plan_sop_instance_uid=plan_obj.sop_instance_uid if plan_obj else "",
        plan_path=str(plan_obj.path) if plan_obj else "")
    case_name = name or refs.patient_id or refs.patient_name or root.name
    if structures and not any(s.role is Role.EXTERNAL for s in structures):
        warnings.append("no body/external structure found")
    if not np.isfinite(ct.volume.array).all():
        raise DicomImportError(f"CT series {ct_uid} holds non-finite values")
    return Case(name=case_name, ct=ct.volume, structures=structures, plan=plan, dose=dose,
                refs=refs, warnings=tuple(study + warnings), structures_not_on_ct=not_on_ct,
                dose_grid=dose_grid, study_warnings=tuple(study))
