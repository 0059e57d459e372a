"""Write a case as DICOM: CT series, RTSTRUCT, RTPLAN and RTDOSE, all linked.

* :func:`write_rtdose`: a dose volume as RTDOSE on the case's study and frame of reference,
  referring to a plan (32-bit values, DoseGridScaling chosen so that the quantisation error is at
  most half of it).
* :func:`write_rtplan`: the plan with its (edited) gantry angles, as a copy of the source RTPLAN
  with new UIDs when the case came from one, else a minimal valid plan (10 x 10 cm jaw fields).
* :func:`write_case_dicom`: everything, into one folder (used by the phantom generator and the
  dataset converters). Contours come from ``Structure.contours``, or are traced from the masks.

Input files are never modified; every export gets new SOP instance UIDs.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from engine.case import Beam, Case, DicomRefs, PatientPosition, Plan, Role, Technique, Volume
from engine.durable import fsync_path, remove_stale_temporaries
from engine.geometry import flip_axes
from engine.io.dicom_modules import (
    CT_IMAGE_STORAGE,
    RT_DOSE_STORAGE,
    RT_PLAN_STORAGE,
    RT_STRUCTURE_SET_STORAGE,
    STUDY_COMPONENT_MANAGEMENT,
    add_common_modules,
    ds_list,
    ds_str,
    ensure_refs,
    new_dataset,
    referenced,
    save,
)
from engine.io.dicom_rtstruct import trace_contours

log = logging.getLogger(__name__)

# in-plane flips (array axes) that give each patient position's conventional image orientation
_POSITION_FLIPS = {"HFS": (), "HFP": (1, 2), "FFS": (2,), "FFP": (1,)}
_PALETTE = ((255, 0, 0), (0, 160, 255), (0, 200, 0), (255, 200, 0), (200, 0, 255),
            (255, 120, 0), (0, 220, 200), (160, 120, 60), (255, 0, 160), (120, 120, 255))
# the largest stored dose value (16-bit: dicom3tools' dciodvfy cannot parse 32-bit pixel data,
# and 65000 steps keep the quantisation error under 0.001 Gy for an 80 Gy maximum)
_STORED_MAX = 65000.0


def write_ct_series(ct: Volume, refs: DicomRefs, out_dir: str | Path,
                    patient_position: str = "HFS") -> list[Path]:
    """One CT Image file per slice (uint16 + RescaleIntercept -1024), in ``out_dir``.

    The volume's slice ``k`` gets ``refs.ct_sop_instance_uids[k]``. Images are written in the
    conventional orientation of ``patient_position`` (e.g. HFP: rows along -x, columns along -y),
    which moves no voxel in patient space.
    """
    out = Path(out_dir)
    flips = _POSITION_FLIPS.get(patient_position, ())
    vol = flip_axes(ct, flips)
    g = vol.geometry
    row_dir, col_dir = np.asarray(g.direction[2]), np.asarray(g.direction[1])
    hu = np.clip(np.rint(vol.array), -1024, 65535 - 1024)
    stored = (hu + 1024).astype("<u2")
    series_number = 1
    paths = []
    remove_stale_temporaries(out)
    for k in range(g.shape[0]):
        ds = new_dataset(CT_IMAGE_STORAGE, refs.ct_sop_instance_uids[k])
        add_common_modules(ds, refs, "CT", refs.ct_series_instance_uid, series_number,
                           "CT")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Laterality = ""
        ds.PatientPosition = patient_position
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.KVP = ""
        ipp = g.index_to_lps([k, 0, 0])
        ds.ImagePositionPatient = ds_list(ipp)
        ds.ImageOrientationPatient = ds_list(np.concatenate([row_dir, col_dir]))
        ds.PixelSpacing = ds_list([g.spacing[1], g.spacing[2]])
        ds.SliceThickness = ds_str(g.spacing[0])
        ds.SliceLocation = ds_str(float(ipp @ np.cross(row_dir, col_dir)))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = g.shape[1], g.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = stored[k].tobytes()
        paths.append(save(ds, out / f"CT_{k + 1:04d}.dcm", batch=True))
    if paths:
        fsync_path(out)
    return paths


def _interpreted_type(role: Role, name: str) -> str:
    if role is Role.TARGET:
        head = name.strip().upper()[:3]
        return head if head in ("PTV", "CTV", "GTV") else "PTV"
    return {Role.OAR: "ORGAN", Role.EXTERNAL: "EXTERNAL"}.get(role, "CONTROL")


def _contour_data(points: np.ndarray) -> list[str]:
    """Coordinates to 0.001 mm as decimal strings."""
    return [f"{v:.3f}".rstrip("0").rstrip(".") for v in np.asarray(points, np.float64).ravel()]


def roi_numbers(case: Case) -> list[int]:
    """The ROI number each structure gets in an RTSTRUCT: its own when it has a unique one,
    else the lowest free number."""
    numbers: list[int] = []
    taken = {s.number for s in case.structures if s.number > 0}
    free = 1
    for s in case.structures:
        if s.number > 0 and s.number not in numbers:
            numbers.append(s.number)
            continue
        while free in taken or free in numbers:
            free += 1
        numbers.append(free)
    return numbers


def write_rtstruct(case: Case, path: str | Path, contour_image_refs: bool = True) -> str:
    """The case's structures as an RTSTRUCT (a new SOP instance); returns its UID.

    ``contour_image_refs=False`` leaves out ContourImageSequence (as some systems do).
    """
    refs = case.refs
    g = case.geometry
    uid = generate_uid()
    ds = new_dataset(RT_STRUCTURE_SET_STORAGE, uid)
    add_common_modules(ds, refs, "RTSTRUCT", generate_uid(), 2, "Structures")
    now = dt.datetime.now()
    ds.StructureSetLabel = "DosePilot"
    ds.StructureSetName = case.name[:64]
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")
    series = Dataset()
    series.SeriesInstanceUID = refs.ct_series_instance_uid
    series.ContourImageSequence = Sequence(
        [referenced(CT_IMAGE_STORAGE, u) for u in refs.ct_sop_instance_uids])
    study = referenced(STUDY_COMPONENT_MANAGEMENT, refs.study_instance_uid)
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = refs.frame_of_reference_uid
    frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    rois, contours, observations = [], [], []
    for index, (s, number) in enumerate(zip(case.structures, roi_numbers(case))):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = refs.frame_of_reference_uid
        roi.ROIName = s.name
        roi.ROIGenerationAlgorithm = "MANUAL" if s.contours else "AUTOMATIC"
        rois.append(roi)
        polygons = s.contours or trace_contours(s.mask, g)
        items = []
        for poly in polygons:
            item = Dataset()
            if contour_image_refs:
                k = int(np.clip(np.rint(g.lps_to_index(poly[0])[0]), 0, g.shape[0] - 1))
                item.ContourImageSequence = Sequence(
                    [referenced(CT_IMAGE_STORAGE, refs.ct_sop_instance_uids[k])])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(poly)
            item.ContourData = _contour_data(poly)
            items.append(item)
        rc = Dataset()
        rc.ROIDisplayColor = list(s.color or _PALETTE[index % len(_PALETTE)])
        rc.ContourSequence = Sequence(items)
        rc.ReferencedROINumber = number
        contours.append(rc)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = _interpreted_type(s.role, s.name)
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    save(ds, path)
    return uid


def _jaws(half_mm: float = 50.0) -> tuple[Sequence, Sequence]:
    devices, positions = [], []
    for kind in ("ASYMX", "ASYMY"):
        d = Dataset()
        d.RTBeamLimitingDeviceType = kind
        d.NumberOfLeafJawPairs = 1
        devices.append(d)
        p = Dataset()
        p.RTBeamLimitingDeviceType = kind
        p.LeafJawPositions = [ds_str(-half_mm), ds_str(half_mm)]
        positions.append(p)
    return Sequence(devices), Sequence(positions)


def _arc_direction(a: float, b: float) -> str:
    """CW when going from a to b is the shorter turn with increasing angle (IEC), else CC."""
    return "CW" if (b - a) % 360.0 <= 180.0 else "CC"


def _minimal_beam(beam: Beam, number: int) -> Dataset:
    item = Dataset()
    item.BeamNumber = number
    item.BeamName = beam.name[:64]
    item.BeamType = "DYNAMIC" if beam.technique is Technique.ARC else "STATIC"
    item.RadiationType = "PHOTON"
    item.TreatmentMachineName = "DosePilot"
    item.PrimaryDosimeterUnit = "MU"
    item.SourceAxisDistance = ds_str(beam.sad_mm)
    devices, positions = _jaws()
    item.BeamLimitingDeviceSequence = devices
    item.ReferencedPatientSetupNumber = 1
    item.TreatmentDeliveryType = "TREATMENT"
    item.NumberOfWedges = 0
    item.NumberOfCompensators = 0
    item.NumberOfBoli = 0
    item.NumberOfBlocks = 0
    item.FinalCumulativeMetersetWeight = "1"
    angles = beam.gantry_angles_deg
    if beam.technique is Technique.STATIC:
        angles = (angles[0], angles[0])
    cps = []
    for i, angle in enumerate(angles):
        cp = Dataset()
        cp.ControlPointIndex = i
        cp.CumulativeMetersetWeight = ds_str(i / (len(angles) - 1))
        cp.GantryAngle = ds_str(angle)
        if i == 0:
            cp.NominalBeamEnergy = ds_str(beam.energy_mv)
            cp.BeamLimitingDevicePositionSequence = copy.deepcopy(positions)
            cp.GantryRotationDirection = (_arc_direction(angles[0], angles[1])
                                          if beam.technique is Technique.ARC else "NONE")
            cp.BeamLimitingDeviceAngle = ds_str(beam.collimator_deg)
            cp.BeamLimitingDeviceRotationDirection = "NONE"
            cp.PatientSupportAngle = ds_str(beam.couch_deg)
            cp.PatientSupportRotationDirection = "NONE"
            cp.TableTopEccentricAngle = "0"
            cp.TableTopEccentricRotationDirection = "NONE"
            cp.TableTopVerticalPosition = ""
            cp.TableTopLongitudinalPosition = ""
            cp.TableTopLateralPosition = ""
            cp.IsocenterPosition = ds_list(beam.isocenter_mm)
            cp.SourceToSurfaceDistance = ds_str(beam.sad_mm)
        elif beam.technique is Technique.ARC and i < len(angles) - 1:
            cp.GantryRotationDirection = _arc_direction(angles[i], angles[i + 1])
        cps.append(cp)
    item.NumberOfControlPoints = len(cps)
    item.ControlPointSequence = Sequence(cps)
    return item


def _minimal_plan(case: Case, plan: Plan, uid: str) -> Dataset:
    refs = case.refs
    ds = new_dataset(RT_PLAN_STORAGE, uid)
    add_common_modules(ds, refs, "RTPLAN", generate_uid(), 3, "Plan")
    now = dt.datetime.now()
    ds.RTPlanLabel = (plan.name or "Plan")[:16]
    ds.RTPlanName = plan.name[:64]
    ds.RTPlanDate = now.strftime("%Y%m%d")
    ds.RTPlanTime = now.strftime("%H%M%S")
    ds.ApprovalStatus = "UNAPPROVED"
    if refs.structure_set_sop_instance_uid:
        ds.RTPlanGeometry = "PATIENT"
        ds.ReferencedStructureSetSequence = Sequence(
            [referenced(RT_STRUCTURE_SET_STORAGE, refs.structure_set_sop_instance_uid)])
    else:
        ds.RTPlanGeometry = "TREATMENT_DEVICE"
    dose_refs = []
    targets = [(s, n) for s, n in zip(case.structures, roi_numbers(case))
               if s.role is Role.TARGET and s.prescription_gy]
    if refs.structure_set_sop_instance_uid and targets:
        for s, number in targets:
            r = Dataset()
            r.DoseReferenceNumber = len(dose_refs) + 1
            r.DoseReferenceStructureType = "VOLUME"
            r.ReferencedROINumber = number
            r.DoseReferenceDescription = s.name[:64]
            r.DoseReferenceType = "TARGET"
            r.TargetPrescriptionDose = ds_str(s.prescription_gy)
            dose_refs.append(r)
    elif plan.prescription_gy:
        r = Dataset()
        r.DoseReferenceNumber = 1
        r.DoseReferenceStructureType = "SITE"
        r.DoseReferenceDescription = "Prescription"
        r.DoseReferenceType = "TARGET"
        r.TargetPrescriptionDose = ds_str(plan.prescription_gy)
        dose_refs.append(r)
    if dose_refs:
        ds.DoseReferenceSequence = Sequence(dose_refs)
    setup = Dataset()
    setup.PatientSetupNumber = 1
    setup.PatientPosition = plan.patient_position.value
    ds.PatientSetupSequence = Sequence([setup])
    numbers = []
    beams = []
    for i, beam in enumerate(plan.beams):
        number = beam.number if beam.number > 0 and beam.number not in numbers else i + 1
        while number in numbers:
            number += 1
        numbers.append(number)
        beams.append(_minimal_beam(beam, number))
    ds.BeamSequence = Sequence(beams)
    group = Dataset()
    group.FractionGroupNumber = 1
    group.NumberOfFractionsPlanned = plan.fractions
    group.NumberOfBeams = len(beams)
    group.NumberOfBrachyApplicationSetups = 0
    group.ReferencedBeamSequence = Sequence([])
    for n in numbers:
        ref = Dataset()
        ref.ReferencedBeamNumber = n
        group.ReferencedBeamSequence.append(ref)
    ds.FractionGroupSequence = Sequence([group])
    return ds


def _edited_copy(source: Dataset, plan: Plan, uid: str) -> Dataset | None:
    """A copy of ``source`` with the plan's gantry angles, or None when beams do not match."""
    ds = copy.deepcopy(source)
    by_number = {b.number: b for b in plan.beams}
    treatment = [item for item in ds.BeamSequence
                 if str(item.get("TreatmentDeliveryType", "TREATMENT")).upper() != "SETUP"]
    if {int(item.BeamNumber) for item in treatment} != set(by_number):
        return None
    for item in treatment:
        beam = by_number[int(item.BeamNumber)]
        cps = [cp for cp in item.ControlPointSequence if "GantryAngle" in cp]
        angles = beam.gantry_angles_deg
        if beam.technique is Technique.ARC:
            if len(angles) != len(cps):
                return None
        else:
            angles = (angles[0],) * len(cps)
        for cp, angle in zip(cps, angles):
            cp.GantryAngle = ds_str(round(angle, 6))
    now = dt.datetime.now()
    old_uid = str(source.SOPInstanceUID)
    ds.file_meta = copy.deepcopy(source.file_meta)
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPInstanceUID = uid
    ds.SeriesInstanceUID = generate_uid()
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.RTPlanDate = now.strftime("%Y%m%d")
    ds.RTPlanTime = now.strftime("%H%M%S")
    ds.RTPlanLabel = (str(source.get("RTPlanLabel", "Plan"))[:12] + "_dp")[:16]
    ds.ApprovalStatus = "UNAPPROVED"
    for keyword in ("ReviewDate", "ReviewTime", "ReviewerName"):
        if keyword in ds:
            delattr(ds, keyword)
    predecessor = referenced(RT_PLAN_STORAGE, old_uid)
    predecessor.RTPlanRelationship = "PREDECESSOR"
    ds.ReferencedRTPlanSequence = Sequence([predecessor])
    return ds


