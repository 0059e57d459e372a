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

from engine.case import Case, DicomRefs, Plan, Role, Structure
from engine.io.dicom_ct import CtSeries, read_ct_series
from engine.io.dicom_errors import DicomImportError
from engine.io.dicom_rtdose import dose_on_ct, read_rtdose
from engine.io.dicom_rtplan import PlanInfo, read_rtplan
from engine.io.dicom_rtstruct import RoiContours, rasterize, read_rois
from engine.io.dicom_scan import DicomObject, quiet_pydicom, scan_folder
from engine.structure_names import prescription_from_name, role_from_observation

__all__ = ["DicomImportError", "load_dicom_case"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _is_ct_image(obj: DicomObject) -> bool:
    sop_class = str(obj.ds.get("SOPClassUID", ""))
    if sop_class != CT_IMAGE_STORAGE and obj.modality != "CT":
        return False
    image_type = [str(v).upper() for v in (obj.ds.get("ImageType") or [])]
    return "LOCALIZER" not in image_type


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
                               color=roi.color, number=roi.number, contours=roi.contours))
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


def _choose_dose(doses: list[DicomObject], plan_uid: str, for_uid: str,
                 warnings: list[str]) -> DicomObject | None:
    fitting = []
    for o in doses:
        if o.frame_of_reference_uid and o.frame_of_reference_uid != for_uid:
            warnings.append(f"RTDOSE {o.path.name} is in another frame of reference than the "
                            "CT; ignored")
        else:
            fitting.append(o)
    if not fitting:
        return None

    def rank(o: DicomObject) -> tuple[bool, bool]:
        refs = {str(r.get("ReferencedSOPInstanceUID", ""))
                for r in o.ds.get("ReferencedRTPlanSequence", [])}
        return (bool(plan_uid) and plan_uid in refs,
                str(o.ds.get("DoseSummationType", "")).upper() == "PLAN")

    best = max(rank(o) for o in fitting)
    return _newest([o for o in fitting if rank(o) == best], "Content", "RTDOSE", warnings)


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
        by_modality["CT" if _is_ct_image(obj) else obj.modality].append(obj)
    cts: dict[str, list[DicomObject]] = defaultdict(list)
    for obj in by_modality.pop("CT", []):
        cts[obj.series_uid].append(obj)
    rtstructs = by_modality.pop("RTSTRUCT", [])
    plans = by_modality.pop("RTPLAN", [])
    doses = by_modality.pop("RTDOSE", [])
    ignored = {m or "unknown": len(v) for m, v in by_modality.items()}
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
    ct = read_ct_series([(o.path, o.ds) for o in ct_objs], ct_uid)
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
    dose_obj = _choose_dose(doses, plan_obj.sop_instance_uid if plan_obj else "", for_uid,
                            warnings)
    dose = None
    if dose_obj is not None:
        where = f"RTDOSE {dose_obj.path.name}"
        try:
            grid = read_rtdose(dose_obj.ds, where)
        except DicomImportError as exc:
            warnings.append(f"{exc}; no dose loaded")
        else:
            warnings.extend(grid.notes)
            body = next((s.mask for s in structures if s.role is Role.EXTERNAL), None)
            dose, notes = dose_on_ct(grid.volume, ct.volume.geometry, body, where)
            warnings.extend(notes)
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
