"""Open a patient from a folder of DICOM files: CT + RTSTRUCT + RTPLAN + RTDOSE -> Case.

``load_dicom_case(path)`` scans the folder recursively (any file names), groups the objects by
study, series and frame of reference, and picks the CT series the structure set refers to, the
plan that refers to that structure set and the dose that refers to that plan. Anything it has to
skip, guess or choose between lands in ``Case.warnings``; input it cannot use raises
:class:`DicomImportError` with a message naming the file and the problem. Files are only read.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from engine.case import Case, DicomRefs, Geometry, Plan, Role, Structure, Volume
from engine.geometry import readonly
from engine.io.dicom_ct import CtSeries, read_ct_series
from engine.io.dicom_errors import DicomImportError
from engine.io.dicom_rtdose import dose_on_ct, read_rtdose
from engine.io.dicom_rtplan import PlanInfo, read_rtplan
from engine.io.dicom_rtstruct import RoiContours, rasterize, read_rois
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


def _structures(ss: DicomObject, ct: CtSeries, for_uid: str, plan: PlanInfo | None,
                warnings: list[str]) -> tuple[Structure, ...]:
    rois: list[RoiContours] = read_rois(ss.ds)
    g = ct.volume.geometry
    built: list[Structure] = []
    for roi in rois:
        label = f"ROI {roi.name!r}"
        warnings.extend(f"{label}: {n}" for n in roi.notes)
        if roi.frame_of_reference_uid and for_uid and roi.frame_of_reference_uid != for_uid:
            warnings.append(f"{label} is in another frame of reference "
                            f"({roi.frame_of_reference_uid}) than the CT; skipped")
            continue
        if not roi.contours:
            warnings.append(f"{label} has no contours; skipped")
            continue
        r = rasterize(roi.contours, g)
        if r.outside:
            warnings.append(f"{label}: {r.outside} contour(s) lie outside the CT; skipped")
        if r.off_plane:
            warnings.append(f"{label}: {r.off_plane} contour(s) do not lie in a CT slice "
                            "plane; skipped")
        if r.clipped:
            warnings.append(f"{label} extends beyond the CT image; cut at its edge")
        if not r.mask.any():
            warnings.append(f"{label} covers no CT voxel centre; skipped")
            continue
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
    return tuple(unique)


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
                warnings: list[str]) -> Volume | None:
    """The sum of the given RTDOSEs on the CT grid (None when there are none or one fails)."""
    total: np.ndarray | None = None
    for obj in objs:
        where = f"RTDOSE {obj.path.name}"
        try:
            grid = read_rtdose(obj.ds, where)
        except DicomImportError as exc:
            warnings.append(f"{exc}; no dose loaded")
            return None
        warnings.extend(grid.notes)
        on_ct, notes = dose_on_ct(grid.volume, ct, body, where)
        warnings.extend(notes)
        total = on_ct.array.copy() if total is None else total + on_ct.array
    return Volume(readonly(total), ct) if total is not None else None


def load_dicom_case(path: str | Path, name: str | None = None) -> Case:
    """Open the patient in folder ``path`` (CT with its RTSTRUCT, RTPLAN and RTDOSE if present).

    Raises:
        DicomImportError: the folder has no usable CT, or the CT cannot be used (gaps, oblique
            slices, missing pixel data...); the message says which file and what is wrong.
    """
    with quiet_pydicom():
        return _load(Path(path), name)


def _load(root: Path, name: str | None) -> Case:
    warnings: list[str] = []
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
    try:
        ct = read_ct_series([(o.path, o.ds) for o in ct_objs], ct_uid)
    except DicomImportError as exc:
        if not scan.notes:
            raise
        raise DicomImportError(f"{exc} Unreadable files: {'; '.join(scan.notes)}") from exc
    warnings.extend(ct.notes)
    for_uid = ct_objs[0].frame_of_reference_uid
    if ss is not None:
        ss_for = _rtstruct_refs(ss)[1]
        if ss_for and for_uid and ss_for != for_uid:
            warnings.append(f"RTSTRUCT {ss.path.name} belongs to another frame of reference "
                            f"({ss_for}) than the CT ({for_uid}); its contours are in another "
                            "coordinate system and were not loaded")
            ss = None
    plan_obj = _choose_plan(plans, ss, for_uid, warnings)
    plan_info: PlanInfo | None = None
    if plan_obj is not None:
        try:
            plan_info = read_rtplan(plan_obj.ds, ct.patient_position)
            warnings.extend(f"RTPLAN: {n}" for n in plan_info.notes)
        except DicomImportError as exc:
            warnings.append(f"{plan_obj.path.name}: {exc}; no plan loaded")
            plan_obj = None
    structures = _structures(ss, ct, for_uid, plan_info, warnings) if ss is not None else ()
    plan: Plan | None = plan_info.plan if plan_info else None
    dose_objs = _choose_doses(doses, plan_obj.sop_instance_uid if plan_obj else "", for_uid,
                              warnings)
    body = next((s.mask for s in structures if s.role is Role.EXTERNAL), None)
    dose = _read_doses(dose_objs, ct.volume.geometry, body, warnings)
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
                refs=refs, warnings=tuple(warnings))