def _source_plan(refs: DicomRefs) -> Dataset | None:
    if not refs.plan_path:
        return None
    try:
        src = pydicom.dcmread(refs.plan_path, force=True)
    except Exception as exc:  # the source may have been moved or damaged since
        log.warning("source RTPLAN %s could not be re-read (%s); writing a minimal plan",
                    refs.plan_path, exc)
        return None
    if str(src.get("SOPInstanceUID", "")) != refs.plan_sop_instance_uid:
        log.warning("%s is no longer the case's source plan; writing a minimal plan",
                    refs.plan_path)
        return None
    return src


def write_rtplan(case: Case, plan: Plan, path: str | Path) -> str:
    """Write ``plan`` as an RTPLAN for ``case``; returns the new SOP Instance UID.

    When the case came from an RTPLAN with the same treatment beams, the file is a copy of it
    with the plan's gantry angles, new UIDs, status UNAPPROVED and a PREDECESSOR reference to
    the source. Otherwise a minimal valid plan is written.
    """
    case = ensure_refs(case)
    uid = generate_uid()
    source = _source_plan(case.refs)
    ds = _edited_copy(source, plan, uid) if source is not None else None
    if source is not None and ds is None:
        log.warning("the edited plan's beams do not match the source RTPLAN's; writing a "
                    "minimal plan")
    if ds is None:
        ds = _minimal_plan(case, plan, uid)
    save(ds, path)
    return uid


def write_rtdose(dose: Volume, case: Case, path: str | Path,
                 plan_sop_instance_uid: str | None = None,
                 summation_type: str = "PLAN", description: str = "DosePilot dose") -> str:
    """Write ``dose`` (Gy) as an RTDOSE in the case's study and frame of reference.

    The dose keeps its own grid (any axial grid; usually the CT's). Negative values are written
    as 0. Returns the SOP Instance UID. ``plan_sop_instance_uid`` is the plan the dose belongs
    to (default: the case's source plan); a dose must refer to a plan.
    """
    case = ensure_refs(case)
    refs = case.refs
    plan_uid = plan_sop_instance_uid or refs.plan_sop_instance_uid
    if not plan_uid:
        raise ValueError("an RTDOSE must refer to its RTPLAN: write the plan first "
                         "(write_rtplan) and pass its SOP Instance UID")
    g = dose.geometry
    d = np.asarray(g.direction)
    row, col = d[2], d[1]
    vol = dose
    if float(d[0] @ np.cross(row, col)) < 0:  # frames must advance along row x column
        vol = flip_axes(dose, (0,))
    g = vol.geometry
    values = np.nan_to_num(np.asarray(vol.array, dtype=np.float64), nan=0.0)
    values = np.clip(values, 0.0, None)
    peak = float(values.max())
    scaling = float(ds_str(peak / _STORED_MAX)) if peak > 0 else 1.0
    stored = np.rint(values / scaling).astype("<u2")
    uid = generate_uid()
    ds = new_dataset(RT_DOSE_STORAGE, uid)
    add_common_modules(ds, refs, "RTDOSE", generate_uid(), 4, description)
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.ImagePositionPatient = ds_list(g.origin)
    ds.ImageOrientationPatient = ds_list(np.concatenate([row, col]))
    ds.PixelSpacing = ds_list([g.spacing[1], g.spacing[2]])
    ds.SliceThickness = ds_str(g.spacing[0])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = g.shape[0]
    ds.FrameIncrementPointer = pydicom.tag.Tag("GridFrameOffsetVector")
    ds.Rows, ds.Columns = g.shape[1], g.shape[2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = summation_type
    ds.DoseComment = description[:64]
    ds.GridFrameOffsetVector = ds_list(np.arange(g.shape[0]) * g.spacing[0])
    ds.DoseGridScaling = ds_str(scaling)
    plan_ref = referenced(RT_PLAN_STORAGE, plan_uid)
    ds.ReferencedRTPlanSequence = Sequence([plan_ref])
    ds.PixelData = stored.tobytes()
    save(ds, path)
    return uid


@dataclass(frozen=True)
class WrittenCase:
    """What :func:`write_case_dicom` wrote, and the case with the identifiers it used."""

    case: Case
    ct_paths: tuple[Path, ...]
    rtstruct_path: Path | None
    rtplan_path: Path | None
    rtdose_path: Path | None


def write_case_dicom(case: Case, out_dir: str | Path, patient_position: str | None = None,
                     contour_image_refs: bool = True) -> WrittenCase:
    """Write the whole case (CT, RTSTRUCT, RTPLAN, RTDOSE when present) into ``out_dir``.

    ``patient_position`` (default: the plan's, else HFS) sets the CT's image orientation
    convention; the case's LPS geometry is unchanged by it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    case = ensure_refs(case)
    position = patient_position or (case.plan.patient_position.value if case.plan else "HFS")
    PatientPosition(position)
    ct_paths = write_ct_series(case.ct, case.refs, out / "CT", position)
    rtstruct_path = rtplan_path = rtdose_path = None
    if case.structures:
        rtstruct_path = out / "RTSTRUCT.dcm"
        ss_uid = write_rtstruct(case, rtstruct_path, contour_image_refs)
        case = dataclasses.replace(case, refs=dataclasses.replace(
            case.refs, structure_set_sop_instance_uid=ss_uid))
    if case.plan is not None:
        rtplan_path = out / "RTPLAN.dcm"
        plan_uid = write_rtplan(case, case.plan, rtplan_path)
        case = dataclasses.replace(case, refs=dataclasses.replace(
            case.refs, plan_sop_instance_uid=plan_uid, plan_path=str(rtplan_path)))
    if case.dose is not None and case.plan is not None:
        rtdose_path = out / "RTDOSE.dcm"
        write_rtdose(case.dose, case, rtdose_path)
    return WrittenCase(case=case, ct_paths=tuple(ct_paths), rtstruct_path=rtstruct_path,
                       rtplan_path=rtplan_path, rtdose_path=rtdose_path)
